"""32 processes claim 2,000 tasks at once: every task is claimed exactly once.

Each racer is its own OS process with its own engine and connections and its own registered
agent (``http_pull``, via a join token), calling ``claim_next`` in a loop until nothing is left.
The tasks mix requirement keys, priorities and assignments so the claim walks several index
heads per call, as it does in production.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from sqlalchemy import func, select

from fleet_common.agents import service as agents
from fleet_common.auth import service as auth
from fleet_common.auth.models import TokenKind
from fleet_common.db import Database
from fleet_common.tasks import replay
from fleet_common.tasks.models import Task, TaskEvent
from tests.concurrency.racers import RACERS, Race, RacerPool, claimer, racer_settings
from tests.concurrency.seed import TaskSpec, queue_tasks

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

TASKS = 2_000
CAPABILITIES = ["code:python", "tests"]
LABEL_SETS = [[], ["agent:code:python"], ["agent:tests"], ["agent:code:python", "agent:tests"]]


def _register(db: Database, count: int, max_concurrency: int) -> list[str]:
    ids = []
    with db.session() as session:
        for n in range(count):
            _, join = auth.mint(session, TokenKind.JOIN, actor="test", ttl_secs=600)
            body = {
                "join_token": join,
                "name": f"racer-{n}",
                "host_uid": f"racer-{n}",
                "capabilities": CAPABILITIES,
                "max_concurrency": max_concurrency,
            }
            ids.append(agents.register(session, body).agent.id)
    return ids


def _queue_tasks(
    db: Database, url: str, agent_ids: list[str], created: dict[str, str | None]
) -> None:
    """Queue TASKS tasks of mixed requirements and priorities; two per agent are assigned to
    it. Fills ``created`` with task id → assigned agent."""
    rng = random.Random(7)
    assigned = [agent_id for agent_id in agent_ids for _ in range(2)]
    specs = [
        TaskSpec(
            f"task {n}",
            labels=rng.choice(LABEL_SETS),
            priority=rng.randint(0, 3),
            assigned_agent_id=assigned[n] if n < len(assigned) else None,
        )
        for n in range(TASKS)
    ]
    ids = queue_tasks(db, racer_settings(url), specs)
    created.update(
        {task_id: spec.assigned_agent_id for task_id, spec in zip(ids, specs, strict=True)}
    )


def _dispatched_events(db: Database) -> Counter[str]:
    with db.session() as session:
        rows = session.execute(
            select(TaskEvent.task_id, func.count())
            .where(TaskEvent.type == "dispatched")
            .group_by(TaskEvent.task_id)
        )
        return Counter({task_id: count for task_id, count in rows})


def _rows(db: Database) -> dict[str, tuple[str, str | None]]:
    with db.session() as session:
        return {
            task_id: (status, agent_id)
            for task_id, status, agent_id in session.execute(
                select(Task.id, Task.status, Task.agent_id)
            )
        }


def _check_exactly_once(
    db: Database, result: Race, created: dict[str, str | None], agent_of: dict[str, str]
) -> None:
    claimed = result.ids
    duplicates = [task_id for task_id, n in Counter(claimed).items() if n > 1]
    assert not duplicates, f"{len(duplicates)} tasks claimed twice, e.g. {duplicates[:5]}"
    assert set(claimed) == set(created), f"{len(set(created) - set(claimed))} tasks never claimed"
    violations = [v for r in result.results for v in r.violations]
    assert not violations, f"{len(violations)} broken invariants, e.g. {violations[:5]}"

    events = _dispatched_events(db)
    assert set(events) == set(created)
    assert {n for n in events.values()} == {1}, "a task has more than one dispatched event"

    rows = _rows(db)
    claimer_of = {task_id: agent_of[r.name] for r in result.results for task_id in r.ids}
    for task_id, assigned_to in created.items():
        _status, agent_id = rows[task_id]
        assert agent_id == claimer_of[task_id], f"{task_id} held by {agent_id}"
        if assigned_to is not None:
            assert agent_id == assigned_to, f"{task_id} was assigned to {assigned_to}"
    busy = [r for r in result.results if r.ids]
    assert len(busy) > 1, "only one racer ever claimed anything: nothing raced"


def test_32_processes_claim_each_task_once(fresh_pg: str, racers: RacerPool) -> None:
    db = Database(fresh_pg, pool_size=2)
    try:
        # Capacity is no limit here: every racer claims as fast as it can.
        agent_ids = _register(db, RACERS, max_concurrency=TASKS * 10)
        agent_of = {f"racer-{n}": agent_id for n, agent_id in enumerate(agent_ids)}
        created: dict[str, str | None] = {}
        result = racers.race(
            claimer,
            [(name, fresh_pg, agent_id, False) for name, agent_id in agent_of.items()],
            setup=lambda: _queue_tasks(db, fresh_pg, agent_ids, created),
            timeout=120,
        )
        print(result.summary())
        _check_exactly_once(db, result, created, agent_of)
        assert {status for status, _ in _rows(db).values()} == {"dispatched"}
    finally:
        db.dispose()


def test_claim_and_complete_two_processes_per_agent(fresh_pg: str, racers: RacerPool) -> None:
    """Two processes share each agent of capacity 1: a claim must never overrun it, and every
    task goes queued → dispatched → completed exactly once, consistently with its log."""
    db = Database(fresh_pg, pool_size=2)
    try:
        agent_ids = _register(db, RACERS // 2, max_concurrency=1)
        agent_of = {f"racer-{n}": agent_ids[n // 2] for n in range(RACERS)}
        created: dict[str, str | None] = {}
        result = racers.race(
            claimer,
            [(name, fresh_pg, agent_id, True) for name, agent_id in agent_of.items()],
            setup=lambda: _queue_tasks(db, fresh_pg, agent_ids, created),
            timeout=120,
        )
        print(result.summary())
        _check_exactly_once(db, result, created, agent_of)
        assert {status for status, _ in _rows(db).values()} == {"completed"}
        with db.session() as session:
            assert list(replay.verify(session)) == []
    finally:
        db.dispose()
