"""Isolation: who may call what, enumerated from the app itself so no endpoint is forgotten.

An agent token acts only for its own agent, its own commands and the tasks it holds a lease on:
another agent's objects answer 404 exactly as if they did not exist, even with that agent's
real lease token. Admin-only endpoints refuse agent tokens (403); agent endpoints refuse admin
tokens (403); no token, a bad one or a revoked one is 401. None of it changes anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest

from fleet_common.auth import service as auth
from fleet_common.auth.models import TokenKind
from tests.api_helpers import (
    ENDPOINT_ACCESS,
    Api,
    assert_error,
    dequeue,
    new_task,
    snapshot,
    task_row,
)

AUTHENTICATED = {"admin", "agent", "lease", "command", "self_or_admin"}


def served(app: Any) -> set[tuple[str, str]]:
    return {
        (rule.rule, method)
        for rule in app.url_map.iter_rules()
        for method in rule.methods or ()
        if method not in {"HEAD", "OPTIONS"}
    }


def test_every_endpoint_is_classified(app: Any, client: Any, world: World) -> None:
    """A new endpoint fails here until its access rule is written down and a request for it
    exists in World.requests (so the tests below exercise it)."""
    assert served(app) == set(ENDPOINT_ACCESS)
    assert set(world.requests()) == set(keys(*AUTHENTICATED))
    documented = client.get("/openapi.json").get_json()["paths"]
    for path, operations in documented.items():
        rule = re.sub(r"\{(\w+)\}", r"<\1>", path)
        for method in operations:
            if method != "parameters":
                assert (rule, method.upper()) in ENDPOINT_ACCESS, (path, method)


@dataclass
class World:
    """Two sibling agents registered through the same join flow; B holds a task and has a
    command waiting. Requests are built valid, so only authorisation can refuse them."""

    api: Api
    a: dict[str, Any]
    b: dict[str, Any]
    task_b: str
    lease_b: str
    queued: str
    command_b: str
    join_id: str
    admin_id: str
    revoked_admin: str

    @property
    def token_a(self) -> str:
        return str(self.a["agent_token"])

    @property
    def token_b(self) -> str:
        return str(self.b["agent_token"])

    def requests(
        self, lease: str | None = None
    ) -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
        """A valid request for every authenticated endpoint, about B's objects."""
        lease = lease or self.lease_b
        b_id, task, cmd = self.b["agent"]["id"], self.task_b, self.command_b
        receipt = {"exit_code": 0, "summary": "done"}
        return {
            ("/api/v1/tasks", "GET"): ("/tasks", {}),
            ("/api/v1/tasks", "POST"): ("/tasks", {"json": {"title": "new"}}),
            ("/api/v1/tasks/<task_id>", "GET"): (f"/tasks/{task}", {}),
            ("/api/v1/tasks/<task_id>", "PATCH"): (
                f"/tasks/{self.queued}",
                {"json": {"priority": 9}},
            ),
            ("/api/v1/tasks/<task_id>/events", "GET"): (f"/tasks/{task}/events", {}),
            ("/api/v1/tasks/<task_id>/logs", "GET"): (f"/tasks/{task}/logs?offset=0", {}),
            ("/api/v1/tasks/<task_id>/retry", "POST"): (f"/tasks/{self.queued}/retry", {}),
            ("/api/v1/tasks/<task_id>/cancel", "POST"): (f"/tasks/{self.queued}/cancel", {}),
            ("/api/v1/tasks/dequeue", "POST"): ("/tasks/dequeue", {"json": {"wait_secs": 0}}),
            ("/api/v1/tasks/<task_id>/status", "POST"): (
                f"/tasks/{task}/status",
                {"json": {"lease_token": lease, "status": "running"}},
            ),
            ("/api/v1/tasks/<task_id>/logs", "POST"): (
                f"/tasks/{task}/logs",
                {"json": {"lease_token": lease, "seq": 0, "data": "hi\n"}},
            ),
            ("/api/v1/tasks/<task_id>/complete", "POST"): (
                f"/tasks/{task}/complete",
                {"json": {"lease_token": lease, "receipt": receipt}},
            ),
            ("/api/v1/tasks/<task_id>/fail", "POST"): (
                f"/tasks/{task}/fail",
                {"json": {"lease_token": lease, "error": "boom"}},
            ),
            ("/api/v1/receipts", "POST"): (
                "/receipts",
                {"json": {"task_id": task, "lease_token": lease, "receipt": receipt}},
            ),
            ("/api/v1/agents/heartbeat", "POST"): (
                "/agents/heartbeat",
                {"json": {"leases": [{"task_id": task, "lease_token": lease}]}},
            ),
            ("/api/v1/agents/deregister", "POST"): ("/agents/deregister", {}),
            ("/api/v1/agents", "GET"): ("/agents", {}),
            ("/api/v1/agents/<agent_id>", "GET"): (f"/agents/{b_id}", {}),
            ("/api/v1/agents/<agent_id>", "PATCH"): (
                f"/agents/{b_id}",
                {"json": {"desired_state": "disabled"}},
            ),
            ("/api/v1/agents/<agent_id>", "DELETE"): (f"/agents/{b_id}", {}),
            ("/api/v1/agents/<agent_id>/commands", "GET"): (f"/agents/{b_id}/commands", {}),
            ("/api/v1/agents/<agent_id>/commands", "POST"): (
                f"/agents/{b_id}/commands",
                {"json": {"kind": "drain"}},
            ),
            ("/api/v1/agents/commands/<command_id>/ack", "POST"): (
                f"/agents/commands/{cmd}/ack",
                {"json": {}},
            ),
            ("/api/v1/agents/commands/<command_id>/complete", "POST"): (
                f"/agents/commands/{cmd}/complete",
                {"json": {"success": True, "result": {"ok": 1}}},
            ),
            ("/api/v1/agents/<agent_id>/rotate-token", "POST"): (
                f"/agents/{b_id}/rotate-token",
                {},
            ),
            ("/api/v1/join-tokens", "GET"): ("/join-tokens", {}),
            ("/api/v1/join-tokens", "POST"): ("/join-tokens", {"json": {"ttl_secs": 60}}),
            ("/api/v1/join-tokens/<token_id>", "DELETE"): (f"/join-tokens/{self.join_id}", {}),
            ("/api/v1/intake/health", "GET"): ("/intake/health", {}),
            ("/api/v1/admin-tokens", "GET"): ("/admin-tokens", {}),
            ("/api/v1/admin-tokens", "POST"): ("/admin-tokens", {"json": {"name": "ops"}}),
            ("/api/v1/admin-tokens/<token_id>", "DELETE"): (
                f"/admin-tokens/{self.admin_id}",
                {},
            ),
        }

    def call(self, key: tuple[str, str], token: str, lease: str | None = None) -> Any:
        path, kwargs = self.requests(lease)[key]
        return self.api.call(key[1].lower(), path, token=token, **kwargs)


