"""Errors: the daemon backs off with jitter while the server is down (at first start, or at a
restart with its saved token) and registers or resumes once it answers; 429s are retried no
sooner than their ``Retry-After``; nothing crashes it."""

from __future__ import annotations

import itertools
import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fleet_common.auth import service as auth
from fleet_common.auth.models import TokenKind
from fleet_common.migrate import upgrade
from fleet_worker.pull_agent import state as agent_state
from fleet_worker.pull_agent.client import backoff
from fleet_worker.pull_agent.state import AgentState
from tests import services
from tests.api_helpers import wait_until
from tests.pull_agent.conftest import System, running_system
from tests.pull_agent.harness import DaemonProcess, write_config

RETRY = re.compile(r"fleet\.agent: (\S+) failed \(.*\); retrying in ([0-9.]+)s$", re.MULTILINE)


def retries(daemon: DaemonProcess, path: str) -> list[float]:
    """The delays the daemon announced before retrying ``path``."""
    return [float(m[2]) for m in RETRY.finditer(daemon.log()) if m[1] == path]


@pytest.fixture
def down_system(tmp_path: Path) -> Iterator[System]:
    """A system on SQLite whose API is not listening yet (``system.server.start()``)."""
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    upgrade(url)
    with running_system(tmp_path, url, port=services.free_port(), start=False) as system:
        yield system


def test_it_backs_off_with_jitter_until_the_server_answers_then_registers(
    down_system: System,
) -> None:
    system = down_system
    with system.db.session() as session:
        _, join_token = auth.mint(session, TokenKind.JOIN, actor="test")
    daemon = system.daemon("patient", join_token=join_token)

    delays = system.wait_for(
        lambda: len(retries(daemon, "agents/register")) >= 4 and retries(daemon, "agents/register"),
        timeout=60,
        what="four retries of the registration",
    )
    assert daemon.alive
    assert len(set(delays)) > 1, delays  # jitter: not one fixed delay
    assert all(d <= 0.5 * 2**n + 0.05 for n, d in enumerate(delays)), delays  # and growing caps

    system.server.start()
    agent_id = system.online(daemon, timeout=90)
    task_id = system.api.submit({"sleep": 0})
    system.wait_for(lambda: system.api.status(task_id) == "completed", timeout=30, what="a task")
    assert system.api.task(task_id)["agent_id"] == agent_id
    assert "Traceback" not in daemon.log()


def test_a_restart_waits_out_an_outage_longer_than_one_call_with_its_saved_token(
    down_system: System,
) -> None:
    system = down_system
    # What an earlier run of the daemon left: an agent registered, its token in agent.json.
    system.server.start()
    join = system.api.join_token()[1]
    body = {"join_token": join, "name": "resilient", "host_uid": "pull-resilient"}
    reply = system.api.call("POST", "/agents/register", json=body, expect=201).json()
    agent_id = reply["agent"]["id"]
    saved = AgentState("pull-resilient", system.url, agent_id, reply["agent_token"])
    agent_state.save(system.root / "agents" / "resilient", saved)
    system.server.stop()

    again = system.daemon("resilient", join_token=None)  # only the saved token

    def outlived_one_call() -> bool:
        assert again.alive, system.logs()  # it used to give up (traceback) after 5 s
        return sum(retries(again, "agents/heartbeat")) > 5.5

    system.wait_for(outlived_one_call, timeout=90, what="retries outliving one call's 5 s")

    system.server.start()
    assert system.online(again, timeout=90) == agent_id
    system.wait_for(lambda: "resumed as agent" in again.log(), timeout=30, what="the resume")
    assert "Traceback" not in again.log()


