"""One worker per configured host.

A worker's slot accounting counts only its own claims in flight, and its start fails what a
previous process of its host left running: a second ``fleet worker`` for the same host would
run more attempts than the slots allow and fail the first one's running attempts as leftovers.
So a worker holds a lock on its host for as long as it runs, taken before anything else:

- PostgreSQL: a session-level advisory lock on a connection of its own, kept out of the pool,
  named by ``application_name`` (the refusal says which worker holds it), with TCP keepalives
  asked of the server (a worker whose machine vanished frees its host within ~30 s, not the
  kernel's two hours). After a database restart the lock is taken again; if another worker
  took it meanwhile, :meth:`HostLock.check` says so and the worker stops.
- SQLite (one machine by nature): an exclusive ``flock`` on a file next to the database file,
  released by the kernel when the process ends, however it ends.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

from fleet_common.db import Database

log = logging.getLogger("fleet.worker")

#: The server drops the lock's connection after this long without an answer from its peer.
_KEEPALIVES = (
    "SELECT set_config('tcp_keepalives_idle', '10', false),"
    " set_config('tcp_keepalives_interval', '5', false),"
    " set_config('tcp_keepalives_count', '3', false),"
    " set_config('application_name', %s, false)"
)
_HOLDER = (
    "SELECT a.application_name, a.client_addr FROM pg_locks AS l"
    " JOIN pg_stat_activity AS a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s"
    " AND l.objsubid = 1"
)


class HostTaken(Exception):
    """Another worker serves this host."""


def lock_key(host_id: str) -> int:
    """The host's advisory lock key (a signed 64-bit integer)."""
    digest = hashlib.sha256(f"fleet.host:{host_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class HostLock:
    """The lock of ``host_id`` in ``database``; :meth:`acquire` before serving it."""

    def __init__(self, database: Database, host_id: str) -> None:
        self.database = database
        self.host_id = host_id
        self.name = f"fleet worker {host_id} (pid {os.getpid()} on {socket.gethostname()})"
        self._connection: Any = None  # PostgreSQL: the lock's own connection (None: lost)
        self._held_pg = False  # PostgreSQL: acquired, and not released since
        self._file: Any = None  # SQLite: the locked file

    def acquire(self) -> None:
        """Take the host's lock, or raise :class:`HostTaken` naming who holds it."""
        if self.database.dialect == "postgresql":
            taken = not self._lock_pg()
            self._held_pg = not taken
        else:
            taken = not self._lock_file()
        if taken:
            holder = self.holder() or "it has just let go; try again"
            raise HostTaken(
                f"host {self.host_id!r} is already served by another worker ({holder});"
                " one worker per host"
            )

    def holder(self) -> str | None:
        """Who holds the host's lock now (its worker's name and address), None if nobody."""
        if self.database.dialect == "postgresql":
            return self._holder_pg()
        path = self._path()
        if path is None or not path.exists():
            return None
        with path.open() as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return handle.read().strip() or "a process"
        return None

    def check(self) -> bool:
        """False when another worker holds the lock now (this one lost it with its connection,
        in a database restart). A database that cannot be reached is not a reason to stop."""
        if not self._held_pg:
            return True
        if self._connection is not None:
            try:
                self._connection.execute("SELECT 1")
                return True
            except Exception:  # the connection is gone: the server let the lock go with it
                self._close_connection()
        try:
            return self._lock_pg()
        except Exception:
            log.warning("host lock: the database cannot be reached; will check again")
            return True

    def release(self) -> None:
        self._held_pg = False
        self._close_connection()
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None

    # -- PostgreSQL -----------------------------------------------------------------------

    def _lock_pg(self) -> bool:
        raw = self.database.engine.raw_connection()
        connection: Any = raw.driver_connection
        raw.detach()  # held for the worker's life: not one of the pool's connections
        try:
            connection.autocommit = True
            connection.execute(_KEEPALIVES, (self.name,))
            row = connection.execute(
                "SELECT pg_try_advisory_lock(%s)", (lock_key(self.host_id),)
            ).fetchone()
        except Exception:
            raw.close()
            raise
        if not row[0]:
            raw.close()
            return False
        self._connection = connection
        return True

    def _holder_pg(self) -> str | None:
        key = lock_key(self.host_id) & 0xFFFF_FFFF_FFFF_FFFF
        with self.database.engine.connect() as conn:
            driver: Any = conn.connection.driver_connection
            row = driver.execute(_HOLDER, (key >> 32, key & 0xFFFF_FFFF)).fetchone()
        if row is None:
            return None
        name, address = row
        return f"{name or 'unnamed'} from {address or 'a local socket'}"

    def _close_connection(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:
                log.debug("host lock: closing its connection failed", exc_info=True)
            self._connection = None

    # -- SQLite ----------------------------------------------------------------------------

    def _path(self) -> Path | None:
        """The lock file, next to the database file (None: a database of this process alone,
        which no other worker can share)."""
        database = self.database.engine.url.database
        if not database or database == ":memory:":
            return None
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", self.host_id)
        return Path(f"{database}.host-{safe}.lock")

    def _lock_file(self) -> bool:
        path = self._path()
        if path is None:
            return True
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(self.name + "\n")
        handle.flush()
        self._file = handle
        return True
