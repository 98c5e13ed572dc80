"""Drain and resume through a real worker: a drained slot takes nothing, and once resumed it
takes what was queued meanwhile at once, not when the relay next re-sends its wake-up (the
relay is off here: no beat runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import BACKENDS, SystemFactory
from tests.e2e.system import System, local_host

TASK_TIMEOUT = 60.0


def obeyed(system: System, agent_id: str, command_id: str) -> bool:
    commands = system.ok("GET", f"/agents/{agent_id}/commands")
    return any(c["id"] == command_id and c["status"] == "completed" for c in commands)


def command(system: System, agent_id: str, kind: str) -> None:
    """Send ``kind`` and wait until the worker, heartbeating for the agent, carried it out."""
    sent = system.ok("POST", f"/agents/{agent_id}/commands", json={"kind": kind})
    system.wait_for(
        lambda: obeyed(system, agent_id, sent["id"]), timeout=30, what=f"the worker to {kind}"
    )


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_resumed_slot_takes_the_task_queued_while_it_was_drained(
    make_system: SystemFactory, tmp_path: Path, backend_name: str
) -> None:
    system = make_system(
        backend_name,
        hosts=[local_host("resume-host", tmp_path, {"agent_type": "demo", "max_concurrency": 1})],
        agent_types={},
        orchestrator={"heartbeat_interval_secs": 1, "relay_after_secs": 3600},
    )
    system.start_worker("resume-host")
    [agent] = [a for a in system.agents() if a["host_id"] == "resume-host"]
    command(system, agent["id"], "drain")

    queued = system.submit("queued while drained")
    # Its wake-up found the slot drained; two heartbeats later it still waits.
    seen = system.ok("GET", f"/agents/{agent['id']}")["last_heartbeat_at"]

    def heartbeats_after(since: str, count: int) -> Any:
        beats: list[str] = [since]

        def newer() -> bool:
            now = system.ok("GET", f"/agents/{agent['id']}")["last_heartbeat_at"]
            if now != beats[-1]:
                beats.append(now)
            return len(beats) > count

        return newer

    system.wait_for(heartbeats_after(seen, 2), timeout=30, what="two more heartbeats")
    assert system.task(queued["id"])["status"] == "queued"

    command(system, agent["id"], "resume")
    task = system.wait_status(queued["id"], "completed", "failed", timeout=TASK_TIMEOUT)
    assert task["status"] == "completed" and task["agent_id"] == agent["id"]
