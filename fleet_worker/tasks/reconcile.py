"""``fleet.sweep.reconcile``: for each repository in ``[forgejo] repos``, repair what lost
webhooks missed (``fleet_common.forgejo.reconcile``), one unit of work per repository, then
wake workers for the tasks it created. Beat runs it every ``reconcile_interval_secs`` when
Forgejo is configured.
"""

from __future__ import annotations

from typing import Any

from fleet_common.db import utcnow
from fleet_common.forgejo.client import forgejo_client
from fleet_common.forgejo.reconcile import reconcile
from fleet_worker.base import FleetTask
from fleet_worker.runtime import runtime_of
from fleet_worker.schedule import RECONCILE_TASK

#: Listing a large repository's issues takes a while; a stuck Forgejo is cut off by the
#: client's own timeouts long before this.
SOFT_TIME_LIMIT_SECS = 600
TIME_LIMIT_SECS = 660
#: How long the task waits for its wake-ups to leave (the relay re-sends them if not).
FLUSH_SECS = 10.0


def register(app: Any) -> None:
    """Add the reconcile task to ``app`` (an app made by ``make_celery``)."""
    interval = runtime_of(app).settings.forgejo.reconcile_interval_secs
    app.task(
        name=RECONCILE_TASK,
        base=FleetTask,
        bind=True,
        shared=False,
        expires=float(interval),
        soft_time_limit=SOFT_TIME_LIMIT_SECS,
        time_limit=TIME_LIMIT_SECS,
    )(reconcile_repos)


def reconcile_repos(task: FleetTask) -> None:
    """Reconcile every configured repository; one failing repository does not stop the rest
    (its error is recorded in intake health)."""
    settings = task.settings
    if not settings.forgejo.enabled:
        return
    with forgejo_client(settings.forgejo) as client:
        for repo in settings.forgejo.repos:
            with task.session() as session:
                result = reconcile(session, settings, client, repo, utcnow())
            if result.publish:
                task.runtime.publisher.publish(result.publish)
            if result.task_ids or result.error:
                task.log(
                    "reconcile %s: created %d, cancelled %d, completed %d, failed %d%s",
                    repo,
                    len(result.created),
                    len(result.cancelled),
                    len(result.completed),
                    len(result.failed),
                    f" ({result.error})" if result.error else "",
                )
    task.runtime.publisher.flush(FLUSH_SECS)
