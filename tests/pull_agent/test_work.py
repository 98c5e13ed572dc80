"""A daemon long-polls, runs the agent, streams its log while it runs, reports the receipt;
with ``--max-concurrency 2`` it runs two attempts at once, never three."""

from __future__ import annotations

import pytest

from tests.pull_agent.conftest import System
from tests.pull_agent.harness import max_overlap


@pytest.mark.parametrize("system", ["sqlite", "postgres"], indirect=True)
def test_a_task_runs_with_a_live_log_and_completes(system: System) -> None:
    daemon = system.daemon("worker-1", agent_type="slowdemo")
    agent_id = system.online(daemon)
    task_id = system.api.submit("Write a greeting\n\nin French")

    # While the demo agent thinks (3 s), the task is running and its log is already stored.
    def live_log() -> bool:
        task = system.api.task(task_id)
        assert task["status"] in ("queued", "dispatched", "running"), task
        return task["status"] == "running" and "thinking for 3 s" in system.api.log_text(task_id)

    system.wait_for(live_log, timeout=30, what="the log of the running task")
    system.wait_for(
        lambda: system.api.status(task_id) == "completed", timeout=30, what="completion"
    )
    task = system.api.task(task_id)
    assert task["agent_id"] == agent_id
    assert task["receipt"]["exit_code"] == 0
    assert "Write a greeting" in task["receipt"]["summary"]
    events = system.api.events(task_id)
    assert [e["type"] for e in events] == ["created", "dispatched", "started", "completed"]
    assert events[1]["actor"] == f"agent:{agent_id}"
    assert events[1]["data"]["mode"] == "http_pull"
    log = system.api.log_text(task_id)
    assert "demo-agent: done" in log and "agent exited with code 0" in log
    # Cleanup on success: the workspace is gone.
    assert not (daemon.state_dir / "work" / task_id).exists()
    assert daemon.alive


def test_max_concurrency_two_runs_two_at_once_and_never_three(system: System) -> None:
    daemon = system.daemon("worker-2", max_concurrency=2)
    system.online(daemon)
    task_ids = [system.api.submit({"sleep": 1.5}) for _ in range(5)]
    system.wait_for(lambda: system.api.all_done(task_ids), timeout=60, what="five tasks done")

    runs = system.runs()
    assert sorted(r.task_id for r in runs) == sorted(task_ids)  # each ran once
    assert all(r.end is not None and r.ppid == daemon.pid for r in runs)
    assert max_overlap(runs) == 2, [(r.start, r.end) for r in runs]