class FakeServer:
    """A server that rate-limits: its first ``refusals`` registrations and every dequeue get
    429 with ``Retry-After``; heartbeats (answered after ``heartbeat_secs``) and everything else
    succeed. It keeps the time of every request, by path, and of every heartbeat's answer
    (``agents/heartbeat:answered``)."""

    def __init__(
        self, refusals: int, register_after: int, dequeue_after: int, heartbeat_secs: float = 0
    ) -> None:
        self.refusals = refusals
        self.register_after = register_after
        self.dequeue_after = dequeue_after
        self.heartbeat_secs = heartbeat_secs
        self.calls: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                status, body, headers = fake.answer(self.path.removeprefix("/api/v1/"))
                data = json.dumps(body).encode()
                self.send_response(status)
                for key, value in {**headers, "Content-Type": "application/json"}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_port}"

    def times(self, path: str) -> list[float]:
        with self.lock:
            return list(self.calls.get(path, []))

    def answer(self, path: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self.lock:
            seen = self.calls.setdefault(path, [])
            seen.append(time.monotonic())
            count = len(seen)
        agent = {"id": "agt_fake", "name": "limited", "status": "online"}
        slow_down = {"code": 429, "status": "Too Many Requests", "message": "slow down"}
        if path == "agents/register":
            if count <= self.refusals:
                return 429, slow_down, {"Retry-After": str(self.register_after)}
            reply = {"agent": agent, "agent_token": "flt_fake", "heartbeat_interval_secs": 1}
            return 201, reply, {}
        if path == "tasks/dequeue":
            return 429, slow_down, {"Retry-After": str(self.dequeue_after)}
        if path == "agents/heartbeat":
            time.sleep(self.heartbeat_secs)
            with self.lock:
                self.calls.setdefault(f"{path}:answered", []).append(time.monotonic())
            return 200, {"agent": agent, "desired_state": "active", "commands": []}, {}
        return 200, agent, {}

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_429s_are_retried_after_retry_after_without_crashing(tmp_path: Path) -> None:
    fake = FakeServer(refusals=2, register_after=1, dequeue_after=2)
    config = write_config(tmp_path / "fleet.toml", tmp_path / "probe")
    daemon = DaemonProcess(tmp_path, fake.url, "limited", config=config, join_token="flj_x")
    try:
        wait_until(
            lambda: len(fake.times("tasks/dequeue")) >= 3,
            timeout=60,
            what="three dequeues",
            logs=daemon.tail,
        )
        registers = fake.times("agents/register")
        assert len(registers) == 3  # two refusals, then registered
        assert all(gap >= 0.95 for gap in gaps(registers)), gaps(registers)
        dequeues = fake.times("tasks/dequeue")
        assert all(gap >= 1.95 for gap in gaps(dequeues)), gaps(dequeues)
        assert len(fake.times("agents/heartbeat")) >= 2  # alive and heartbeating meanwhile
        assert daemon.alive
        assert daemon.state()["agent_token"] == "flt_fake"

        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, daemon.tail()
        assert fake.times("agents/deregister")
        assert "Traceback" not in daemon.log()
    finally:
        daemon.kill()
        fake.close()


def test_no_heartbeat_is_in_flight_when_it_deregisters(tmp_path: Path) -> None:
    # A heartbeat the server finishes after the deregistration would put the agent back online.
    fake = FakeServer(refusals=0, register_after=0, dequeue_after=1, heartbeat_secs=2)
    config = write_config(tmp_path / "fleet.toml", tmp_path / "probe")
    daemon = DaemonProcess(tmp_path, fake.url, "leaving", config=config, join_token="flj_x")
    try:
        wait_until(
            lambda: fake.times("agents/heartbeat:answered"),
            timeout=60,
            what="a heartbeat",
            logs=daemon.tail,
        )
        heartbeats = len(fake.times("agents/heartbeat"))
        wait_until(
            lambda: len(fake.times("agents/heartbeat")) > heartbeats,
            timeout=30,
            what="the next heartbeat to be on its way",
            logs=daemon.tail,
        )
        daemon.signal(signal.SIGTERM)  # while the server is still answering that heartbeat
        assert daemon.wait(30) == 0, daemon.tail()
        wait_until(
            lambda: (
                len(fake.times("agents/heartbeat:answered")) == len(fake.times("agents/heartbeat"))
            ),
            timeout=10,
            what="every heartbeat answered",
        )
        (deregistered,) = fake.times("agents/deregister")
        answered = fake.times("agents/heartbeat:answered")
        assert all(t < deregistered for t in answered), (answered, deregistered)
    finally:
        daemon.kill()
        fake.close()


def test_backoff_stays_bounded_after_any_number_of_failures() -> None:
    # A daemon retries forever while its server is down; hours of failures must not overflow.
    assert all(0 <= backoff(n) <= 30 for n in (0, 1, 10, 1100, 10**6))
    assert max(backoff(0) for _ in range(200)) <= 0.5
