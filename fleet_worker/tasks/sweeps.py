"""The sweep tasks: one per ``fleet_common.sweeps.SWEEPS`` entry, the relay, the webhook
deliveries' retention and the filesystem broker's cleanup. Each is a thin shell around a
``fleet_common`` function, run by beat on the ``fleet.sweeps`` queue (the ``task_routes`` of
``make_celery``); a message older than one sweep interval expires instead of running late.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from fleet_common.db import utcnow
from fleet_common.settings import OrchestratorSettings
from fleet_common.sweeps import SWEEPS, due_for_publish, expired_deliveries
from fleet_worker.base import FleetTask
from fleet_worker.runtime import runtime_of
from fleet_worker.schedule import BROKER_FILES_TASK, DELIVERIES_TASK, RELAY_TASK, sweep_task_name

Sweep = Callable[[Session, OrchestratorSettings, Any], int]

#: A sweep is a few bounded statements; one that runs this long is stuck (a lock, a dead peer).
SOFT_TIME_LIMIT_SECS = 120
TIME_LIMIT_SECS = 150
#: How long the relay waits for its wake-ups to leave (they are re-sent later if not).
RELAY_FLUSH_SECS = 10.0
#: A message file left in the filesystem broker's processed folder is garbage after this long
#: (a consumer reads it right after taking it).
PROCESSED_FILE_TTL_SECS = 300
PROCESSED_FILES_PER_RUN = 10_000


def register(app: Any) -> None:
    """Add the sweep tasks to ``app`` (an app made by ``make_celery``)."""
    interval = runtime_of(app).settings.orchestrator.sweep_interval_secs
    options = {
        "base": FleetTask,
        "bind": True,
        # Not shared: a shared task is added to every app finalized later, with this app's
        # options (interval, expiry) instead of that app's own.
        "shared": False,
        "expires": float(interval),
        "soft_time_limit": SOFT_TIME_LIMIT_SECS,
        "time_limit": TIME_LIMIT_SECS,
    }
    for key, sweep in SWEEPS.items():
        app.task(name=sweep_task_name(key), **options)(_sweep_body(key, sweep))
    app.task(name=RELAY_TASK, **options)(relay)
    app.task(name=DELIVERIES_TASK, **options)(deliveries)
    app.task(name=BROKER_FILES_TASK, **{**options, "expires": 60.0})(broker_files)


def _sweep_body(key: str, sweep: Sweep) -> Callable[[FleetTask], None]:
    def run(task: FleetTask) -> None:
        with task.session() as session:
            count = sweep(session, task.settings.orchestrator, utcnow())
        if count:
            task.log("%s: %d", key, count)

    run.__name__ = run.__qualname__ = f"sweep_{key}"
    run.__doc__ = sweep.__doc__
    return run


def relay(task: FleetTask) -> None:
    """Re-send the wake-ups of queued tasks whose last publish is older than
    ``relay_after_secs`` (marked in one unit of work, sent after its commit)."""
    with task.session() as session:
        due = due_for_publish(session, task.settings.orchestrator, utcnow())
    if not due:
        return
    publisher = task.runtime.publisher
    publisher.publish(due)
    publisher.flush(RELAY_FLUSH_SECS)
    task.log("relay: %d wake-ups", len(due))


def deliveries(task: FleetTask) -> None:
    """Delete webhook deliveries past ``forgejo.delivery_retention_days``, a batch a run."""
    with task.session() as session:
        count = expired_deliveries(session, task.settings, utcnow())
    if count:
        task.log("deliveries: %d", count)


def broker_files(task: FleetTask) -> None:
    """Remove the filesystem broker's consumed message files."""
    options = task.app.conf.broker_transport_options or {}
    folder = options.get("processed_folder")
    if not folder:
        return
    count = prune_processed(Path(folder), PROCESSED_FILE_TTL_SECS, limit=PROCESSED_FILES_PER_RUN)
    if count:
        task.log("broker_files: removed %d", count)


def prune_processed(folder: Path, older_than_secs: float, *, limit: int) -> int:
    """Delete up to ``limit`` ``*.msg`` files in ``folder`` not modified for ``older_than_secs``."""
    cutoff = time.time() - older_than_secs
    removed = 0
    try:
        entries = os.scandir(folder)
    except FileNotFoundError:
        return 0
    with entries:
        for entry in entries:
            if removed >= limit:
                break
            if not entry.name.endswith(".msg"):
                continue
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue  # another sweeper got there first
    return removed
