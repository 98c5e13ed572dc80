"""Acceptance (issue #3), point 4: a worker SIGKILLed mid-task loses nothing.

With the default heartbeat, lease and backoff settings, a worker killed while its agent runs
takes the agent and the processes it started with it (the worker's reaper), the attempt
fails ``agent_lost`` (or ``lease_expired``), and another worker retries the task and
completes it within 90 s. The agent writes a journal of its starts and ends: the two attempts
never overlap.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import POSTGRES, SystemFactory
from tests.e2e.system import agent_pids, alive, local_host, script_agent

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

RECOVERY_BOUND = 90.0


def journal(path: Path) -> Iterator[tuple[str, int, float, str]]:
    for line in path.read_text().splitlines():
        event, pid, at, task_id = line.split()
        yield event, int(pid), float(at), task_id


def test_a_killed_worker_takes_its_agent_along_and_the_task_is_retried_elsewhere(
    make_system: SystemFactory, tmp_path: Path
) -> None:
    journal_path = tmp_path / "journal.txt"
    slot = {"agent_type": "journaled", "capabilities": ["loss"], "max_concurrency": 1}
    system = make_system(
        POSTGRES,
        hosts=[local_host("doomed", tmp_path, slot), local_host("survivor", tmp_path, slot)],
        agent_types={"journaled": script_agent(E2E_JOURNAL=str(journal_path), E2E_CHILD=1)},
        # Defaults for heartbeats, leases, backoff and sweeps: nothing is tuned for speed.
    )
    doomed = system.start_worker("doomed", ready=False)
    system.start_beat()
    doomed.wait_for_log(" ready.")

    # The first attempt runs until it is killed; the retry is quick.
    prompt = "survive a crash\ne2e-first-sleep=600\ne2e-sleep=1"
    task = system.submit("survive a crash", prompt=prompt, labels=["agent:loss"])
    log = system.wait_log(task["id"], "e2e-child=", timeout=60)
    agent_pid, child_pid = agent_pids(log)
    assert system.task(task["id"])["status"] == "running"
    survivor = system.start_worker("survivor")
    assert system.task(task["id"])["status"] == "running"  # still on the doomed worker

    killed_at = time.time()
    doomed.kill()  # SIGKILL to the worker process alone
    system.wait_for(
        lambda: not alive(agent_pid) and not alive(child_pid),
        timeout=5,
        what="the agent and the process it started to die with their worker",
    )
    dead_at = time.time()

    done = system.wait_status(
        task["id"], "completed", "failed", timeout=RECOVERY_BOUND, what="the retry to complete"
    )
    recovered = time.time() - killed_at
    print(f"[kill] SIGKILL -> completed by another worker: {recovered:.1f}s")
    assert done["status"] == "completed", done
    assert done["attempt"] == 2
    assert recovered <= RECOVERY_BOUND

    hosts = {a["id"]: a["host_id"] for a in system.agents()}
    assert hosts[done["agent_id"]] == "survivor"
    events = system.events(task["id"])
    assert [e["type"] for e in events] == [
        "created",
        "dispatched",
        "started",
        "attempt_failed",
        "dispatched",
        "started",
        "completed",
    ]
    dispatched = [e for e in events if e["type"] == "dispatched"]
    assert [e["data"]["attempt"] for e in dispatched] == [1, 2]
    assert [hosts[e["actor"].removeprefix("agent:")] for e in dispatched] == ["doomed", "survivor"]
    assert events[3]["data"]["reason"] in ("agent_lost", "lease_expired")

    entries = list(journal(journal_path))
    assert [(e[0], e[3]) for e in entries] == [
        ("start", task["id"]),
        ("start", task["id"]),
        ("end", task["id"]),
    ]
    (_, first_pid, _, _), (_, second_pid, second_start, _), _ = entries
    assert first_pid == agent_pid and second_pid != agent_pid
    # The second attempt started only after the first one's process was gone.
    assert second_start > dead_at
    assert survivor.running()
