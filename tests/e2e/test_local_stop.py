"""Acceptance (issue #3), point 6: timeout, cancel and shutdown of local runs, through a worker.

A local host runs ``agent_script.py``, which starts a child in its process group and prints
both pids: a timeout kills the whole tree and fails the attempt ``timeout`` (retried while
retries remain), a cancel stops it within 5 s, and a worker stopped with SIGTERM takes nothing
new, lets a running task finish within the grace period, and stops one that outlasts the grace
(reported ``agent_lost``, so it is requeued).
"""

from __future__ import annotations

import datetime as dt
import re
import signal
import time
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import SQLITE, running_system
from tests.e2e.system import Proc, System, agent_pids, alive, local_host, script_agent

HOST = "local-e2e"
GRACE_SECS = 5
CANCEL_BOUND = 5.0


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    root = tmp_path_factory.mktemp("e2e-local")
    with running_system(
        root,
        SQLITE,
        hosts=[local_host(HOST, root, {"agent_type": "tree", "max_concurrency": 2})],
        agent_types={"tree": script_agent(E2E_CHILD=1)},
        # Quick retries and relays, so a retried attempt starts within seconds.
        orchestrator={
            "worker_shutdown_grace_secs": GRACE_SECS,
            "retry_backoff_base_secs": 1,
            "sweep_interval_secs": 1,
            "relay_after_secs": 1,
        },
    ) as running:
        running.start_beat()
        yield running


@pytest.fixture
def worker(system: System) -> Proc:
    """The host's worker: the one still running, or a new one."""
    for proc in reversed(system.processes):
        if proc.name == f"worker-{HOST}" and proc.running():
            return proc
    return system.start_worker(HOST)


def pids_once_running(system: System, task_id: str, attempt: int = 1) -> list[int]:
    """The agent's and its child's pid for ``attempt``, read from the live log."""

    def printed() -> list[str] | None:
        found = re.findall(r"e2e-pid=\d+ e2e-child=\d+", system.log(task_id))
        return found if len(found) >= attempt else None

    line = system.wait_for(printed, timeout=60, what=f"attempt {attempt} to start")[attempt - 1]
    return agent_pids(line)


def gone(system: System, pids: list[int], timeout: float) -> float:
    """Seconds until every pid is gone (fails after ``timeout``)."""
    started = time.monotonic()
    system.wait_for(
        lambda: not any(alive(p) for p in pids),
        timeout=timeout,
        what=f"processes {pids} to be gone",
        interval=0.05,
    )
    return time.monotonic() - started


def event_types(system: System, task_id: str) -> list[str]:
    return [e["type"] for e in system.events(task_id)]


def test_a_timeout_kills_the_tree_and_fails_the_task(system: System, worker: Proc) -> None:
    task = system.submit("slow", prompt="e2e-sleep=300", timeout_secs=2, max_retries=0)
    pids = pids_once_running(system, task["id"])
    failed = system.wait_status(task["id"], "failed", "completed", timeout=60)
    assert failed["status"] == "failed" and failed["failure_reason"] == "timeout", failed
    gone(system, pids, timeout=10)
    assert event_types(system, task["id"]) == ["created", "dispatched", "started", "failed"]


def test_a_timeout_with_a_retry_left_is_retried_then_fails(system: System, worker: Proc) -> None:
    task = system.submit("slow twice", prompt="e2e-sleep=300", timeout_secs=2, max_retries=1)
    first = pids_once_running(system, task["id"], attempt=1)
    second = pids_once_running(system, task["id"], attempt=2)
    assert not any(alive(p) for p in first), "the first attempt's tree outlived its timeout"
    failed = system.wait_status(task["id"], "failed", "completed", timeout=60)
    gone(system, second, timeout=10)
    assert failed["status"] == "failed" and failed["failure_reason"] == "timeout", failed
    assert failed["attempt"] == 2
    events = system.events(task["id"])
    assert [e["type"] for e in events] == [
        "created",
        "dispatched",
        "started",
        "attempt_failed",
        "dispatched",
        "started",
        "failed",
    ]
    assert events[3]["data"]["reason"] == "timeout" and events[3]["to_status"] == "queued"


def test_a_cancel_stops_the_running_tree_within_5_seconds(system: System, worker: Proc) -> None:
    task = system.submit("cancel me", prompt="e2e-sleep=300")
    pids = pids_once_running(system, task["id"])
    assert system.cancel(task["id"])["status"] == "cancelled"
    took = gone(system, pids, timeout=CANCEL_BOUND)
    print(f"\n[local] cancel -> process tree gone: {took:.2f}s")
    assert system.task(task["id"])["status"] == "cancelled"
    assert event_types(system, task["id"]) == ["created", "dispatched", "started", "cancelled"]


def shutting_down(worker: Proc) -> None:
    worker.signal(signal.SIGTERM)
    worker.wait_for_log("shutting down: no new tasks", timeout=30)


def test_sigterm_lets_a_running_task_finish_and_takes_nothing_new(
    system: System, worker: Proc
) -> None:
    running = system.submit("finish me", prompt="e2e-sleep=2")
    pids_once_running(system, running["id"])
    shutting_down(worker)
    queued = system.submit("too late", prompt="e2e-sleep=0")

    done = system.wait_status(running["id"], "completed", "failed", timeout=GRACE_SECS + 30)
    assert done["status"] == "completed", done
    assert worker.wait() == 0, worker.tail()
    assert event_types(system, running["id"]) == ["created", "dispatched", "started", "completed"]
    # The task submitted after the SIGTERM was never taken by the stopping worker.
    assert system.task(queued["id"])["status"] == "queued"
    assert event_types(system, queued["id"]) == ["created"]
    system.cancel(queued["id"])


def test_sigterm_stops_a_task_that_outlasts_the_grace_and_requeues_it(
    system: System, worker: Proc
) -> None:
    task = system.submit("outlast the grace", prompt="e2e-sleep=300")
    pids = pids_once_running(system, task["id"])
    shutting_down(worker)
    signalled = dt.datetime.now(dt.UTC)
    requeued = system.wait_status(task["id"], "queued", "failed", timeout=GRACE_SECS + 30)
    assert requeued["status"] == "queued" and requeued["attempt"] == 2, requeued
    assert requeued["failure_reason"] == "agent_lost", requeued
    gone(system, pids, timeout=10)
    assert worker.wait() == 0, worker.tail()
    events = system.events(task["id"])
    assert [e["type"] for e in events] == ["created", "dispatched", "started", "attempt_failed"]
    assert events[-1]["data"]["reason"] == "agent_lost"
    held = (dt.datetime.fromisoformat(events[-1]["at"]) - signalled).total_seconds()
    assert held >= GRACE_SECS - 1, f"stopped {held:.1f}s after SIGTERM, before the grace ended"
    system.cancel(task["id"])
