"""Beat entries as data: what runs periodically, how often, and when a late message expires."""

from __future__ import annotations

from typing import Any

from fleet_common.settings import Settings
from fleet_common.sweeps import SWEEPS

#: The queue ``fleet beat`` (and later every ``fleet worker``) consumes for the sweeps.
SWEEPS_QUEUE = "fleet.sweeps"
#: The Forgejo write-back's syncs (``fleet.forgejo.sync``), also consumed by ``fleet beat``.
FORGEJO_QUEUE = "fleet.forgejo"

SWEEP_PREFIX = "fleet.sweep."
RELAY_TASK = "fleet.sweep.relay"
BROKER_FILES_TASK = "fleet.sweep.broker_files"
RECONCILE_TASK = "fleet.sweep.reconcile"
FORGEJO_OUTBOX_TASK = "fleet.sweep.forgejo_outbox"
DELIVERIES_TASK = "fleet.sweep.deliveries"


def sweep_task_name(sweep: str) -> str:
    """The Celery task name of a ``fleet_common.sweeps.SWEEPS`` entry: ``fleet.sweep.<key>``."""
    return SWEEP_PREFIX + sweep


def _entry(task: str, every: float, expires: float) -> dict[str, Any]:
    # expires: a message older than this is dropped by the worker, so a backlog of beat
    # messages (beat ran while no worker did) collapses instead of running the sweep N times.
    return {
        "task": task,
        "schedule": float(every),
        "options": {"expires": float(expires), "queue": SWEEPS_QUEUE},
    }


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The ``beat_schedule`` of ``settings``: every sweep, the relay and the webhook deliveries'
    retention each ``orchestrator.sweep_interval_secs``; the broker's file cleanup on the
    filesystem broker; the Forgejo reconcile every ``forgejo.reconcile_interval_secs`` when
    repos are configured; the Forgejo write-back's outbox every sweep interval when Forgejo is
    configured."""
    every = settings.orchestrator.sweep_interval_secs
    entries = {f"sweep-{key}": _entry(sweep_task_name(key), every, every) for key in SWEEPS}
    entries["sweep-relay"] = _entry(RELAY_TASK, every, every)
    entries["sweep-deliveries"] = _entry(DELIVERIES_TASK, every, every)
    if settings.broker_url.startswith("filesystem:"):
        entries["sweep-broker-files"] = _entry(BROKER_FILES_TASK, 60, 60)
    if settings.forgejo.enabled:
        entries["sweep-forgejo-outbox"] = _entry(FORGEJO_OUTBOX_TASK, every, every)
    if settings.forgejo.enabled and settings.forgejo.repos:
        reconcile_every = settings.forgejo.reconcile_interval_secs
        entries["sweep-reconcile"] = _entry(RECONCILE_TASK, reconcile_every, reconcile_every)
    return entries
