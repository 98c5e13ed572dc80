"""Property-based conformance: schemathesis generates requests for every operation of the app's
own ``/openapi.json`` (in-process, through WSGI), valid ones and invalid ones, and checks that no
answer is a server error and every answer is documented and matches its schema. Admin
operations get an admin token, agent operations an agent token; about half of the path ids are
real objects. Bounded and deterministic; SQLite only (this is about the HTTP layer).

(schemathesis' own pytest integration does not run under pytest 9, so each operation's
strategy is driven with Hypothesis directly.)"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok

from fleet_api.app import create_app
from fleet_common.migrate import upgrade
from fleet_common.settings import load_settings
from tests.api_helpers import ENDPOINT_ACCESS, Stack, bearer, dequeue, new_task, stack

CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
]
AGENT_ACCESS = {"agent", "lease", "command"}
# Per operation: valid requests, and fewer invalid ones (each is one cheap 4xx).
MAX_EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 10}


def _operations() -> list[tuple[str, str]]:
    """(METHOD, path) of every documented operation, read from an app with no database."""
    app = create_app(load_settings(env={"FLEET_DATABASE_URL": "sqlite://"}), publisher=False)
    loaded = schemathesis.openapi.from_wsgi("/openapi.json", app)
    operations = []
    for result in loaded.get_all_operations():
        assert isinstance(result, Ok), f"the OpenAPI document is not valid: {result}"
        operations.append((result.ok().method.upper(), result.ok().path))
    return sorted(operations)


OPERATIONS = _operations()


@dataclass
class Fuzzed:
    stack: Stack
    schema: Any
    agent_token: str
    ids: dict[str, str]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    """One system for every operation: an agent holding a task, a queued task, a command."""
    tmp = tmp_path_factory.mktemp("schemathesis")
    url = f"sqlite:///{tmp / 'fleet.db'}"
    upgrade(url)
    with stack(tmp, url) as st:
        api = st.api
        agent = api.register("fuzz", ["code:python"])
        task = new_task(api, labels=["agent:code:python"])
        assert dequeue(api, agent["agent_token"]) is not None
        new_task(api, title="queued")
        command = api.post(f"/agents/{agent['agent']['id']}/commands", json={"kind": "restart"})
        join = api.post("/join-tokens", json={}).get_json()
        yield Fuzzed(
            stack=st,
            schema=schemathesis.openapi.from_wsgi("/openapi.json", st.app),
            agent_token=agent["agent_token"],
            ids={
                "task_id": task["id"],
                "agent_id": agent["agent"]["id"],
                "command_id": command.get_json()["id"],
                "token_id": join["id"],
            },
        )


def use_real_ids(case: Any, ids: dict[str, str]) -> None:
    """Point about half of the cases (decided by the generated value, so runs repeat) at real
    objects; never delete the agent the other cases authenticate as."""
    params = case.path_parameters or {}
    if case.method.upper() == "DELETE" and "agent_id" in params:
        return
    for name, value in params.items():
        if name in ids and len(str(value)) % 2 == 0:
            params[name] = ids[name]


def no_long_polls(case: Any) -> None:
    """Dequeue answers at once: a generated ``wait_secs`` of up to 30 s would only wait."""
    body = case.body
    if case.operation.path.endswith("/dequeue") and isinstance(body, dict):
        wait = body.get("wait_secs")
        if isinstance(wait, int) and not isinstance(wait, bool) and 0 < wait <= 30:
            body["wait_secs"] = 0


def headers_for(method: str, path: str, fuzzed: Fuzzed) -> dict[str, str]:
    who = ENDPOINT_ACCESS[(re.sub(r"\{(\w+)\}", r"<\1>", path), method)]
    if who in AGENT_ACCESS:
        return bearer(fuzzed.agent_token)
    if who in {"admin", "self_or_admin"}:
        return bearer(fuzzed.stack.admin_token)
    return {}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_operation_conforms(method: str, path: str, mode: GenerationMode, fuzzed: Fuzzed) -> None:
    operation = fuzzed.schema[path][method]
    headers = headers_for(method, path, fuzzed)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES[mode],
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        use_real_ids(case, fuzzed.ids)
        no_long_polls(case)
        case.call_and_validate(headers=headers, checks=CHECKS)

    try:
        check()
    except Unsatisfiable:
        if mode == GenerationMode.NEGATIVE:
            pytest.skip("the operation has nothing that could be made invalid")
        raise
