"""The host lock (``fleet_worker.host_lock``): one holder per host on each backend, released
with its holder, taken again after a database restart unless another worker took it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from fleet_common.db import Database
from fleet_worker.host_lock import HostLock, HostTaken
from tests.conftest import make_settings


@pytest.fixture
def database(tmp_path: Path, database_url: str) -> Iterator[Database]:
    db = Database(make_settings(tmp_path, database_url).database_url)
    yield db
    db.dispose()


def test_one_holder_per_host(database: Database) -> None:
    first, second = HostLock(database, "h1"), HostLock(database, "h1")
    assert second.holder() is None
    first.acquire()
    try:
        assert (second.holder() or "").startswith(first.name)  # PostgreSQL adds the address
        with pytest.raises(HostTaken, match=r"host 'h1' is already served by another worker"):
            second.acquire()
        other = HostLock(database, "h2")
        other.acquire()  # another host is free
        other.release()
        assert first.check()
    finally:
        first.release()
    assert second.holder() is None
    second.acquire()  # released: the next worker serves the host
    second.release()


@pytest.mark.postgres
def test_the_refusal_names_the_holder(pg_url: str) -> None:
    database = Database(pg_url)
    holder = HostLock(database, "named")
    holder.acquire()
    try:
        with pytest.raises(HostTaken) as refused:
            HostLock(database, "named").acquire()
        assert f"(fleet worker named (pid {os.getpid()} on " in str(refused.value)
    finally:
        holder.release()
        database.dispose()


def _terminate(url: str, application_name: str) -> None:
    """What a database restart does to the lock's connection."""
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        )


@pytest.mark.postgres
def test_a_lost_connection_takes_the_lock_again_unless_another_worker_has(pg_url: str) -> None:
    database = Database(pg_url)
    lock = HostLock(database, "restarted")
    lock.acquire()
    try:
        _terminate(database.url, lock.name)
        assert lock.check()  # taken again on a new connection
        intruder = HostLock(database, "restarted")
        with pytest.raises(HostTaken):
            intruder.acquire()

        _terminate(database.url, lock.name)
        intruder.acquire()  # in the gap, another worker took the host
        assert not lock.check()
        intruder.release()
    finally:
        lock.release()
        database.dispose()


@pytest.mark.postgres
def test_an_unreachable_database_keeps_the_worker_and_the_lock_is_taken_again_later(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = Database(pg_url)
    lock = HostLock(database, "outage")
    lock.acquire()
    try:
        _terminate(database.url, lock.name)

        def down() -> None:
            raise psycopg.OperationalError("connection refused")

        with monkeypatch.context() as patched:
            patched.setattr(database.engine, "raw_connection", down)
            assert lock.check()  # cannot tell: keep serving
            assert lock.check()
        assert lock.check()  # the database answers again: taken back
        with pytest.raises(HostTaken):
            HostLock(database, "outage").acquire()
    finally:
        lock.release()
        database.dispose()
