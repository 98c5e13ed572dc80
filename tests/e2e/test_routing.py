"""Acceptance (issue #3), point 2: routing by capabilities across real workers.

Three hosts with different capabilities, a worker process for each, and a mixed stream of
tasks: every task runs on a host that can serve it, and a task never waits while a capable
slot is idle (sampled from the database while a slow demo agent keeps the slots busy).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import select

from fleet_common.agents.models import Agent
from fleet_common.db import utcnow
from fleet_common.tasks.models import ACTIVE, Task, TaskStatus
from tests.e2e.conftest import POSTGRES, SystemFactory
from tests.e2e.system import System, local_host

#: host id -> (capabilities, slots)
HOSTS = {
    "host-a": (["code:python"], 2),
    "host-b": (["code:rust", "tests"], 3),
    "host-c": ([], 2),
}
MIX = [
    ["agent:code:python"],
    ["agent:code:rust"],
    ["agent:tests"],
    ["agent:code:rust", "agent:tests", "docs"],
    ["docs"],  # no requirement: any host
]
TASKS = 30
AGENT_SECS = 1.0
#: A queued task may wait this long with a capable slot idle (wake-up, claim, process start).
MAX_IDLE_WAIT = 2.0


@dataclass
class Sampler:
    """Samples the database: per host, how many attempts run; and queued tasks that a host
    with a free slot could take (each such wait must end within MAX_IDLE_WAIT)."""

    system: System
    capabilities: dict[str, set[str]] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    waiting_since: dict[str, float] = field(default_factory=dict)
    worst_wait: float = 0.0
    violations: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            time.sleep(0.1)

    def sample(self) -> None:
        now, clock = utcnow(), time.monotonic()
        with self.system.db.session() as session:
            host_of = {a: h for a, h in session.execute(select(Agent.id, Agent.host_id))}
            rows = session.execute(
                select(Task.id, Task.status, Task.requirements, Task.agent_id, Task.not_before)
            ).all()
        active = dict.fromkeys(HOSTS, 0)
        for row in rows:
            if row.status in ACTIVE:
                active[str(host_of[row.agent_id])] += 1
        self.samples += 1
        for host, count in active.items():
            self.peak[host] = max(self.peak.get(host, 0), count)
            if count > HOSTS[host][1]:
                self.violations.append(f"{host} ran {count} attempts, over its capacity")
        for row in rows:
            eligible = row.status == TaskStatus.QUEUED and (
                row.not_before is None or row.not_before <= now
            )
            idle_capable = [
                host
                for host, (_, slots) in HOSTS.items()
                if active[host] < slots and set(row.requirements) <= self.capabilities[host]
            ]
            if eligible and idle_capable:
                since = self.waiting_since.setdefault(row.id, clock)
                self.worst_wait = max(self.worst_wait, clock - since)
                if clock - since > MAX_IDLE_WAIT:
                    self.violations.append(
                        f"{row.id} ({row.requirements}) queued {clock - since:.1f}s "
                        f"while {idle_capable} had a free slot"
                    )
            else:
                self.waiting_since.pop(row.id, None)


# On the production pair; the embedded default was measured the same way (peaks reached, longest
# wait 0.6 s) and is left out to keep this directory's run time down.
@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_tasks_run_only_on_capable_hosts_and_never_wait_for_an_idle_one(
    make_system: SystemFactory, tmp_path: Path
) -> None:
    backend_name = POSTGRES
    system = make_system(
        backend_name,
        hosts=[
            local_host(
                host,
                tmp_path,
                {"agent_type": "slow-demo", "capabilities": caps, "max_concurrency": slots},
            )
            for host, (caps, slots) in HOSTS.items()
        ],
        agent_types={
            "slow-demo": {
                "command": ["{python}", "-m", "fleet_worker.demo_agent", "{prompt_file}"],
                "env": {"FLEET_DEMO_SLEEP": str(AGENT_SECS)},
            }
        },
    )
    workers = [system.start_worker(host, ready=False) for host in HOSTS]
    for worker in workers:
        worker.wait_for_log(" ready.")

    sampler = Sampler(system, {host: set(caps) for host, (caps, _) in HOSTS.items()})
    thread = threading.Thread(target=sampler.run, name="e2e-sampler", daemon=True)
    thread.start()
    try:
        created = [
            system.submit(f"task {n}", prompt=f"task {n}", labels=MIX[n % len(MIX)])
            for n in range(TASKS)
        ]
        assert all(task["warnings"] == [] for task in created)
        ids = [task["id"] for task in created]

        def all_done() -> bool:
            with system.db.session() as session:
                statuses = session.scalars(select(Task.status).where(Task.id.in_(ids))).all()
            return all(status == TaskStatus.COMPLETED for status in statuses)

        system.wait_for(all_done, timeout=180, what="every task to complete", interval=0.3)
    finally:
        sampler.stop.set()
        thread.join(10)

    hosts = {agent["id"]: agent["host_id"] for agent in system.agents()}
    ran_on: dict[str, int] = dict.fromkeys(HOSTS, 0)
    for task_id in ids:
        task = system.task(task_id)
        host = hosts[task["agent_id"]]
        ran_on[host] += 1
        assert set(task["requirements"]) <= set(HOSTS[host][0]), (task, host)
        assert [e["type"] for e in system.events(task_id)] == [
            "created",
            "dispatched",
            "started",
            "completed",
        ]
    print(
        f"\n[{backend_name}] ran on {ran_on}; peak attempts {sampler.peak} in "
        f"{sampler.samples} samples; longest wait with a capable slot idle "
        f"{sampler.worst_wait:.2f}s"
    )
    assert not sampler.violations, "\n".join(sampler.violations[:20])
    assert sampler.samples > 20
    # Every host was kept as busy as its capacity allows while it had work queued.
    assert sampler.peak == {host: slots for host, (_, slots) in HOSTS.items()}
