"""Acceptance (issue #3), point 3: tasks run over SSH through a real worker.

A ``transport = "ssh"`` host points at the real sshd the tests start on loopback (generated
host and user keys, a known_hosts file). The agent is the demo agent run remotely as
``agent_script.py`` (which prints its pid): its log streams while it runs, a timeout and a
cancel kill the remote process, and a host whose key is not in known_hosts is refused with a
clear error.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import SQLITE, running_system
from tests.e2e.system import System, agent_pids, alive, ancestors, script_agent
from tests.sshd import SSHServer

pytestmark = pytest.mark.sshd

CANCEL_BOUND = 5.0  # the spec: a cancel stops a running task within 5 s, local or remote


def ssh_host(server: SSHServer, host_id: str, work_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "host_id": host_id,
        "transport": "ssh",
        "hostname": server.hostname,
        "ssh_port": server.port,
        "ssh_user": server.user,
        "ssh_key_path": str(server.client_key),
        "known_hosts": str(server.known_hosts),
        "work_dir": str(work_dir),
        "connect_timeout_secs": 5,
        "keepalive_secs": 5,
        **extra,
    }


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, sshd_server: SSHServer) -> Iterator[System]:
    root = tmp_path_factory.mktemp("e2e-ssh")
    empty_known_hosts = root / "empty_known_hosts"
    empty_known_hosts.write_text("")
    agents = [{"agent_type": "remote", "capabilities": ["ssh"], "max_concurrency": 3}]
    stranger = [{"agent_type": "remote", "capabilities": ["ssh-stranger"], "max_concurrency": 1}]
    with running_system(
        root,
        SQLITE,
        hosts=[
            ssh_host(sshd_server, "ssh-host", root / "remote-work", agents=agents),
            ssh_host(
                sshd_server,
                "ssh-stranger",
                root / "stranger-work",
                known_hosts=str(empty_known_hosts),
                accept_unknown_host_key=False,
                agents=stranger,
            ),
        ],
        agent_types={"remote": script_agent(E2E_CHILD=1)},
    ) as running:
        workers = [running.start_worker(h, ready=False) for h in ("ssh-host", "ssh-stranger")]
        for worker in workers:
            worker.wait_for_log(" ready.")
        yield running


def running_pids(system: System, task_id: str, *, still_running: bool = True) -> list[int]:
    """Once the task runs: the remote agent's pid and its child's, read from the live log."""
    log = system.wait_log(task_id, "e2e-child=", timeout=60)
    if still_running:
        assert system.task(task_id)["status"] == "running"
    return agent_pids(log)


def test_a_task_runs_over_ssh_and_its_log_streams_while_it_runs(system: System) -> None:
    task = system.submit("remote", prompt="Greet over SSH\ne2e-sleep=6", labels=["agent:ssh"])
    agent_pid, child_pid = running_pids(system, task["id"])
    # Streamed: the log already shows the agent thinking while the task is still running.
    log = system.wait_log(task["id"], "thinking for 6 s", timeout=30)
    assert "demo-agent: done" not in log
    assert system.task(task["id"])["status"] == "running"
    # It runs under sshd (a session of its own), not as a child of the worker.
    chain = ancestors(agent_pid)
    assert any(name == "sshd" for _, name in chain), chain
    worker_pids = {p.pid for p in system.processes}
    assert not worker_pids & {pid for pid, _ in chain}, chain

    done = system.wait_status(task["id"], "completed", "failed", timeout=60)
    assert done["status"] == "completed", done
    assert done["receipt"]["agent_version"] == "fleet-demo 1"
    assert "Greet over SSH" in done["receipt"]["summary"]
    log = system.log(task["id"])
    assert "[fleet] agent: " in log and "demo-agent: done" in log
    types = [e["type"] for e in system.events(task["id"])]
    assert types == ["created", "dispatched", "started", "completed"]
    assert not alive(agent_pid) and not alive(child_pid)


def test_a_timeout_kills_the_remote_process_tree(system: System) -> None:
    task = system.submit(
        "remote timeout",
        prompt="Take too long\ne2e-sleep=300",
        labels=["agent:ssh"],
        timeout_secs=3,
        max_retries=0,
    )
    pids = running_pids(system, task["id"], still_running=False)  # a 3 s timeout: maybe not
    failed = system.wait_status(task["id"], "failed", "completed", timeout=60)
    assert failed["status"] == "failed" and failed["failure_reason"] == "timeout", failed
    system.wait_for(
        lambda: not any(alive(pid) for pid in pids),
        timeout=10,
        what=f"the remote processes {pids} to be gone",
    )
    types = [e["type"] for e in system.events(task["id"])]
    assert types == ["created", "dispatched", "started", "failed"]


def test_a_cancel_kills_the_remote_process_within_5_seconds(system: System) -> None:
    task = system.submit("remote cancel", prompt="e2e-sleep=300", labels=["agent:ssh"])
    pids = running_pids(system, task["id"])
    asked = time.monotonic()
    assert system.cancel(task["id"])["status"] == "cancelled"
    system.wait_for(
        lambda: not any(alive(pid) for pid in pids),
        timeout=CANCEL_BOUND,
        what=f"the remote processes {pids} to be stopped by the cancel",
        interval=0.05,
    )
    print(f"\n[ssh] cancel -> remote process gone: {time.monotonic() - asked:.2f}s")
    assert system.task(task["id"])["status"] == "cancelled"
    types = [e["type"] for e in system.events(task["id"])]
    assert types == ["created", "dispatched", "started", "cancelled"]


def test_an_unknown_host_key_fails_the_attempt_with_a_clear_error(system: System) -> None:
    task = system.submit(
        "stranger", prompt="never runs", labels=["agent:ssh-stranger"], max_retries=0
    )
    failed = system.wait_status(task["id"], "failed", "completed", timeout=60)
    assert failed["status"] == "failed", failed
    error = failed["last_error"]
    assert "unknown" in error and "host key" in error, error
    assert "empty_known_hosts" in error and "accept_unknown_host_key" in error, error
    # Nothing ran: no workspace was made on the host.
    assert not (system.root / "stranger-work" / task["id"]).exists()
    print(f"\n[ssh] unknown host key: {failed['failure_reason']}: {error}")
