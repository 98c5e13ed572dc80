"""Acceptance (issue #3), point 1: a task goes from the API to a worker and back, end to end.

On PostgreSQL + Redis and on the embedded default (SQLite + the filesystem broker), against a
real HTTP API, a real ``fleet worker`` process and the built-in demo agent; and ``fleet up``
as a newcomer runs it, in an empty folder.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
import requests

from fleet_worker.publisher import DISPATCH_TASK
from tests import services
from tests.e2e.conftest import BACKENDS, SystemFactory
from tests.e2e.system import Proc, alive, clean_environ, descendants, fleet_argv, local_host

#: Ceiling for one demo task; typical runs take well under a second once the worker is up.
TASK_TIMEOUT = 60.0


def seconds_between(start: str, end: str) -> float:
    return (dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds()


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_task_submitted_to_the_api_is_run_by_a_worker(
    make_system: SystemFactory, tmp_path: Path, backend_name: str
) -> None:
    system = make_system(
        backend_name,
        hosts=[local_host("e2e-host", tmp_path, {"agent_type": "demo", "max_concurrency": 2})],
        agent_types={},
    )
    worker = system.start_worker("e2e-host")

    started = time.monotonic()
    created = system.submit("Say hello", prompt="Write a greeting\nto the whole team")
    assert created["status"] == "queued" and created["warnings"] == []
    task = system.wait_status(created["id"], "completed", "failed", timeout=TASK_TIMEOUT)
    elapsed = time.monotonic() - started
    assert task["status"] == "completed", task

    events = system.events(task["id"])
    assert [e["type"] for e in events] == ["created", "dispatched", "started", "completed"]
    assert [e["to_status"] for e in events] == ["queued", "dispatched", "running", "completed"]

    (agent,) = [a for a in system.agents() if a["id"] == task["agent_id"]]
    assert agent["host_id"] == "e2e-host" and agent["mode"] == "ssh_cli"

    log = system.log(task["id"])
    assert f"demo-agent: task {task['id']}: read a prompt" in log
    assert "demo-agent: wrote the receipt" in log and "demo-agent: done" in log

    receipt = task["receipt"]
    assert receipt["exit_code"] == 0 and receipt["agent_version"] == "fleet-demo 1"
    assert "Write a greeting" in receipt["summary"]
    # The workspace is removed after success (cleanup = on_success).
    assert not (tmp_path / "work" / "e2e-host" / task["id"]).exists()
    # One line per attempt in the worker's log, Fleet's; not Celery's per wake-up message.
    worker.wait_for_log(f"task {task['id']} attempt 1: succeeded", timeout=10)
    assert f"{DISPATCH_TASK}[" not in worker.log(), worker.tail()

    print(
        f"\n[{backend_name}] submit -> completed: {elapsed:.3f}s measured by the client; "
        f"created -> dispatched {seconds_between(task['created_at'], task['dispatched_at']):.3f}s, "
        f"created -> finished {seconds_between(task['created_at'], task['finished_at']):.3f}s"
    )


def _group(pgid: int) -> set[int]:
    """Live processes in process group ``pgid``."""
    members = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.add(int(entry))
    return members


@pytest.mark.slow
def test_fleet_up_runs_a_submitted_task_and_stops_cleanly(tmp_path: Path) -> None:
    port = services.free_port()
    url = f"http://127.0.0.1:{port}"
    env = clean_environ()
    up = Proc("fleet-up", fleet_argv("up", "--port", str(port)), env, tmp_path, tmp_path / "up.log")
    try:
        token_file = tmp_path / ".fleet" / "admin-token"

        def api_ready() -> bool:
            if up.proc.poll() is not None:
                pytest.fail(f"fleet up exited\n{up.tail()}")
            try:
                return requests.get(f"{url}/healthz", timeout=5).status_code == 200
            except requests.RequestException:
                return False

        deadline = time.monotonic() + 120
        while not api_ready():
            assert time.monotonic() < deadline, f"the API never answered\n{up.tail()}"
            time.sleep(0.2)
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}

        def local_agent_online() -> bool:
            reply = requests.get(f"{url}/api/v1/agents", headers=headers, timeout=10)
            return any(a["host_id"] == "local" and a["status"] == "online" for a in reply.json())

        deadline = time.monotonic() + 120
        while not local_agent_online():
            assert time.monotonic() < deadline, f"no local worker came up\n{up.tail()}"
            time.sleep(0.2)

        started = time.monotonic()
        submitted = subprocess.run(
            [*fleet_argv("task", "submit", "Say hello", "--prompt", "Write a greeting"), "--json"],
            cwd=tmp_path,
            env={**env, "FLEET_SERVER": url},  # no token: ./.fleet/admin-token is used
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert submitted.returncode == 0, submitted.stderr
        task_id = json.loads(submitted.stdout)["id"]

        task = {"status": "queued"}
        deadline = time.monotonic() + TASK_TIMEOUT
        while task["status"] not in ("completed", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"task still {task['status']}\n{up.tail()}"
            time.sleep(0.1)
            reply = requests.get(f"{url}/api/v1/tasks/{task_id}", headers=headers, timeout=10)
            task = reply.json()
        elapsed = time.monotonic() - started
        assert task["status"] == "completed", up.tail()
        print(
            f"\n[fleet up] submit (CLI process) -> completed: {elapsed:.3f}s; created -> "
            f"finished {seconds_between(task['created_at'], task['finished_at']):.3f}s"
        )

        tree = descendants(up.pid)
        assert len(tree) >= 3, tree  # the API, the worker and beat at least
        stopping = time.monotonic()
        up.signal(signal.SIGTERM)
        assert up.wait(90) == 0, up.tail()
        print(f"[fleet up] SIGTERM -> exited: {time.monotonic() - stopping:.1f}s")
        deadline = time.monotonic() + 10  # reaped children vanish from /proc promptly
        left = {p for p in tree if alive(p)} | _group(up.pid)
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = {p for p in tree if alive(p)} | _group(up.pid)
        assert not left, f"processes left after fleet up stopped: {sorted(left)}\n{up.tail()}"
    finally:
        up.cleanup()
