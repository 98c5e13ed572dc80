"""The claim statements are planned once per connection, not on every run; and planned again
once the tasks table has grown (the statistics sweep analyzes it).

psycopg prepares a statement run five times on a connection; PostgreSQL then plans it for
the values of each of its first five runs and afterwards keeps a generic plan unless that
looks dearer than the plans made for the values. A claim whose LIMIT and keys were
parameters always looked dearer, so it was planned afresh on every run (about as costly as
running it). These tests run each hot claim statement on one connection, with a queue of
some size (on a table of a few rows, planning for the values is rightly preferred: the costs
are tiny), and read PostgreSQL's own count of the plans it used (``pg_prepared_statements``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from fleet_common import sweeps
from fleet_common.agents import service as agents
from fleet_common.db import Database, utcnow
from fleet_common.dispatch import claim
from fleet_common.tasks import lease_sql
from tests.api_helpers import pull_agent, wait_until
from tests.concurrency.seed import TaskSpec, queue_tasks
from tests.conftest import make_settings

pytestmark = pytest.mark.postgres

RUNS = 20  # psycopg prepares after the 5th run, PostgreSQL decides after 5 more
QUEUED = 1_000


def _setup(tmp_path: Path, pg_url: str, capabilities: list[str]) -> tuple[Database, Any, str]:
    settings = make_settings(tmp_path, pg_url).orchestrator
    db = Database(pg_url, pool_size=1)  # one connection: every run on it
    with db.session() as session:
        agent_id = pull_agent(session, capabilities, max_concurrency=1_000)
    labels = [f"agent:{c}" for c in capabilities]
    queue_tasks(db, settings, [TaskSpec(f"t{n}", labels=labels) for n in range(QUEUED)])
    with db.engine.connect() as connection:
        connection.execute(text("ANALYZE tasks"))
        connection.commit()
    return db, settings, agent_id


def _plans(db: Database, marker: str, *, autocommit: bool = False) -> list[tuple[int, int]]:
    """(generic, custom) plans of the prepared statements whose text contains ``marker``, on
    the one connection of the pool of ``db``'s sessions (``autocommit``: of its autocommit
    ones)."""
    with db.session(autocommit=autocommit) as session:
        rows = session.execute(
            text(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                " WHERE strpos(statement, :marker) > 0"
            ),
            {"marker": marker},
        )
        return [(int(generic), int(custom)) for generic, custom in rows]


def _assert_generic(plans: list[tuple[int, int]]) -> None:
    assert plans, "the statement was never prepared"
    for generic, custom in plans:
        assert generic >= RUNS - 10 and custom <= 5, plans


@pytest.mark.parametrize("capabilities", [[], ["code:python", "tests"]])
def test_the_pull_claim_keeps_a_generic_plan(
    tmp_path: Path, pg_url: str, capabilities: list[str]
) -> None:
    db, settings, agent_id = _setup(tmp_path, pg_url, capabilities)
    try:
        for _ in range(RUNS):
            with db.session(lean=True) as session:
                assert claim.claim_for_reply(session, settings, agent_id) is not None
                session.commit()
        _assert_generic(_plans(db, "heads AS"))
    finally:
        db.dispose()


def test_the_worker_claim_and_its_completion_keep_generic_plans(
    tmp_path: Path, pg_url: str
) -> None:
    db, settings, agent_id = _setup(tmp_path, pg_url, ["code:python"])
    with db.session() as session:
        reading = claim.AgentReading.of(agents.get_agent(session, agent_id))
    try:
        held = []
        for _ in range(RUNS):
            with db.session(autocommit=True) as session:
                made, _ = claim.claim_and_start(session, settings, agent_id, reading)
                assert made is not None
                held.append(made)
        for made in held:
            then, _ = claim.started_params(settings, agent_id, reading)
            with db.session(autocommit=True) as session:
                row = lease_sql.complete_plain(
                    session, made.task.id, agent_id, made.lease_token, {"exit_code": 0}, None,
                    max_bytes=1_000_000, now=utcnow(), then_claim=then,
                )  # fmt: skip
                assert row is not None and row.done_id == made.task.id
        _assert_generic(_plans(db, "UPDATE tasks SET status='completed'", autocommit=True))
        _assert_generic(_plans(db, "agent LEFT JOIN claimed ON true", autocommit=True))
    finally:
        db.dispose()


def test_the_statistics_sweep_analyzes_the_tasks_table_once_it_has_grown(
    tmp_path: Path, pg_url: str
) -> None:
    settings = make_settings(tmp_path, pg_url).orchestrator
    db = Database(pg_url, pool_size=1)
    queue_tasks(db, settings, [TaskSpec(f"t{n}") for n in range(QUEUED)])
    db.dispose()  # the inserting backend ends, reporting what it changed at once
    db = Database(pg_url, pool_size=1)

    def sweep() -> int:
        with db.session() as session:
            return sweeps.task_statistics(session, settings, utcnow())

    def reltuples() -> float:
        with db.session() as session:
            return float(
                session.scalar(text("SELECT reltuples FROM pg_class WHERE relname = 'tasks'"))
            )

    try:
        wait_until(lambda: sweep() == 1, timeout=30, what="the sweep analyzing tasks")
        assert reltuples() == QUEUED  # the statistics the planner reads now count every row
        assert sweep() == 0  # nothing changed since
    finally:
        db.dispose()


def test_the_statistics_sweep_does_nothing_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/fleet.db"
    db = Database(url)
    try:
        with db.session() as session:
            settings = make_settings(tmp_path, url).orchestrator
            assert sweeps.task_statistics(session, settings, utcnow()) == 0
    finally:
        db.dispose()
