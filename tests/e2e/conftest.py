"""End-to-end fixtures: whole Fleet systems of real processes (see ``tests.e2e.system``).

Backends: ``sqlite+filesystem`` (the embedded default: SQLite and kombu's filesystem broker in
the temp folder) and ``postgres+redis`` (a scratch PostgreSQL database and a Redis database of
our own on the shared server). Without PostgreSQL, Redis or sshd the tests that need them skip
with the reason, unless ``FLEET_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests import services
from tests.e2e.system import Backend, System
from tests.sshd import SSHServer, sshd_server
from tests.worker.conftest import scratch_redis_db

__all__ = ["SSHServer", "sshd_server"]

SQLITE = "sqlite+filesystem"
POSTGRES = "postgres+redis"
#: Both backends, as test parameters (PostgreSQL + Redis marked as needing them).
BACKENDS = [
    pytest.param(SQLITE, id=SQLITE),
    pytest.param(POSTGRES, id=POSTGRES, marks=[pytest.mark.postgres, pytest.mark.redis]),
]


@contextmanager
def backend(name: str, root: Path) -> Iterator[Backend]:
    """The database and broker URLs of one backend, dropped/flushed afterwards."""
    if name == POSTGRES:
        with (
            services.scratch_postgres_database("fleet_e2e") as database_url,
            scratch_redis_db() as broker_url,
        ):
            yield Backend(name, database_url, broker_url)
    else:
        (root / "state").mkdir(parents=True, exist_ok=True)
        yield Backend(name, f"sqlite:///{root / 'state' / 'fleet.db'}", "filesystem://")


@contextmanager
def running_system(root: Path, backend_name: str, **config: Any) -> Iterator[System]:
    """A :class:`System` on ``backend_name``; every process it started is stopped after."""
    with backend(backend_name, root) as urls:
        system = System(root, urls, **config)
        try:
            yield system
        finally:
            system.close()


SystemFactory = Callable[..., System]


@pytest.fixture
def make_system(tmp_path: Path) -> Iterator[SystemFactory]:
    """``make_system(backend_name, hosts=..., agent_types=..., orchestrator=...)``."""
    with ExitStack() as stack:
        count = 0

        def make(backend_name: str, **config: Any) -> System:
            nonlocal count
            count += 1
            root = tmp_path / f"system-{count}"
            root.mkdir()
            return stack.enter_context(running_system(root, backend_name, **config))

        yield make
