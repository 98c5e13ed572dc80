"""What one Celery app needs per process: its settings, a Database and a Publisher.

Nothing here connects at import or at construction. The database and the publisher are built
on first use and rebuilt in a forked child (a prefork pool process, the embedded beat), which
must never share its parent's connections: a pooled socket used by two processes corrupts the
protocol stream of both.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fleet_common.db import Database
from fleet_common.settings import Settings

if TYPE_CHECKING:
    from fleet_worker.publisher import Publisher

# A prefork pool process or beat runs one task at a time (prefetch 1); a small pool is plenty.
# ``fleet worker`` runs a thread per unit of its host's capacity and sets ``pool_size``.
WORKER_POOL_SIZE = 2


class Runtime:
    """The settings and the per-process resources of one Celery app."""

    def __init__(self, settings: Settings, app: Any) -> None:
        self.settings = settings
        self.app = app
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._database: Database | None = None
        self._publisher: Publisher | None = None
        #: Connections kept open (as many again may overflow); set before first use.
        self.pool_size = WORKER_POOL_SIZE
        #: Called with each Database this runtime builds (e.g. to watch its commits).
        self.database_hooks: list[Callable[[Database], None]] = []

    @property
    def database(self) -> Database:
        """This process's Database, built on first use."""
        with self._lock:
            self._check_fork()
            if self._database is None:
                database = Database(self.settings.database_url, pool_size=self.pool_size)
                for hook in self.database_hooks:
                    hook(database)
                self._database = database
            return self._database

    @property
    def publisher(self) -> Publisher:
        """This process's wake-up Publisher, built on first use."""
        from fleet_worker.publisher import Publisher

        with self._lock:
            self._check_fork()
            if self._publisher is None:
                self._publisher = Publisher(self.app)
            return self._publisher

    def after_fork(self) -> None:
        """Forget what the parent process built; the child builds its own on first use."""
        with self._lock:
            self._pid = -1
            self._check_fork()

    def _check_fork(self) -> None:
        if self._pid == os.getpid():
            return
        if self._database is not None:
            # close=False: drop the inherited pool without closing the parent's sockets.
            self._database.engine.dispose(close=False)
        self._database = None
        self._publisher = None  # its thread did not survive the fork; its sockets are the parent's
        self._pid = os.getpid()

    def close(self, timeout: float = 2.0) -> None:
        """Flush and stop the publisher, dispose the engine (process shutdown, tests)."""
        with self._lock:
            self._check_fork()
            publisher, self._publisher = self._publisher, None
            database, self._database = self._database, None
        if publisher is not None:
            publisher.close(timeout)
        if database is not None:
            database.dispose()


def runtime_of(app: Any) -> Runtime:
    """The Runtime of an app made by ``make_celery`` (TypeError for any other app)."""
    runtime = getattr(app, "runtime", None)
    if not isinstance(runtime, Runtime):
        raise TypeError(f"{app!r} was not made by fleet_worker.celery_app.make_celery")
    return runtime
