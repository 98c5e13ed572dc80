"""Prebuilt statements run by psycopg, and the lean units of work (``Database.session(lean=True)``
and ``autocommit=True``) on PostgreSQL: the same rows as through SQLAlchemy, the same
transaction boundaries as a Session, connections given back as a Session gives them back."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import nullcontext

import pytest
from sqlalchemy import bindparam, select, update

from fleet_common.agents.models import Agent, AgentMode
from fleet_common.agents.service import AGENT_VIEW
from fleet_common.db import Database, Prebuilt, utcnow

pytestmark = pytest.mark.postgres

_VIEW = Prebuilt(select(*AGENT_VIEW).where(Agent.id == bindparam("agent_id")))
_RENAME = Prebuilt(
    update(Agent)
    .where(Agent.id == bindparam("agent_id"))
    .values(name=bindparam("name"))
    .returning(Agent.id, Agent.name)
)


@pytest.fixture
def db(pg_url: str) -> Iterator[Database]:
    database = Database(pg_url, pool_size=2)
    with database.session() as session:
        session.add(_agent("agt_lean_1"))
    yield database
    database.dispose()


def _agent(agent_id: str) -> Agent:
    return Agent(
        id=agent_id,
        name="before",
        mode=AgentMode.HTTP_PULL,
        host_uid=agent_id,
        capabilities=["python", "go"],
        meta={"k": [1, "two"]},
        last_heartbeat_at=utcnow(),
    )


def _name(db: Database, agent_id: str = "agt_lean_1") -> str | None:
    with db.session() as session:
        return session.scalar(select(Agent.name).where(Agent.id == agent_id))


def test_driver_rows_equal_sqlalchemy_rows(db: Database) -> None:
    with db.session() as session:
        connection = session.connection()
        expected = connection.execute(_VIEW.on(connection.dialect), {"agent_id": "agt_lean_1"})
        keys, wanted = list(expected.keys()), expected.one()
        row = _VIEW.execute(session, {"agent_id": "agt_lean_1"}).one()
    assert list(row._fields) == keys
    assert tuple(row) == tuple(wanted)
    assert row.capabilities == ["python", "go"] and row.meta == {"k": [1, "two"]}
    assert row.last_heartbeat_at.tzinfo is dt.UTC and row.created_at.tzinfo is dt.UTC
    with db.session() as session:
        assert _VIEW.execute(session, {"agent_id": "agt_none"}).first() is None


def test_lean_commit_gives_the_connection_back(db: Database) -> None:
    pool = db.engine.pool
    with db.session(lean=True) as session:
        assert _RENAME.execute(session, {"agent_id": "agt_lean_1", "name": "one"}).one()
        assert pool.checkedout() == 1  # type: ignore[attr-defined]
        session.commit()  # as the dequeue does before it waits
        assert pool.checkedout() == 0  # type: ignore[attr-defined]
        assert _name(db) == "one"
        _RENAME.execute(session, {"agent_id": "agt_lean_1", "name": "two"})
    assert pool.checkedout() == 0  # type: ignore[attr-defined]
    assert _name(db) == "two"


def test_lean_rolls_back_on_error(db: Database) -> None:
    with pytest.raises(RuntimeError), db.session(lean=True) as session:
        _RENAME.execute(session, {"agent_id": "agt_lean_1", "name": "lost"})
        raise RuntimeError("after the write")
    assert _name(db) == "before"


@pytest.mark.parametrize("fail", [False, True])
def test_a_session_made_later_takes_the_transaction_over(db: Database, fail: bool) -> None:
    with pytest.raises(RuntimeError) if fail else nullcontext(), db.session(lean=True) as session:
        _RENAME.execute(session, {"agent_id": "agt_lean_1", "name": "with the orm"})
        session.add(_agent("agt_lean_2"))  # needs a real Session, on the same transaction
        session.flush()
        assert _RENAME.execute(session, {"agent_id": "agt_lean_2", "name": "new"}).one()
        if fail:
            raise RuntimeError("after both writes")
    assert _name(db) == ("before" if fail else "with the orm")
    assert _name(db, "agt_lean_2") == (None if fail else "new")


def test_autocommit_runs_without_a_session(db: Database) -> None:
    with db.session(autocommit=True) as session:
        _RENAME.execute(session, {"agent_id": "agt_lean_1", "name": "at once"})
        assert _name(db) == "at once"  # committed by the statement itself
        assert "_session" in vars(session) and vars(session)["_session"] is None
