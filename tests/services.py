"""Access to the real services the tests need (PostgreSQL, Redis), with one rule: on a laptop
without them a test skips with a clear reason, but with ``FLEET_REQUIRE_SERVICES=1`` (CI) a
missing service is a failure."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

PG_ADMIN_URL = os.environ.get("FLEET_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("FLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def required() -> bool:
    return os.environ.get("FLEET_REQUIRE_SERVICES") == "1"


def unavailable(what: str) -> None:
    """Skip (laptop) or fail (CI) because ``what`` is not there."""
    message = f"{what} is not available"
    if required():
        pytest.fail(f"{message}, and FLEET_REQUIRE_SERVICES=1 requires it")
    pytest.skip(message)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_postgres() -> str:
    import psycopg

    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=2):
            pass
    except psycopg.Error as error:
        unavailable(f"PostgreSQL at {PG_ADMIN_URL} ({error})")
    return PG_ADMIN_URL


def require_redis() -> str:
    if not port_open("127.0.0.1", 6379):
        unavailable(f"Redis at {REDIS_URL}")
    return REDIS_URL


@contextmanager
def scratch_postgres_database(prefix: str = "fleet_test") -> Iterator[str]:
    """A new, empty PostgreSQL database on the shared server, dropped afterwards."""
    import psycopg

    admin = require_postgres()
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
