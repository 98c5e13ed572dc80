"""Both dispatch paths at once: two pull daemons and a Celery worker (``fleet worker``, on
Redis and PostgreSQL) serve one stream of tasks. Every task completes exactly once, and both
kinds of agents take some: a task goes to whichever capable agent takes it first."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pull_agent.conftest import System, running_system
from tests.pull_agent.harness import FAST, WorkerProcess
from tests.worker.conftest import scratch_redis_db

TASKS = 20
WORKER_HOST = """
[[hosts]]
host_id = "celery-1"
transport = "local"
work_dir = "{work_dir}"
agents = [{{ agent_type = "probe", max_concurrency = 2 }}]
"""


@pytest.fixture
def mixed(tmp_path: Path, pg_url: str) -> Iterator[tuple[System, WorkerProcess]]:
    with scratch_redis_db() as broker_url:
        host = WORKER_HOST.format(work_dir=tmp_path / "celery-work")
        with running_system(
            tmp_path, pg_url, publisher=None, config=host, FLEET_BROKER_URL=broker_url
        ) as system:
            env = {f"FLEET_ORCHESTRATOR_{k.upper()}": str(v) for k, v in FAST.items()}
            env.update(
                FLEET_CONFIG=str(system.config),
                FLEET_DATABASE_URL=pg_url,
                FLEET_BROKER_URL=broker_url,
                FLEET_ORCHESTRATOR_STATE_DIR=str(tmp_path / "worker-state"),
            )
            worker = WorkerProcess(tmp_path, "celery-1", env)
            try:
                yield system, worker
            finally:
                worker.stop()


def test_two_daemons_and_a_celery_worker_serve_one_stream(
    mixed: tuple[System, WorkerProcess],
) -> None:
    system, worker = mixed
    daemons = [system.daemon(f"puller-{n}", max_concurrency=2) for n in (1, 2)]
    pull_ids = {system.online(d): d for d in daemons}

    def worker_online() -> str:
        assert worker.alive, worker.tail()
        online = system.api.agents(mode="ssh_cli", status="online")
        return str(online[0]["id"]) if online else ""

    worker_agent = system.wait_for(worker_online, timeout=90, what="the Celery worker's agent")
    task_ids = [system.api.submit({"sleep": 0.5}) for _ in range(TASKS)]
    system.wait_for(
        lambda: system.api.all_done(task_ids),
        timeout=120,
        what=f"{TASKS} tasks completed",
    )

    process_of = {agent_id: d.pid for agent_id, d in pull_ids.items()}
    process_of[worker_agent] = worker.pid
    runs = Counter(r.task_id for r in system.runs())
    served = Counter()
    for task_id in task_ids:
        task = system.api.task(task_id)
        types = Counter(e["type"] for e in system.api.events(task_id))
        assert types["completed"] == 1 and types["dispatched"] == 1, (task_id, types)
        assert runs[task_id] == 1, (task_id, runs[task_id])  # the agent ran exactly once
        (run,) = system.runs(task_id)
        assert run.end is not None and run.ppid == process_of[task["agent_id"]]
        served["http_pull" if task["agent_id"] in pull_ids else "ssh_cli"] += 1
    assert set(served) == {"http_pull", "ssh_cli"}, served
    assert sum(served.values()) == TASKS
