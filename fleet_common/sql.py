"""Core statements for the hot write paths (webhook intake, task creation): upserts in the
session's dialect, and ``INSERT … ON CONFLICT DO NOTHING`` built once and executed with the
values as parameters (the ORM's unit of work and per-call statement building cost more than the
database work itself)."""

from __future__ import annotations

import re
from typing import Any, cast

from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fleet_common.db import Base


def _insert(dialect: str) -> Any:
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def insert_for(session: Session, entity: Any) -> Any:
    """An ``INSERT`` for ``entity`` in the session's dialect, so that it offers
    ``on_conflict_do_nothing`` / ``on_conflict_do_update`` (PostgreSQL and SQLite both)."""
    return _insert(session.get_bind().dialect.name)(entity)


_SKIPPING: dict[tuple[str, str], Any] = {}


def table_of(entity: type[Base]) -> Table:
    """The table a model maps (for Core statements)."""
    return cast(Table, entity.__table__)


def insert_new(connection: Connection, entity: type[Base], row: dict[str, Any]) -> Any:
    """``INSERT`` ``row`` into ``entity``'s table unless it breaks a unique constraint (``ON
    CONFLICT DO NOTHING``, which waits for a concurrent transaction holding that key to finish);
    returns the new row's primary key, ``None`` when nothing was inserted.

    The statement is built once per dialect and table and the values are passed at execution,
    so a call neither compiles SQL nor hashes the values into a cache key."""
    table = table_of(entity)
    key = (connection.dialect.name, table.name)
    statement = _SKIPPING.get(key)
    if statement is None:
        statement = (
            _insert(key[0])(table).on_conflict_do_nothing().returning(*table.primary_key.columns)
        )
        _SKIPPING[key] = statement
    return connection.execute(statement, row).scalar_one_or_none()


def row_of(instance: Base) -> dict[str, Any]:
    """The column values set on a mapped object, for a Core ``INSERT`` (read from its state
    directly: what was never set, an autoincrement key included, is left to the database)."""
    state = instance.__dict__
    return {c.key: state[c.key] for c in table_of(type(instance)).columns if c.key in state}


# A single-quoted literal (kept as written) or the text between two of them.
_LITERAL = re.compile(r"('(?:[^']|'')*')")
_SPACE = re.compile(r"\s+")
_AROUND = re.compile(r" ?([(),=<>+*|]) ?")


def compact(sql: str) -> str:
    """``sql`` without the whitespace that is only layout (none inside string literals; the
    statement must have no comments): fewer bytes sent and parsed by the server on every
    execution, and a long statement sent through SQLAlchemy stays under psycopg's
    4,096-character query cache (a Prebuilt one goes raw, unconverted)."""
    parts = _LITERAL.split(sql)
    for i in range(0, len(parts), 2):
        parts[i] = _AROUND.sub(r"\1", _SPACE.sub(" ", parts[i]))
    return "".join(parts).strip()
