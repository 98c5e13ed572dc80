"""Shared fixtures: a migrated database per backend, settings, the API app, tokens and a fake
Forgejo.

The schema is always built by running the Alembic migrations. Each test gets a clean database:
PostgreSQL tables are truncated between tests (one migrated database per xdist worker), SQLite
gets a new file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from fleet_common.auth import service as auth
from fleet_common.auth.models import TokenKind
from fleet_common.db import Database
from fleet_common.migrate import upgrade
from fleet_common.models import Base
from fleet_common.settings import Settings, load_settings
from tests import services
from tests.fakes.forgejo import FakeForgejo


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """One migrated PostgreSQL database for this test process."""
    with services.scratch_postgres_database() as url:
        upgrade(url)
        yield url


def _truncate(url: str) -> None:
    db = Database(url, pool_size=1)
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with db.session() as session:
        session.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    db.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A clean, migrated database on each backend."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_database")
        _truncate(url)
        return str(url)
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    upgrade(url)
    return url


@pytest.fixture
def pg_url(pg_database: str) -> str:
    """A clean, migrated PostgreSQL database (for tests that are about PostgreSQL)."""
    _truncate(pg_database)
    return pg_database


def make_settings(tmp_path: Path, database_url: str, **orchestrator: Any) -> Settings:
    env = {
        "FLEET_DATABASE_URL": database_url,
        "FLEET_ORCHESTRATOR_STATE_DIR": str(tmp_path / "state"),
    }
    env.update({f"FLEET_ORCHESTRATOR_{k.upper()}": str(v) for k, v in orchestrator.items()})
    return load_settings(env=env)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return make_settings(tmp_path, database_url)


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings.database_url)
    yield database
    database.dispose()


@pytest.fixture
def app(settings: Settings, db: Database) -> Any:
    from fleet_api.app import create_app

    application = create_app(settings, db=db, publisher=False)
    application.testing = True
    return application


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


@pytest.fixture
def admin_token(db: Database) -> str:
    with db.session() as session:
        _, secret = auth.mint(session, TokenKind.ADMIN, actor="test", name="test")
    return secret


@pytest.fixture
def fake() -> Iterator[FakeForgejo]:
    """A running fake Forgejo, empty (the suite's only fake)."""
    with FakeForgejo() as server:
        yield server
