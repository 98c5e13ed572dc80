"""One worker per configured host: a second ``fleet worker`` for a host that a running worker
serves refuses to start (exit 1, naming the holder), and the first worker's running attempt
is untouched (a second worker's start would otherwise fail it as a leftover of its host);
once the first worker is gone, a new one serves the host. Both backends."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import BACKENDS, SystemFactory
from tests.e2e.system import local_host, script_agent

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_second_worker_for_a_served_host_refuses_to_start(
    make_system: SystemFactory, tmp_path: Path, backend_name: str
) -> None:
    slot = {"agent_type": "script", "capabilities": ["solo"], "max_concurrency": 1}
    system = make_system(
        backend_name,
        hosts=[local_host("solo", tmp_path, slot)],
        agent_types={"script": script_agent()},
    )
    first = system.start_worker("solo")
    task = system.submit("hold the slot", prompt="e2e-sleep=600", labels=["agent:solo"])
    system.wait_status(task["id"], "running", timeout=60, what="the first attempt to run")

    second = system.start_worker("solo", ready=False)
    assert second.wait(timeout=60) == 1
    assert "host 'solo' is already served by another worker (fleet worker solo" in second.log()
    running = system.task(task["id"])
    assert (running["status"], running["attempt"]) == ("running", 1)
    assert [e["type"] for e in system.events(task["id"])] == ["created", "dispatched", "started"]

    first.kill()  # its lock goes with it
    third = system.start_worker("solo")  # waits for " ready."
    assert third.running()
