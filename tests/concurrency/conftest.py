"""Real races need real processes and a database of their own.

Every test here gets a brand-new PostgreSQL database (migrated by Alembic) on the shared server,
dropped afterwards, so the dozens of connections it opens see nobody else's rows. The racing
processes are spawned once per test session (see ``racers.RacerPool``) and given fresh work,
and fresh connections, in every test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fleet_common.migrate import upgrade
from tests import services
from tests.concurrency.racers import RACERS, RacerPool


@pytest.fixture
def fresh_pg() -> Iterator[str]:
    """The URL of a new, migrated PostgreSQL database, dropped after the test."""
    with services.scratch_postgres_database("fleet_race") as url:
        upgrade(url)
        yield url


@pytest.fixture(scope="session")
def _racer_pools() -> Iterator[list[RacerPool]]:
    pools: list[RacerPool] = []
    yield pools
    for pool in pools:
        pool.close()


@pytest.fixture
def racers(fresh_pg: str, _racer_pools: list[RacerPool]) -> RacerPool:
    """RACERS spawned processes ready to race (a new set if an earlier race broke them)."""
    if not _racer_pools or _racer_pools[-1].broken:
        if _racer_pools:
            _racer_pools[-1].close()
        _racer_pools.append(RacerPool(RACERS))
    return _racer_pools[-1]
