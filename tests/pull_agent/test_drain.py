"""Draining: the ``drain`` command lets the running task finish, takes nothing new while the
daemon keeps heartbeating, and completes with ``{"drained": true}``; ``resume`` takes work
again. SIGTERM drains and exits 0, deregistered; a second SIGTERM stops a long task and
reports it ``agent_lost`` so it is retried."""

from __future__ import annotations

import signal
import time

from tests.pull_agent.conftest import System
from tests.pull_agent.harness import process_gone


def test_drain_finishes_the_running_task_takes_nothing_new_and_resume_takes_again(
    system: System,
) -> None:
    daemon = system.daemon("drainee")
    agent_id = system.online(daemon)
    running = system.api.submit({"sleep": 3})
    system.wait_for(lambda: system.runs(running), timeout=30, what="the first task to start")

    drain = system.api.command(agent_id, "drain")
    waiting = system.api.submit({"sleep": 0})
    system.wait_for(
        lambda: system.api.command_row(agent_id, drain)["status"] == "completed",
        timeout=30,
        what="the drain command to complete",
    )
    command = system.api.command_row(agent_id, drain)
    assert (command["success"], command["result"]) == (True, {"drained": True})
    assert system.api.status(running) == "completed"  # finished before the drain completed

    # Drained: heartbeats go on (online, last_heartbeat_at moves) and nothing is taken.
    seen = {system.api.agent(agent_id)["last_heartbeat_at"]}

    def heartbeats() -> bool:
        seen.add(system.api.agent(agent_id)["last_heartbeat_at"])
        return len(seen) >= 4

    system.wait_for(heartbeats, timeout=30, what="three more heartbeats")
    agent = system.api.agent(agent_id)
    assert (agent["status"], agent["desired_state"]) == ("online", "draining")
    assert system.api.status(waiting) == "queued"
    assert len(system.runs()) == 1

    resume = system.api.command(agent_id, "resume")
    system.wait_for(
        lambda: system.api.status(waiting) == "completed", timeout=30, what="the queued task"
    )
    assert system.api.command_row(agent_id, resume)["status"] == "completed"
    assert system.api.agent(agent_id)["desired_state"] == "active"
    assert system.api.task(waiting)["agent_id"] == agent_id


def test_sigterm_finishes_the_running_task_then_exits_0_deregistered(system: System) -> None:
    daemon = system.daemon("terminated")
    agent_id = system.online(daemon)
    running = system.api.submit({"sleep": 2.5})
    system.wait_for(lambda: system.runs(running), timeout=30, what="the task to start")

    daemon.signal(signal.SIGTERM)
    later = system.api.submit({"sleep": 0})
    assert daemon.wait(60) == 0, system.logs()

    assert system.api.status(running) == "completed"
    assert [r.end is not None for r in system.runs(running)] == [True]
    assert system.api.status(later) == "queued"
    assert [e["type"] for e in system.api.events(later)] == ["created"]
    assert system.api.agent(agent_id)["status"] == "offline"


def test_a_second_sigterm_stops_a_long_task_and_reports_it_lost(system: System) -> None:
    daemon = system.daemon("impatient")
    system.online(daemon)
    task_id = system.api.submit({"sleep": 120})
    runs = system.wait_for(lambda: system.runs(task_id), timeout=30, what="the task to start")

    daemon.signal(signal.SIGTERM)
    system.wait_for(lambda: "draining" in daemon.log(), timeout=30, what="the drain to begin")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0, system.logs()
    assert process_gone(runs[0].pid)

    task = system.api.task(task_id)
    assert (task["status"], task["attempt"], task["failure_reason"]) == (
        "queued",
        2,
        "agent_lost",
    )
    last = system.api.events(task_id)[-1]
    assert (last["type"], last["data"]["reason"]) == ("attempt_failed", "agent_lost")


def test_an_idle_daemon_exits_promptly_on_sigterm(system: System) -> None:
    daemon = system.daemon("idle")
    agent_id = system.online(daemon)
    # Idle, it waits in a long-poll (registered: its first dequeue is on its way); a SIGTERM
    # must not have to wait for a long one to run out.
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0, system.logs()
    assert time.monotonic() - started < 12  # a 5 s poll at most, not the 20 s it was
    assert system.api.agent(agent_id)["status"] == "offline"
