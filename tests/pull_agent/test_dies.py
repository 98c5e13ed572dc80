"""A daemon SIGKILLed mid-task loses nothing: its agent process dies with it, the lease runs
out (or the agent is found lost), and the task is retried and completed by another daemon."""

from __future__ import annotations

import signal

from tests.pull_agent.conftest import System
from tests.pull_agent.harness import process_gone


def test_a_daemon_killed_mid_task_loses_nothing(system: System) -> None:
    doomed = system.daemon("doomed")
    doomed_id = system.online(doomed)
    task_id = system.api.submit({"sleep": 3})
    runs = system.wait_for(lambda: system.runs(task_id), timeout=30, what="the first attempt")
    assert runs[0].ppid == doomed.pid

    doomed.signal(signal.SIGKILL)
    doomed.wait(10)
    # The agent's process dies with its daemon (its reaper): nothing runs unseen.
    system.wait_for(lambda: process_gone(runs[0].pid), timeout=5, what="the orphaned agent")

    rescuer = system.daemon("rescuer")
    rescuer_id = system.online(rescuer)
    system.wait_for(
        lambda: system.api.status(task_id) == "completed", timeout=60, what="the retried task"
    )
    task = system.api.task(task_id)
    assert (task["agent_id"], task["attempt"]) == (rescuer_id, 2)
    events = system.api.events(task_id)
    types = [e["type"] for e in events]
    assert types == [
        "created",
        "dispatched",
        "started",
        "attempt_failed",
        "dispatched",
        "started",
        "completed",
    ], types
    assert events[1]["actor"] == f"agent:{doomed_id}"
    assert events[3]["data"]["reason"] in ("lease_expired", "agent_lost")
    assert events[4]["actor"] == f"agent:{rescuer_id}"
    assert [r.end is not None for r in system.runs(task_id)] == [False, True]