@pytest.fixture
def world(client: Any, admin_token: str, db: Any) -> World:
    api = Api(client, admin_token)
    a = api.register("sibling-a")
    b = api.register("sibling-b")
    task_b = new_task(api, title="b's task")
    got = dequeue(api, b["agent_token"])
    assert got is not None and got["task"]["id"] == task_b["id"]
    queued = new_task(api, title="queued", assigned_agent_id=b["agent"]["id"])
    command = api.post(f"/agents/{b['agent']['id']}/commands", json={"kind": "restart"})
    assert command.status_code == 201
    join = api.post("/join-tokens", json={}).get_json()
    with db.session() as session:
        spare, _ = auth.mint(session, TokenKind.ADMIN, actor="test", name="spare")
        revoked, revoked_secret = auth.mint(session, TokenKind.ADMIN, actor="test", name="old")
        revoked.revoked_at = revoked.created_at
        spare_id = spare.id
    return World(
        api=api,
        a=a,
        b=b,
        task_b=task_b["id"],
        lease_b=got["lease"]["token"],
        queued=queued["id"],
        command_b=command.get_json()["id"],
        join_id=join["id"],
        admin_id=spare_id,
        revoked_admin=revoked_secret,
    )


def keys(*access: str) -> list[tuple[str, str]]:
    return [key for key, who in ENDPOINT_ACCESS.items() if who in access]


def test_admin_only_endpoints_refuse_agent_tokens(world: World, db: Any) -> None:
    before = snapshot(db)
    for key in keys("admin"):
        for token in (world.token_a, world.token_b):
            assert_error(world.call(key, token), 403)
    assert snapshot(db) == before


def test_agent_endpoints_refuse_admin_tokens(world: World, db: Any) -> None:
    before = snapshot(db)
    for key in keys("agent", "lease", "command"):
        assert_error(world.call(key, world.api.token), 403)
    assert snapshot(db) == before


def test_without_a_valid_token_everything_is_401(world: World, db: Any) -> None:
    before = snapshot(db)
    for header in (
        None,
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer fla_not-a-real-token",
        "Bearer flt_not-a-real-token",
        "Bearer something-else",
    ):
        headers = {} if header is None else {"Authorization": header}
        for key in keys(*AUTHENTICATED):
            path, kwargs = world.requests()[key]
            response = world.api.call(key[1].lower(), path, token="", headers=headers, **kwargs)
            assert response.status_code == 401, (header, key)
            assert_error(response, 401)
    assert snapshot(db) == before


def test_authentication_comes_before_validation(world: World, db: Any) -> None:
    """An unauthenticated request with a bad body or query is 401, not 422: a caller without a
    valid token learns nothing about the request format, and an agent whose token was revoked
    is told so whatever it sent."""
    before = snapshot(db)
    for key in keys(*AUTHENTICATED):
        path, _ = world.requests()[key]
        sep = "&" if "?" in path else "?"
        bad = {"json": {"wait_secs": "x", "title": 5, "lease_token": 7, "success": "?"}}
        if key[1] == "GET":
            bad = {}
            path = f"{path}{sep}page=0&page_size=-1&offset=-5&status=bogus"
        for token in ("", world.revoked_admin):
            assert_error(world.api.call(key[1].lower(), path, token=token, **bad), 401)
    assert snapshot(db) == before


