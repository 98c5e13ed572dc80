"""``fleet.dispatch``: a wake-up for a worker that serves a host. The message names a task, but
it is only a hint: the worker claims the best eligible task for its slots in the database, so a
duplicate or stale message finds nothing and is dropped. One message may stand for ``count``
wake-ups on its queue (the publisher sends a batch's wake-ups for one queue together): the
worker then claims for up to that many of its free places at once."""

from __future__ import annotations

from typing import Any

from fleet_worker.base import FleetTask
from fleet_worker.publisher import DISPATCH_TASK


def register(app: Any) -> None:
    """Add ``fleet.dispatch`` to ``app``."""
    app.task(name=DISPATCH_TASK, base=FleetTask, bind=True, acks_late=True, shared=False)(dispatch)


def dispatch(task: FleetTask, task_id: str, count: int = 1) -> None:
    host = getattr(task.app, "fleet_host", None)
    if host is None:
        task.log("no host served by this process; wake-up for %s dropped", task_id)
        return
    delivery = task.request.delivery_info or {}
    ran = host.serve(delivery.get("routing_key"), count)
    if ran:  # each attempt's outcome has a line of its own (INFO)
        task.debug("woken for %s (x%d): ran %d attempt(s)", task_id, count, ran)
