"""The API's side of the Forgejo write-back: after a request commits a change to a Forgejo
task, queue that task's sync (``fleet.forgejo.sync``) on the publisher's background thread, so
the request never waits for the broker, let alone for Forgejo.

Two sources: every commit that writes a state change of a Forgejo task (any endpoint), and the
webhook receiver's ``FleetContext.on_forgejo_change`` hook, which also names tasks a delivery
changed without a state change (a sync is then forced). A task already queued by the first in
the same request is not queued twice. What a lost message misses, the outbox sweep sends.
"""

from __future__ import annotations

from typing import Any

from flask import g, has_app_context

from fleet_api.context import FleetContext
from fleet_common.db import Database
from fleet_common.forgejo import writeback

_SENT = "fleet_forgejo_synced"


def install(ctx: FleetContext, db: Database, publisher: Any) -> None:
    """Queue syncs through ``publisher`` (a ``fleet_worker.publisher.Publisher``)."""
    from fleet_worker.tasks.forgejo import sync_messages

    def committed(task_ids: list[str]) -> None:
        publisher.publish(sync_messages(task_ids))
        if has_app_context():
            g.setdefault(_SENT, set()).update(task_ids)

    def changed(task_ids: list[str]) -> None:
        sent = g.get(_SENT, set()) if has_app_context() else set()
        rest = [task_id for task_id in task_ids if task_id not in sent]
        if rest:
            publisher.publish(sync_messages(rest, force=True))

    writeback.watch(db, committed)
    ctx.on_forgejo_change = changed
