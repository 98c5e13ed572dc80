"""The Forgejo write-back as Celery tasks: ``fleet.forgejo.sync`` on its own queue, with retry
and backoff while Forgejo is down, and the ``fleet.sweep.forgejo_outbox`` sweep that re-sends
the sync of every task Forgejo does not show up to date yet (after an outage, a lost message,
a change made where no sync was queued). ``fleet beat`` consumes the ``fleet.forgejo`` queue.

Each sync renders the task's current row (``fleet_common.forgejo.writeback``), so retries,
duplicates and late messages are harmless, and a write for a stale state never happens.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from fleet_common.db import Database, utcnow
from fleet_common.forgejo import writeback
from fleet_common.forgejo.client import ForgejoClient, ForgejoUnavailable
from fleet_common.settings import Settings
from fleet_worker.base import FleetTask
from fleet_worker.publisher import Message
from fleet_worker.redaction import Redactor
from fleet_worker.runtime import Runtime, runtime_of
from fleet_worker.schedule import FORGEJO_OUTBOX_TASK, FORGEJO_QUEUE

SYNC_TASK = "fleet.forgejo.sync"
#: With backoff capped at 300 s, about eight hours of retries; the outbox sweep goes on after.
MAX_RETRIES = 100
RETRY_BACKOFF_MAX_SECS = 300
#: Below the write-back's lease (SYNC_LEASE_SECS), so a stuck run ends before it is freed.
SOFT_TIME_LIMIT_SECS = 90
TIME_LIMIT_SECS = 120
#: Forgejo's answer is awaited this long (connect, read); retries come from Celery. Short:
#: ``fleet beat`` runs the syncs beside the sweeps, which must not wait long behind them.
CLIENT_TIMEOUT = (3.05, 5.0)
FLUSH_SECS = 10.0


def sync_message(task_id: str, *, force: bool = False, retry: bool = True) -> Message:
    """The message that syncs one task. ``retry=False`` (the sweep's): one try, no backoff
    chain, and dropped when older than the sweep's re-send interval."""
    kwargs: dict[str, Any] = {}
    if force:
        kwargs["force"] = True
    if not retry:
        kwargs["retry"] = False
    expires = None if retry else float(writeback.RESYNC_AFTER_SECS)
    return Message(SYNC_TASK, FORGEJO_QUEUE, (task_id,), kwargs, expires)


def sync_messages(task_ids: Iterable[str], *, force: bool = False) -> list[Message]:
    return [sync_message(task_id, force=force) for task_id in task_ids]


def register(app: Any) -> None:
    """Add the sync task and the outbox sweep to ``app``; with Forgejo configured, every
    database this app's processes build queues a sync after each committed state change of a
    Forgejo task."""
    runtime = runtime_of(app)
    interval = float(runtime.settings.orchestrator.sweep_interval_secs)
    app.task(
        name=SYNC_TASK,
        base=FleetTask,
        bind=True,
        shared=False,
        acks_late=True,
        autoretry_for=(ForgejoUnavailable,),
        retry_backoff=True,
        retry_backoff_max=RETRY_BACKOFF_MAX_SECS,
        retry_jitter=True,
        max_retries=MAX_RETRIES,
        soft_time_limit=SOFT_TIME_LIMIT_SECS,
        time_limit=TIME_LIMIT_SECS,
    )(sync)
    app.task(
        name=FORGEJO_OUTBOX_TASK,
        base=FleetTask,
        bind=True,
        shared=False,
        expires=interval,
        soft_time_limit=SOFT_TIME_LIMIT_SECS,
        time_limit=TIME_LIMIT_SECS,
    )(forgejo_outbox)
    if runtime.settings.forgejo.enabled:
        runtime.database_hooks.append(functools.partial(_watch, runtime))


def _watch(runtime: Runtime, database: Database) -> None:
    writeback.watch(database, lambda ids: runtime.publisher.publish(sync_messages(ids)))


def sync(task: FleetTask, task_id: str, force: bool = False, retry: bool = True) -> None:
    """Bring Forgejo to the task's current state; ``ForgejoUnavailable`` retries with backoff
    (unless ``retry`` is false: the outbox sweep's one-shot tries)."""
    settings = task.settings
    if not settings.forgejo.enabled:
        return
    try:
        outcome = writeback.sync(
            task.runtime.database,
            client_for(settings),
            task_id,
            redact=redactor_for(settings).redact_text,
            force=force,
            target_url=task_url(settings, task_id),
        )
    except (ForgejoUnavailable, SoftTimeLimitExceeded) as error:
        if retry:
            if isinstance(error, SoftTimeLimitExceeded):
                raise ForgejoUnavailable("the write-back ran out of time") from error
            raise
        task.log("forgejo write-back of %s: %s; the outbox sweep will try again", task_id, error)
        return
    if outcome in (writeback.Outcome.SYNCED, writeback.Outcome.GAVE_UP):
        task.log("forgejo write-back of %s: %s", task_id, outcome)


def forgejo_outbox(task: FleetTask) -> None:
    """Re-send the sync of Forgejo tasks whose latest state Forgejo does not show yet and
    whose last attempt is older than the re-send interval (marked, then sent after commit)."""
    settings = task.settings
    if not settings.forgejo.enabled:
        return
    with task.session() as session:
        due = writeback.due_for_sync(
            session, utcnow(), limit=settings.orchestrator.sweep_batch_size
        )
    if not due:
        return
    publisher = task.runtime.publisher
    publisher.publish([sync_message(task_id, retry=False) for task_id in due])
    publisher.flush(FLUSH_SECS)
    task.log("forgejo_outbox: %d sync(s)", len(due))


def task_url(settings: Settings, task_id: str) -> str:
    """Where a commit status links to: the task in the API, when its public URL is known."""
    base = settings.server.public_url.rstrip("/")
    return f"{base}/api/v1/tasks/{task_id}" if base else ""


def client_for(settings: Settings) -> ForgejoClient:
    """This process's client for ``[forgejo]`` (a forked child builds its own)."""
    return _client(os.getpid(), settings.forgejo.url, settings.forgejo.token)


@functools.lru_cache(maxsize=8)
def _client(_pid: int, url: str, token: str) -> ForgejoClient:
    return ForgejoClient(url, token, timeout=CLIENT_TIMEOUT, retries=1)


def redactor_for(settings: Settings) -> Redactor:
    """Redacts configured secrets, patterns and Forgejo's own credentials from what is posted."""
    orch, forgejo = settings.orchestrator, settings.forgejo
    return _redactor((*orch.secrets, forgejo.token, forgejo.webhook_secret), orch.redact_patterns)


@functools.lru_cache(maxsize=8)
def _redactor(secrets: tuple[str, ...], patterns: tuple[str, ...]) -> Redactor:
    return Redactor(secrets, patterns)
