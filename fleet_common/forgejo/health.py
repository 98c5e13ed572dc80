"""Intake health per repository: when a webhook last arrived, when reconcile last ran, the last
error. Written by the webhook intake and the reconcile sweep, read by the API and ``fleet doctor``.

Rows are upserted (``INSERT … ON CONFLICT DO UPDATE``), so two deliveries for a repository seen
for the first time never collide on its primary key. Callers write health *last* in their
transaction: task rows are always locked before the health row, so the two never deadlock.

``last_webhook_at`` is kept to within :data:`WEBHOOK_RESOLUTION`: a delivery writes it only when
the stored time is older than that. Otherwise every delivery for a repository would update the
same row and hold its lock until commit, serialising all concurrent deliveries behind it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fleet_common.forgejo.models import IntakeHealth
from fleet_common.settings import Settings
from fleet_common.sql import insert_for

MAX_ERROR_CHARS = 2000
#: How stale ``last_webhook_at`` may be (see the module docstring).
WEBHOOK_RESOLUTION = dt.timedelta(seconds=1)

_TABLE = IntakeHealth.__table__


@dataclass(frozen=True)
class RepoHealth:
    """What ``GET /intake/health`` shows for one repository."""

    repo: str
    configured: bool  # listed in ``[forgejo] repos`` (reconciled periodically)
    last_webhook_at: dt.datetime | None
    last_reconcile_at: dt.datetime | None
    last_error: str | None
    last_error_at: dt.datetime | None


def touch(session: Session, repo: str, **values: Any) -> None:
    """Set columns of ``repo``'s health row, creating the row if needed."""
    if not repo:
        return
    statement = insert_for(session, IntakeHealth).values(repo=repo, **values)
    session.execute(statement.on_conflict_do_update(index_elements=["repo"], set_=values))


def last_webhook_of(repo: Any) -> Any:
    """A scalar subquery: ``repo``'s stored ``last_webhook_at`` (``NULL`` without a row), for a
    caller to read within a statement of its own (one round trip fewer)."""
    return select(_TABLE.c.last_webhook_at).where(_TABLE.c.repo == repo).scalar_subquery()


def webhook_seen(session: Session, repo: str, now: dt.datetime, last: dt.datetime | None) -> None:
    """Note a delivery for ``repo`` at ``now``, given the stored ``last`` time (a plain read,
    see :func:`last_webhook_of`): written (which locks the row until commit) only when that is
    :data:`WEBHOOK_RESOLUTION` older, and not while another transaction holds the row (on
    PostgreSQL): usually a concurrent delivery writing a time as recent as this one. Without
    that, every delivery that read the stale time in the same moment would write it too, each
    waiting for the previous one's commit; skipped, the time is written by the first delivery
    after that transaction ends."""
    if not repo or (last is not None and last >= now - WEBHOOK_RESOLUTION):
        return
    if last is None:  # no row, or never a webhook: created or set as before
        touch(session, repo, last_webhook_at=now)
        return
    stale = (
        select(_TABLE.c.repo)
        .where(_TABLE.c.repo == repo, _TABLE.c.last_webhook_at < now - WEBHOOK_RESOLUTION)
        .with_for_update(skip_locked=True)  # PostgreSQL; SQLite has one writer at a time
        .scalar_subquery()
    )
    session.execute(
        update(IntakeHealth).where(IntakeHealth.repo == stale).values(last_webhook_at=now)
    )


def record_error(session: Session, repo: str, message: str, now: dt.datetime) -> None:
    """Remember the latest intake error for ``repo``."""
    touch(session, repo, last_error=message[:MAX_ERROR_CHARS], last_error_at=now)


def intake_health(session: Session, settings: Settings) -> list[RepoHealth]:
    """Every repository with a health row, plus the configured ones that have none yet."""
    configured = set(settings.forgejo.repos)
    rows = {row.repo: row for row in session.scalars(select(IntakeHealth))}
    result = [
        RepoHealth(
            repo=row.repo,
            configured=row.repo in configured,
            last_webhook_at=row.last_webhook_at,
            last_reconcile_at=row.last_reconcile_at,
            last_error=row.last_error,
            last_error_at=row.last_error_at,
        )
        for row in rows.values()
    ]
    result += [
        RepoHealth(repo, True, None, None, None, None) for repo in configured if repo not in rows
    ]
    return sorted(result, key=lambda item: (not item.configured, item.repo))
