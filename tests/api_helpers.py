"""Small helpers for tests: driving the API through Flask's test client, agent rows."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet_common.agents import service as agent_service
from fleet_common.auth import service as auth
from fleet_common.auth.models import TokenKind
from fleet_common.db import utcnow


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Api:
    """JSON calls with a token: ``api.post("/tasks", json={...}, token=...)``."""

    def __init__(self, client: Any, token: str) -> None:
        self.client = client
        self.token = token

    def call(self, method: str, path: str, *, token: str | None = None, **kwargs: Any) -> Any:
        headers = dict(kwargs.pop("headers", {}))
        tok = self.token if token is None else token
        if tok:
            headers.update(bearer(tok))
        url = path
        if not url.startswith(("/api/", "/healthz", "/readyz", "/metrics", "/openapi", "/docs")):
            url = "/api/v1" + url
        return getattr(self.client, method)(url, headers=headers, **kwargs)

    def get(self, path: str, **kw: Any) -> Any:
        return self.call("get", path, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.call("post", path, **kw)

    def patch(self, path: str, **kw: Any) -> Any:
        return self.call("patch", path, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.call("delete", path, **kw)

    def register(
        self,
        name: str,
        capabilities: list[str] | None = None,
        host_uid: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Mint a join token and register an agent; returns the 201 body."""
        join = self.post("/join-tokens", json={}).get_json()["token"]
        body = {
            "join_token": join,
            "name": name,
            "host_uid": host_uid or f"uid-{name}",
            "capabilities": capabilities or [],
            **extra,
        }
        response = self.post("/agents/register", json=body, token="")
        assert response.status_code == 201, response.get_json()
        return dict(response.get_json())


# --- Shared pieces of the API acceptance tests (tests/api/test_*.py) ---------------------------

# Every (rule, method) the app serves, and who may call it:
#   public  - anyone;  join - a join token in the body;  admin - admin tokens only;
#   agent   - an agent token, acting for itself;  lease - the agent holding the task's lease;
#   command - the agent the command is for;  self_or_admin - that agent itself, or an admin;
#   hmac    - a Forgejo delivery signed with the webhook secret (no bearer token counts).
ENDPOINT_ACCESS: dict[tuple[str, str], str] = {
    ("/static/<path:filename>", "GET"): "public",
    ("/openapi.json", "GET"): "public",
    ("/docs", "GET"): "public",
    ("/healthz", "GET"): "public",
    ("/readyz", "GET"): "public",
    ("/metrics", "GET"): "public",
    ("/api/v1/tasks", "GET"): "admin",
    ("/api/v1/tasks", "POST"): "admin",
    ("/api/v1/tasks/<task_id>", "GET"): "admin",
    ("/api/v1/tasks/<task_id>", "PATCH"): "admin",
    ("/api/v1/tasks/<task_id>/events", "GET"): "admin",
    ("/api/v1/tasks/<task_id>/logs", "GET"): "admin",
    ("/api/v1/tasks/<task_id>/retry", "POST"): "admin",
    ("/api/v1/tasks/<task_id>/cancel", "POST"): "admin",
    ("/api/v1/tasks/dequeue", "POST"): "agent",
    ("/api/v1/tasks/<task_id>/status", "POST"): "lease",
    ("/api/v1/tasks/<task_id>/logs", "POST"): "lease",
    ("/api/v1/tasks/<task_id>/complete", "POST"): "lease",
    ("/api/v1/tasks/<task_id>/fail", "POST"): "lease",
    ("/api/v1/receipts", "POST"): "lease",
    ("/api/v1/agents/register", "POST"): "join",
    ("/api/v1/agents/heartbeat", "POST"): "agent",
    ("/api/v1/agents/deregister", "POST"): "agent",
    ("/api/v1/agents", "GET"): "admin",
    ("/api/v1/agents/<agent_id>", "GET"): "admin",
    ("/api/v1/agents/<agent_id>", "PATCH"): "admin",
    ("/api/v1/agents/<agent_id>", "DELETE"): "admin",
    ("/api/v1/agents/<agent_id>/commands", "GET"): "admin",
    ("/api/v1/agents/<agent_id>/commands", "POST"): "admin",
    ("/api/v1/agents/commands/<command_id>/ack", "POST"): "command",
    ("/api/v1/agents/commands/<command_id>/complete", "POST"): "command",
    ("/api/v1/agents/<agent_id>/rotate-token", "POST"): "self_or_admin",
    ("/api/v1/join-tokens", "GET"): "admin",
    ("/api/v1/join-tokens", "POST"): "admin",
    ("/api/v1/join-tokens/<token_id>", "DELETE"): "admin",
    ("/api/v1/admin-tokens", "GET"): "admin",
    ("/api/v1/admin-tokens", "POST"): "admin",
    ("/api/v1/admin-tokens/<token_id>", "DELETE"): "admin",
    ("/api/v1/webhooks/forgejo", "POST"): "hmac",
    ("/api/v1/intake/health", "GET"): "admin",
}

