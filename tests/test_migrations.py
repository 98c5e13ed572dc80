"""The migrations build exactly the schema the models describe, on both backends, and go down
and up again."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.command import downgrade
from alembic.migration import MigrationContext

from fleet_common.db import make_engine
from fleet_common.migrate import alembic_config, upgrade
from fleet_common.models import Base

# Expression indexes (``priority DESC``) cannot be compared by autogenerate; they are written
# out by hand in 0001 and checked by name below.
EXPRESSION_INDEXES = {"ix_tasks_claim", "ix_tasks_assigned"}


def _drift(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            names = {ix["name"] for ix in conn.dialect.get_indexes(conn, "tasks")}
    finally:
        engine.dispose()
    assert names >= EXPRESSION_INDEXES
    return [
        d
        for d in diff
        if not (isinstance(d, tuple) and getattr(d[1], "name", "") in EXPRESSION_INDEXES)
    ]


def test_migrations_match_models(database_url: str) -> None:
    assert _drift(database_url) == []


def test_downgrade_and_upgrade_again(database_url: str) -> None:
    downgrade(alembic_config(database_url), "base")
    upgrade(database_url)
    assert _drift(database_url) == []
