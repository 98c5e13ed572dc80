"""The base of every Fleet Celery task: settings, one session per run, logging with the task id.

Task bodies stay thin: they open ``self.session()``, call one ``fleet_common`` function and
return nothing. The session is the unit of work (commit on success, roll back on error); the
engine behind it is this process's, built on first use (see ``fleet_worker.runtime``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Task
from celery.utils.log import get_task_logger
from sqlalchemy.orm import Session

from fleet_common.settings import Settings
from fleet_worker.runtime import Runtime, runtime_of

logger = get_task_logger("fleet_worker.tasks")


class FleetTask(Task):
    """A Celery task with Fleet's settings, a per-process Database and a per-run session."""

    ignore_result = True
    # A sweep or a wake-up is never worth a retry of its own: the next beat run, or the relay,
    # is the retry.
    max_retries = 0

    @property
    def runtime(self) -> Runtime:
        return runtime_of(self.app)

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One unit of work on this process's database: commit on success, roll back on error."""
        with self.runtime.database.session() as session:
            yield session

    def log(self, message: str, *args: Any) -> None:
        """Log at INFO; the worker's task log format adds the task's name and id."""
        logger.info(message, *args)

    def debug(self, message: str, *args: Any) -> None:
        """Log at DEBUG, as :meth:`log` does at INFO."""
        logger.debug(message, *args)
