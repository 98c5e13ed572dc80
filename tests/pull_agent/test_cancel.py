"""Cancel: an operator cancels a running task; the daemon learns it from the reply to its
status/log posts (or a heartbeat) and stops the agent's process within 5 s; the task stays
``cancelled`` and the daemon goes on serving."""

from __future__ import annotations

import time

from tests.pull_agent.conftest import System
from tests.pull_agent.harness import process_gone


def test_cancel_stops_the_agent_within_5s_and_the_task_stays_cancelled(system: System) -> None:
    daemon = system.daemon("canceller")
    system.online(daemon)
    task_id = system.api.submit({"sleep": 120})
    runs = system.wait_for(lambda: system.runs(task_id), timeout=30, what="the agent started")
    pid = runs[0].pid
    system.wait_for(
        lambda: "probe: working" in system.api.log_text(task_id), timeout=30, what="its log"
    )

    cancelled_at = time.monotonic()
    assert system.api.post(f"/tasks/{task_id}/cancel")["status"] == "cancelled"
    system.wait_for(lambda: process_gone(pid), timeout=10, what="the agent process to stop")
    assert time.monotonic() - cancelled_at < 5

    # The daemon is free again: it takes and finishes the next task.
    follow_up = system.api.submit({"sleep": 0})
    system.wait_for(
        lambda: system.api.status(follow_up) == "completed", timeout=30, what="the next task"
    )
    assert system.api.status(task_id) == "cancelled"
    events = system.api.events(task_id)
    assert [e["type"] for e in events][-1] == "cancelled", events
    assert [r.end for r in system.runs(task_id)] == [None]  # killed, not finished
    assert daemon.alive


def test_a_cancel_task_command_stops_the_agent_and_the_task_stays_cancelled(
    system: System,
) -> None:
    daemon = system.daemon("commanded")
    agent_id = system.online(daemon)
    task_id = system.api.submit({"sleep": 120})
    runs = system.wait_for(lambda: system.runs(task_id), timeout=30, what="the agent started")

    sent_at = time.monotonic()
    command = system.api.command(agent_id, "cancel_task", task_id=task_id)
    system.wait_for(lambda: process_gone(runs[0].pid), timeout=10, what="the agent to stop")
    assert time.monotonic() - sent_at < 5
    system.wait_for(
        lambda: system.api.command_row(agent_id, command)["status"] == "completed",
        timeout=30,
        what="the command to complete",
    )
    assert system.api.command_row(agent_id, command)["result"] == {"cancelled": task_id}

    # Stopped for good: cancelled, not left to a lease expiry that would run it again.
    follow_up = system.api.submit({"sleep": 0})
    system.wait_for(
        lambda: system.api.status(follow_up) == "completed", timeout=30, what="the next task"
    )
    task = system.api.task(task_id)
    assert (task["status"], task["attempt"]) == ("cancelled", 1)
    assert len(system.runs(task_id)) == 1
