"""``fleet_common.sql.compact``: layout removed, literals and binds kept."""

from __future__ import annotations

from sqlalchemy.dialects import postgresql

from fleet_common.db import Prebuilt, _OnDriver
from fleet_common.dispatch import claim
from fleet_common.sql import compact
from fleet_common.tasks import lease_sql


def test_compact_keeps_literals_and_binds() -> None:
    sql = """
    SELECT a ,  b FROM t
    WHERE x = :x AND y <= :y AND s = 'two  spaces, (kept)'   AND n = 'it''s  so'
      AND z IN ( 'a', 'b' ) AND w = e - 1"""
    assert compact(sql) == (
        "SELECT a,b FROM t WHERE x=:x AND y<=:y AND s='two  spaces, (kept)' "
        "AND n='it''s  so' AND z IN('a','b')AND w=e - 1"
    )


def test_hot_worker_statements_reach_psycopg_unconverted() -> None:
    """The worker's claim and completion statements run by psycopg's RawCursor (Prebuilt):
    their ``$n`` placeholders are numbered once, so psycopg converts nothing per call,
    whatever their length (it caches the conversion of a pyformat query only up to 4,096
    bytes)."""
    dialect = postgresql.psycopg.dialect()  # type: ignore[attr-defined]
    hot = [
        *(lease_sql._completion(log, keys) for log in (False, True) for keys in (None, 1)),
        *claim._pg_start_claims(1),
    ]
    for statement in hot:
        assert isinstance(statement, Prebuilt)
        raw = _OnDriver(statement.on(dialect), dialect).raw_sql
        assert "$1" in raw and "%(" not in raw