def test_revoked_and_misused_tokens_are_401(world: World, db: Any) -> None:
    join_secret = world.api.post("/join-tokens", json={}).get_json()["token"]
    before = snapshot(db)
    for token in (world.revoked_admin, join_secret):
        for key in keys(*AUTHENTICATED):
            assert_error(world.call(key, token), 401)
    assert snapshot(db) == before


def test_webhooks_need_the_signature_not_a_token(world: World, db: Any) -> None:
    before = snapshot(db)
    delivery = {"action": "opened", "issue": {"number": 1}, "repository": {"full_name": "o/r"}}
    headers = {"X-Forgejo-Event": "issues", "X-Forgejo-Delivery": "d-1"}
    for token in ("", world.api.token, world.token_a):
        response = world.api.post("/webhooks/forgejo", json=delivery, headers=headers, token=token)
        assert_error(response, 401)
    assert snapshot(db) == before


def test_siblings_objects_do_not_exist_for_an_agent(world: World, db: Any) -> None:
    """A acts on B's task (with B's real lease token), B's command and B's token: 404, the
    same answer as for objects that do not exist, and nothing changes."""
    before = snapshot(db)
    siblings = keys("lease", "command", "self_or_admin")
    for key in siblings:
        response = world.call(key, world.token_a)
        body = assert_error(response, 404)
        path, kwargs = world.requests()[key]
        object_id = world.b["agent"]["id"] if "agent_id" in key[0] else None
        object_id = object_id or (world.command_b if "command_id" in key[0] else world.task_b)
        ghost = world.api.call(
            key[1].lower(),
            path.replace(object_id, "xxx_does_not_exist"),
            token=world.token_a,
            **_replace_ids(kwargs, object_id),
        )
        assert_error(ghost, 404)
        assert (
            ghost.get_json()["message"].replace("xxx_does_not_exist", object_id) == body["message"]
        ), key
    assert snapshot(db) == before

    # Presenting B's lease in A's heartbeat does not renew it: it is reported stale.
    held = task_row(world.api, world.task_b)
    beat = world.call(("/api/v1/agents/heartbeat", "POST"), world.token_a)
    assert beat.status_code == 200
    assert beat.get_json()["stale_task_ids"] == [world.task_b]
    assert task_row(world.api, world.task_b) == held


def _replace_ids(kwargs: dict[str, Any], object_id: str) -> dict[str, Any]:
    body = kwargs.get("json")
    if isinstance(body, dict) and body.get("task_id") == object_id:
        return {**kwargs, "json": {**body, "task_id": "xxx_does_not_exist"}}
    return kwargs


def test_the_owner_and_the_admin_are_let_through(world: World) -> None:
    """The control: the same requests succeed for whoever may make them."""
    b = world.token_b
    for key in (
        ("/api/v1/tasks/<task_id>/status", "POST"),
        ("/api/v1/tasks/<task_id>/logs", "POST"),
        ("/api/v1/agents/heartbeat", "POST"),
        ("/api/v1/agents/commands/<command_id>/ack", "POST"),
        ("/api/v1/agents/commands/<command_id>/complete", "POST"),
        ("/api/v1/tasks/<task_id>/complete", "POST"),
    ):
        response = world.call(key, b)
        assert response.status_code == 200, (key, response.get_json())
    assert world.call(("/api/v1/agents/<agent_id>/rotate-token", "POST"), b).status_code == 201
    # A's own rotation is fine too.
    own = world.api.post(f"/agents/{world.a['agent']['id']}/rotate-token", token=world.token_a)
    assert own.status_code == 201

    expected = {
        ("/api/v1/tasks", "POST"): 201,
        ("/api/v1/tasks/<task_id>/retry", "POST"): 409,  # the task is not failed: auth passed
        ("/api/v1/agents/<agent_id>/commands", "POST"): 201,
        ("/api/v1/agents/<agent_id>/rotate-token", "POST"): 201,
        ("/api/v1/agents/<agent_id>", "DELETE"): 204,
        ("/api/v1/join-tokens", "POST"): 201,
        ("/api/v1/join-tokens/<token_id>", "DELETE"): 204,
        ("/api/v1/admin-tokens", "POST"): 201,
        ("/api/v1/admin-tokens/<token_id>", "DELETE"): 204,
    }
    admin_keys = keys("admin", "self_or_admin")
    admin_keys.sort(key=lambda k: k[1] == "DELETE")  # deletions last
    for key in admin_keys:
        response = world.call(key, world.api.token)
        assert response.status_code == expected.get(key, 200), (key, response.get_json())
