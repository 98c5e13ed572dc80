"""The database goes away under load and comes back: the API answers 503 fast, then recovers.

A private PostgreSQL (never the shared one) backs a real HTTP server running the API. A few
client threads submit tasks and list them with an admin token, or heartbeat and dequeue
with an agent token (statements run by the driver, outside any Session), timing every
request. Then the
server is stopped: every request made during the outage must answer 503 in the JSON error shape
with reason ``database_unavailable`` within 2 s (nothing hangs, nothing is a 500). Then it is
started again: requests succeed again, without restarting the API.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from fleet_common.auth import service as auth
from fleet_common.auth.models import TokenKind
from fleet_common.db import Database
from fleet_common.migrate import upgrade
from fleet_common.settings import load_settings
from tests.pg_private import PrivatePostgres, private_postgres

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

KINDS = ("submit", "list", "heartbeat", "dequeue")
CLIENT_THREADS = 8
OK = (200, 201, 204)  # 204: a dequeue with nothing the agent can take
OUTAGE_ANSWER_SECS = 2.0  # the most a request may take while the database is down
CLIENT_TIMEOUT = 15.0  # far above it, so a hang is measured instead of blocking the test


@dataclass(frozen=True)
class Call:
    kind: str  # one of KINDS
    started: float  # time.monotonic()
    ended: float
    status: int  # 0: no HTTP answer at all (connection error, client timeout)
    body: Any
    retry_after: str | None

    @property
    def seconds(self) -> float:
        return self.ended - self.started


class Load:
    """Client threads calling the API in a loop until stopped, recording every call."""

    def __init__(self, base_url: str, token: str, agent_token: str) -> None:
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {token}"}
        self.agent_headers = {"Authorization": f"Bearer {agent_token}"}
        self.calls: list[Call] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._loop, args=(KINDS[n % len(KINDS)],), daemon=True)
            for n in range(CLIENT_THREADS)
        ]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=CLIENT_TIMEOUT + 5)

    def _loop(self, kind: str) -> None:
        http = requests.Session()
        n = 0
        while not self.stopping.is_set():
            n += 1
            started = time.monotonic()
            try:
                if kind == "submit":
                    reply = http.post(
                        f"{self.base_url}/api/v1/tasks",
                        json={"title": f"load {n}", "labels": ["agent:code:python"]},
                        headers=self.headers,
                        timeout=CLIENT_TIMEOUT,
                    )
                elif kind in ("heartbeat", "dequeue"):
                    path, payload = (
                        ("agents/heartbeat", {"leases": []})
                        if kind == "heartbeat"
                        else ("tasks/dequeue", {"wait_secs": 0})
                    )
                    reply = http.post(
                        f"{self.base_url}/api/v1/{path}",
                        json=payload,
                        headers=self.agent_headers,
                        timeout=CLIENT_TIMEOUT,
                    )
                else:
                    reply = http.get(
                        f"{self.base_url}/api/v1/tasks?page_size=20",
                        headers=self.headers,
                        timeout=CLIENT_TIMEOUT,
                    )
                status, retry_after = reply.status_code, reply.headers.get("Retry-After")
                try:
                    body = reply.json() if reply.content else None
                except ValueError:
                    body = reply.text[:500]
            except requests.RequestException as error:
                status, body, retry_after = 0, repr(error), None
            call = Call(kind, started, time.monotonic(), status, body, retry_after)
            with self.lock:
                self.calls.append(call)

    def since(self, moment: float) -> list[Call]:
        """Calls that started after ``moment``."""
        with self.lock:
            return [c for c in self.calls if c.started > moment]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    with private_postgres() as server:
        yield server


@pytest.fixture
def api(private_pg: PrivatePostgres, tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """The API on a real threaded HTTP server over the private database: (base URL, admin
    token, agent token)."""
    from fleet_api.app import create_app

    url = private_pg.create_database("fleet")
    upgrade(url)
    env = {"FLEET_DATABASE_URL": url, "FLEET_ORCHESTRATOR_STATE_DIR": str(tmp_path / "state")}
    settings = load_settings(env=env)
    db = Database(url, pool_size=1)
    with db.session() as session:
        _, token = auth.mint(session, TokenKind.ADMIN, actor="test", name="restart")
        _, join = auth.mint(session, TokenKind.JOIN, actor="test", name="restart")
    db.dispose()
    app = create_app(settings, publisher=False)
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{http.server_port}"
    try:
        registered = requests.post(
            f"{base_url}/api/v1/agents/register",
            json={"join_token": join, "name": "restart", "host_uid": "restart"},
            timeout=CLIENT_TIMEOUT,
        )
        assert registered.status_code == 201, registered.text
        yield base_url, token, registered.json()["agent_token"]
    finally:
        http.shutdown()
        app.extensions["fleet"].db.dispose()


def _describe(calls: list[Call]) -> str:
    return "\n".join(
        f"  {c.kind} {c.status} in {c.seconds:.2f}s: {str(c.body)[:200]}" for c in calls[:10]
    )


def test_api_answers_503_during_a_database_outage_and_recovers(
    private_pg: PrivatePostgres, api: tuple[str, str, str]
) -> None:
    with Load(*api) as load:
        begin = time.monotonic()
        wait_for(
            lambda: sum(c.status in OK for c in load.since(begin)) >= 20,
            60,
            "20 successful requests before the outage",
        )
        before = load.since(begin)

        private_pg.stop()
        down = time.monotonic()
        wait_for(
            lambda: (
                set(KINDS) <= {c.kind for c in load.since(down) if c.status}
                and len(load.since(down)) >= 40
            ),
            60,
            "40 requests during the outage",
        )
        restarting = time.monotonic()
        private_pg.start()
        up = time.monotonic()

        def recovered() -> bool:
            return any(c.status in OK for c in load.since(up))

        wait_for(recovered, 30, "a successful request after PostgreSQL came back")
        first_ok = min(c.started for c in load.since(up) if c.status in OK)
        wait_for(lambda: len(load.since(first_ok)) >= 40, 60, "40 requests after recovery")

    bad_before = [c for c in before if c.status not in OK]
    assert not bad_before, "requests failed before the outage:\n" + _describe(bad_before)

    # Every request made while the server was down: started after it stopped, ended before
    # it was asked to start again.
    outage = [c for c in load.since(down) if c.ended < restarting]
    assert len(outage) >= 20
    wrong = [
        c
        for c in outage
        if c.status != 503
        or not isinstance(c.body, dict)
        or c.body.get("reason") != "database_unavailable"
        or c.body.get("code") != 503
        or not c.body.get("message")
    ]
    assert not wrong, "not a 503 database_unavailable during the outage:\n" + _describe(wrong)
    slow = [c for c in outage if c.seconds > OUTAGE_ANSWER_SECS]
    assert not slow, f"answers slower than {OUTAGE_ANSWER_SECS}s in the outage:\n" + _describe(slow)

    # Around the stop and the start a request may succeed or get a 503, never anything else,
    # and it too must answer promptly. Before and after, nothing may hang either.
    with load.lock:
        everything = list(load.calls)
    odd = [c for c in everything if c.status not in (*OK, 503)]
    assert not odd, "answers other than 2xx or 503 (0: no answer at all):\n" + _describe(odd)
    troubled = [c for c in everything if c.ended > down and c.started < first_ok]
    slow = [c for c in troubled if c.seconds > OUTAGE_ANSWER_SECS]
    assert not slow, f"slower than {OUTAGE_ANSWER_SECS}s around the outage:\n" + _describe(slow)

    after = load.since(first_ok)
    failed_after = [c for c in after if c.status not in OK]
    assert not failed_after, "requests failed after recovery:\n" + _describe(failed_after)
    print(
        f"{len(before)} calls before, {len(outage)} during the outage "
        f"(slowest {max(c.seconds for c in outage):.2f}s), recovered "
        f"{first_ok - up:.2f}s after PostgreSQL was up, {len(after)} calls after"
    )