ERROR_KEYS = {"code", "status", "message", "errors", "reason"}


def assert_error(response: Any, status: int, reason: str | None = None) -> dict[str, Any]:
    """The one error shape, exactly: ``{"code", "status", "message", "errors"?, "reason"?}``."""
    from werkzeug.http import HTTP_STATUS_CODES

    assert response.status_code == status, (response.status_code, response.get_data(as_text=True))
    assert response.mimetype == "application/json", response.mimetype
    body = response.get_json()
    assert isinstance(body, dict), body
    assert {"code", "status", "message"} <= set(body) <= ERROR_KEYS, body
    assert body["code"] == status
    assert body["status"] == HTTP_STATUS_CODES[status]
    assert isinstance(body["message"], str) and body["message"]
    if "errors" in body:
        assert isinstance(body["errors"], dict) and body["errors"], body
    assert body.get("reason") == reason, body
    return dict(body)


def snapshot(db: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in primary-key order: compare two to prove nothing changed."""
    from sqlalchemy import select

    from fleet_common.models import Base

    state: dict[str, list[tuple[Any, ...]]] = {}
    with db.session() as session:
        for table in Base.metadata.sorted_tables:
            query = select(table).order_by(*table.primary_key.columns)
            state[table.name] = [tuple(row) for row in session.execute(query)]
    return state


def row_counts(db: Any) -> dict[str, int]:
    return {name: len(rows) for name, rows in snapshot(db).items()}


def wait_until(
    condition: Callable[[], Any], *, timeout: float, what: str, logs: Callable[[], str] = str
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` (and showing
    ``logs()``) after ``timeout`` seconds. Bounds are ceilings, not expected durations."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = logs()
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}" + (f"\n{detail}" if detail else "")
            )
        time.sleep(0.05)


@dataclass
class Stack:
    """An API app of its own (for tests that need settings other than the defaults)."""

    settings: Any
    db: Any
    app: Any
    client: Any
    admin_token: str

    @property
    def api(self) -> Api:
        return Api(self.client, self.admin_token)

    @property
    def orch(self) -> Any:
        return self.settings.orchestrator


@contextmanager
def stack(
    tmp_path: Path, database_url: str, *, server: dict[str, Any] | None = None, **orch: Any
) -> Iterator[Stack]:
    """Settings (``orch`` as ``[orchestrator]`` keys, ``server`` as ``[server]`` keys), a
    database handle, the app and an admin token."""
    from fleet_api.app import create_app
    from fleet_common.auth import service as auth
    from fleet_common.auth.models import TokenKind
    from fleet_common.db import Database
    from fleet_common.settings import load_settings

    env = {
        "FLEET_DATABASE_URL": database_url,
        "FLEET_ORCHESTRATOR_STATE_DIR": str(tmp_path / "state"),
    }
    env.update({f"FLEET_ORCHESTRATOR_{k.upper()}": str(v) for k, v in orch.items()})
    env.update({f"FLEET_SERVER_{k.upper()}": str(v) for k, v in (server or {}).items()})
    settings = load_settings(env=env)
    db = Database(settings.database_url)
    try:
        app = create_app(settings, db=db, publisher=False)
        app.testing = True
        with db.session() as session:
            _, admin = auth.mint(session, TokenKind.ADMIN, actor="test", name="test")
        yield Stack(settings, db, app, app.test_client(), admin)
    finally:
        db.dispose()


def new_task(api: Api, **fields: Any) -> dict[str, Any]:
    response = api.post("/tasks", json={"title": "a task", **fields})
    assert response.status_code == 201, response.get_json()
    return dict(response.get_json())


def dequeue(api: Api, agent_token: str, wait_secs: int = 0) -> dict[str, Any] | None:
    """The dequeued ``{"task", "lease"}``, or None for 204."""
    response = api.post("/tasks/dequeue", json={"wait_secs": wait_secs}, token=agent_token)
    if response.status_code == 204:
        return None
    assert response.status_code == 200, response.get_json()
    return dict(response.get_json())


def task_row(api: Api, task_id: str) -> dict[str, Any]:
    response = api.get(f"/tasks/{task_id}")
    assert response.status_code == 200, response.get_json()
    return dict(response.get_json())


def events(api: Api, task_id: str) -> list[dict[str, Any]]:
    response = api.get(f"/tasks/{task_id}/events")
    assert response.status_code == 200, response.get_json()
    return list(response.get_json())


def claim_at(db: Any, settings: Any, agent_id: str, now: dt.datetime) -> tuple[str, str] | None:
    """Claim as ``agent_id`` at ``now`` (past a backoff): ``(task_id, lease_token)`` or None.
    The same claim dequeue makes, with the clock moved."""
    from fleet_common.dispatch.claim import claim_next

    with db.session() as session:
        claim = claim_next(session, settings.orchestrator, agent_id, now=now)
        return None if claim is None else (claim.task.id, claim.lease_token)


def run_sweep(db: Any, settings: Any, sweep: Callable[..., Any], now: dt.datetime) -> Any:
    """Run one sweep in its own unit of work, as beat does."""
    with db.session() as session:
        return sweep(session, settings.orchestrator, now)


def assert_log_replays(db: Any) -> None:
    """Every task row equals the replay of its event log (what ``fleet events verify`` does)."""
    from fleet_common.tasks import replay

    with db.session() as session:
        differences = [str(d) for d in replay.verify(session)]
    assert differences == []


def pull_agent(
    session: Any,
    capabilities: list[str],
    *,
    name: str = "puller",
    max_concurrency: int = 1,
    now: dt.datetime | None = None,
) -> str:
    """A pull agent (``http_pull``) registered, as at ``now``, with a join token minted for
    it."""
    _, join = auth.mint(session, TokenKind.JOIN, actor="test", ttl_secs=3600)
    body = {
        "join_token": join,
        "name": name,
        "host_uid": uuid.uuid4().hex,
        "capabilities": capabilities,
        "max_concurrency": max_concurrency,
    }
    return agent_service.register(session, body, now=now).agent.id


def worker_agent(
    session: Any, capabilities: list[str], *, max_concurrency: int = 1, host: str = "relay-host"
) -> str:
    """A configured host slot's ``ssh_cli`` agent row (a worker's), online for the next hour
    (no offline sweep takes it during a test)."""
    agent = agent_service.ensure_configured(
        session,
        host_uid=uuid.uuid4().hex,
        name=f"{host}/demo#{uuid.uuid4().hex[:6]}",
        host_id=host,
        hostname="localhost",
        agent_type="demo",
        capabilities=capabilities,
        max_concurrency=max_concurrency,
        now=utcnow() + dt.timedelta(hours=1),
    )
    return agent.id
