"""Direct database access (for what must work without a server or token) and ``fleet db``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click
from sqlalchemy import exc, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from fleet_api.cli.context import CliState, config_option, pass_state
from fleet_api.cli.errors import CliError, ExitCode
from fleet_common import migrate
from fleet_common.db import Database
from fleet_common.errors import DatabaseUnavailable
from fleet_common.settings import Settings


def display_url(url: str) -> str:
    """A database URL fit to print: the password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except exc.ArgumentError:
        return url


@contextmanager
def database_errors(url: str) -> Iterator[None]:
    """Turn a database that cannot be reached into ``error: cannot reach ...`` (exit 3)."""
    try:
        yield
    except (DatabaseUnavailable, exc.OperationalError, exc.InterfaceError) as error:
        orig = getattr(error, "orig", None) or error
        first_line = (str(orig).strip().splitlines() or [""])[0]
        raise CliError(
            f"cannot reach the database at {display_url(url)}: {first_line}",
            ExitCode.UNREACHABLE,
        ) from None


def upgrade_database(settings: Settings) -> None:
    """Bring the configured database to the newest schema (idempotent)."""
    with database_errors(settings.database_url):
        migrate.upgrade(settings.database_url)


@contextmanager
def session_scope(settings: Settings, *, upgrade: bool = False) -> Iterator[Session]:
    """One unit of work on the configured database; without ``upgrade`` the schema must
    already exist (a clear error says how to create it)."""
    if upgrade:
        upgrade_database(settings)
    database = Database(settings.database_url, pool_size=1)
    try:
        with database_errors(settings.database_url):
            if not upgrade and not inspect(database.engine).has_table("alembic_version"):
                raise CliError(
                    f"the database at {display_url(settings.database_url)} has no Fleet "
                    "schema yet: run `fleet db upgrade`",
                    ExitCode.GENERAL,
                )
            with database.session() as session:
                yield session
    finally:
        database.dispose()


@click.group("db")
def db_group() -> None:
    """Manage the database schema."""


@db_group.command("upgrade")
@config_option
@pass_state
def upgrade_command(state: CliState, config: str | None) -> None:
    """Run the Alembic migrations on the configured database."""
    settings = state.settings(config)
    upgrade_database(settings)
    click.echo(f"database {display_url(settings.database_url)} is at the newest schema")
