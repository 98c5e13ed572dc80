"""Forgejo write-back: bring an issue's status comment, ``fleet/*`` label and commit status to
its task's *current* state.

:func:`sync` is idempotent and renders the row as it is when it runs, so a late or repeated
run never shows an older state. Two runs never write for one task at once: a run first takes
the task's sync lease (``forgejo_sync_until``, a conditional update committed at once), then
talks to Forgejo with no transaction open (Forgejo being slow or down never holds a lock a
state change needs), then marks the sequence number it rendered as synced only if the task has
not moved meanwhile (compare-and-set on ``event_seq``); if it has, it renders again.

Tasks whose latest state Forgejo does not show yet (``forgejo_synced_seq < event_seq``) form
the outbox; :func:`due_for_sync` is the sweep that re-sends their write-back after an outage
or a lost message. :func:`watch` tells a process's caller about every committed state change
of a Forgejo task, so the write-back can be queued at once.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sqlalchemy import event, or_, select, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Session, sessionmaker

from fleet_common.agents.models import Agent
from fleet_common.db import Database, utcnow
from fleet_common.forgejo.client import (
    ForgejoClient,
    ForgejoError,
    ForgejoNotFound,
    ForgejoUnavailable,
)
from fleet_common.forgejo.status_view import (
    COMMIT_CONTEXT,
    LABELS,
    View,
    comment_marker,
    desired_view,
    pr_number_of,
    tail,
)
from fleet_common.tasks import logs
from fleet_common.tasks.models import Task, TaskStatus

__all__ = ["Outcome", "View", "desired_view", "due_for_sync", "sync", "watch"]

log = logging.getLogger("fleet.forgejo")

#: How long a run may hold a task's write-back; a run killed mid-way frees it after this.
SYNC_LEASE_SECS = 150
#: A run that finds the task moved on renders again, at most this many times.
MAX_PASSES = 5
#: The outbox sweep re-sends a task's write-back when its last attempt is this old...
RESYNC_AFTER_SECS = 10
#: ...and its last change this recent: Forgejo configured after the fact, or back after a week,
#: is not told about old tasks.
OUTBOX_HORIZON = dt.timedelta(days=7)
LOG_TAIL_BYTES = 8192

Redact = Callable[[str], str]


class Outcome(StrEnum):
    SYNCED = "synced"  # Forgejo shows the task's current state
    CURRENT = "current"  # nothing to do: it already did
    BUSY = "busy"  # another run holds the task's write-back (it renders the latest state)
    SKIPPED = "skipped"  # no such task, or not a Forgejo task
    GAVE_UP = "gave_up"  # Forgejo refused for good (no issue, no access): this state is skipped


@dataclass
class _Snapshot:
    task: Task
    agent_name: str | None
    log_tail: str
    comment_id: int | None = field(default=None)


def sync(
    db: Database,
    client: ForgejoClient,
    task_id: str,
    *,
    redact: Redact = lambda text: text,
    force: bool = False,
    target_url: str = "",
) -> Outcome:
    """Converge Forgejo to task ``task_id``'s current state.

    ``force`` writes even when the outbox says Forgejo is up to date (a PR linked without a
    state change). Raises ``ForgejoUnavailable`` (the lease released) for the caller to retry.
    """
    snap, outcome = _start(db, task_id, force=force)
    if snap is None:
        return outcome
    try:
        for _ in range(MAX_PASSES):
            view = desired_view(snap.task, snap.agent_name, redact(snap.log_tail))
            refused = _write(client, snap, view, redact, target_url)
            with db.session() as session:
                if _finish(session, snap, utcnow()):
                    return Outcome.GAVE_UP if refused else Outcome.SYNCED
                # The task moved on while we wrote: render its new state, still holding it.
                moved = _snapshot(session, task_id)
                if moved is None:
                    return Outcome.SKIPPED
                moved.comment_id = snap.comment_id
                _hold(session, task_id, _lease_end(), moved.comment_id)
                snap = moved
    except BaseException:
        _release(db, task_id, snap.comment_id)
        raise
    _release(db, task_id, snap.comment_id)
    log.info("forgejo write-back of %s: still moving; the outbox sweep will finish", task_id)
    return Outcome.BUSY


def due_for_sync(
    session: Session,
    now: dt.datetime,
    *,
    limit: int,
    resync_after_secs: float = RESYNC_AFTER_SECS,
) -> list[str]:
    """Outbox tasks whose last write-back attempt (or last change) is older than
    ``resync_after_secs``, oldest first, marked as attempted now; send their syncs after the
    caller's unit of work commits."""
    cutoff = now - dt.timedelta(seconds=resync_after_secs)
    rows = session.scalars(
        select(Task)
        .where(
            Task.issue_number.is_not(None),
            Task.forgejo_synced_seq < Task.event_seq,
            Task.updated_at < cutoff,
            Task.updated_at > now - OUTBOX_HORIZON,
            or_(Task.forgejo_sync_until.is_(None), Task.forgejo_sync_until < cutoff),
        )
        .order_by(Task.updated_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = []
    for task in rows:
        task.forgejo_sync_until = now
        ids.append(task.id)
    return ids


_CHANGED = "fleet.forgejo.changed"


def watch(
    sessions: Database | sessionmaker[Session], callback: Callable[[list[str]], None]
) -> None:
    """After every commit that changed the state of Forgejo tasks (new events), call
    ``callback(task_ids)``; a callback error is logged, never raised into the committer."""
    factories = sessions.factories if isinstance(sessions, Database) else (sessions,)

    def collect(session: Session, _context: Any, _instances: Any) -> None:
        for obj in (*session.new, *session.dirty):
            if isinstance(obj, Task) and obj.issue_number is not None and _moved(obj, session):
                session.info.setdefault(_CHANGED, set()).add(obj.id)

    def committed(session: Session) -> None:
        ids = session.info.pop(_CHANGED, None)
        if ids:
            try:
                callback(sorted(ids))
            except Exception:
                log.exception("forgejo write-back: could not queue %d sync(s)", len(ids))

    def rolled_back(session: Session, transaction: Any) -> None:
        if not transaction.nested:  # a savepoint's rollback leaves the outer changes standing
            session.info.pop(_CHANGED, None)

    for factory in factories:  # a worker's claim runs in an autocommit session
        event.listen(factory, "before_flush", collect)
        event.listen(factory, "after_commit", committed)
        event.listen(factory, "after_soft_rollback", rolled_back)


def inserted(session: Session, task_ids: Iterable[str]) -> None:
    """Tell :func:`watch` about Forgejo tasks inserted without the unit of work (a Core
    ``INSERT``, which its flush hook does not see): they are announced after commit all the
    same."""
    session.info.setdefault(_CHANGED, set()).update(task_ids)


def _moved(task: Task, session: Session) -> bool:
    if task in session.new:
        return True
    return bool(sa_inspect(task).attrs.event_seq.history.has_changes())


# -- the lease and the compare-and-set ----------------------------------------------------------


def _start(db: Database, task_id: str, *, force: bool) -> tuple[_Snapshot | None, Outcome]:
    now = utcnow()
    with db.session() as session:
        task = session.get(Task, task_id)
        if task is None or task.issue_number is None or not task.repo:
            return None, Outcome.SKIPPED
        if not force and task.forgejo_synced_seq >= task.event_seq:
            return None, Outcome.CURRENT
        held = session.execute(
            update(Task)
            .where(
                Task.id == task_id,
                or_(Task.forgejo_sync_until.is_(None), Task.forgejo_sync_until <= now),
            )
            .values(forgejo_sync_until=_lease_end(now))
            .execution_options(synchronize_session=False)
        )
        if not getattr(held, "rowcount", 0):
            return None, Outcome.BUSY
        session.refresh(task)
        snap = _snapshot(session, task_id)
    return snap, Outcome.SYNCED


def _snapshot(session: Session, task_id: str) -> _Snapshot | None:
    task = session.get(Task, task_id, populate_existing=True)
    if task is None:
        return None
    agent_name = None
    if task.agent_id:
        agent_name = session.scalar(select(Agent.name).where(Agent.id == task.agent_id))
    log_tail = ""
    if task.status == TaskStatus.FAILED and task.log_bytes:
        start = max(0, task.log_bytes - LOG_TAIL_BYTES)
        log_tail = tail(logs.read(session, task, start, LOG_TAIL_BYTES).data)
    session.expunge(task)
    return _Snapshot(task, agent_name, log_tail, task.forgejo_comment_id)


def _finish(session: Session, snap: _Snapshot, now: dt.datetime) -> bool:
    """Mark the rendered seq synced and free the lease, only if the task has not moved."""
    seq = snap.task.event_seq
    query = update(Task).where(Task.id == snap.task.id, Task.event_seq == seq)
    values: dict[str, Any] = {"forgejo_synced_seq": seq, "forgejo_sync_until": now}
    if snap.comment_id is not None:
        values["forgejo_comment_id"] = snap.comment_id
    done = session.execute(query.values(**values).execution_options(synchronize_session=False))
    return bool(getattr(done, "rowcount", 0))


def _lease_end(now: dt.datetime | None = None) -> dt.datetime:
    return (now or utcnow()) + dt.timedelta(seconds=SYNC_LEASE_SECS)


def _hold(session: Session, task_id: str, until: dt.datetime, comment_id: int | None) -> None:
    values: dict[str, Any] = {"forgejo_sync_until": until}
    if comment_id is not None:
        values["forgejo_comment_id"] = comment_id
    session.execute(
        update(Task)
        .where(Task.id == task_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


def _release(db: Database, task_id: str, comment_id: int | None) -> None:
    """Free the lease (keeping a comment id learnt on the way); best effort."""
    try:
        with db.session() as session:
            _hold(session, task_id, utcnow(), comment_id)  # "until now": free, attempted now
    except Exception:  # the lease expires by itself
        log.warning("forgejo write-back of %s: could not release its lease", task_id, exc_info=True)


# -- the writes ---------------------------------------------------------------------------------


def _write(
    client: ForgejoClient, snap: _Snapshot, view: View, redact: Redact, target_url: str
) -> bool:
    """Write the view; True when Forgejo refused a part for good (that part is skipped: no
    retry would help). Forgejo being unavailable, or refusing our token, raises."""
    task = snap.task
    repo, number = str(task.repo), int(task.issue_number or 0)

    def comment() -> None:
        body = redact(view.comment_body)
        snap.comment_id = upsert_comment(client, repo, number, task.id, snap.comment_id, body)

    def status() -> None:
        sha = _head_sha(client, task)
        if sha:
            post_commit_status(client, repo, sha, view, target_url)

    refused = False
    for part in (lambda: sync_labels(client, repo, number, view.label), comment, status):
        try:
            part()
        except ForgejoUnavailable:
            raise
        except ForgejoError as error:
            if error.status == 401:  # a token being fixed: retry until it is
                raise ForgejoUnavailable(str(error), status=401) from error
            log.warning("forgejo write-back of %s: refused, skipped: %s", task.id, error)
            refused = True
    return refused


def sync_labels(client: ForgejoClient, repo: str, number: int, wanted: str | None) -> None:
    """Make ``wanted`` the issue's only ``fleet/*`` label (none when ``None``), creating it in
    the repository if missing. Forgejo allows two labels of one name: the oldest is used."""
    ids: dict[str, list[int]] = {}
    for label in client.list_repo_labels(repo):
        if label.get("name") in LABELS:
            ids.setdefault(label["name"], []).append(int(label["id"]))
    target: int | None = None
    if wanted is not None:
        if wanted not in ids:
            color, description = LABELS[wanted]
            created = client.create_label(
                repo, wanted, color, description=description, exclusive=True
            )
            ids[wanted] = [int(created["id"])]
        target = min(ids[wanted])
    current = _fleet_ids(client.get_issue_labels(repo, number))
    if target is not None and target not in current:
        current = _fleet_ids(client.add_issue_labels(repo, number, [target]))
    for label_id in current:
        if label_id != target:
            try:
                client.remove_issue_label(repo, number, label_id)
            except ForgejoError as error:
                if error.status not in (404, 422):  # already gone
                    raise


def _fleet_ids(labels: Iterable[dict[str, Any]]) -> list[int]:
    return [int(lb["id"]) for lb in labels if lb.get("name") in LABELS]


def upsert_comment(
    client: ForgejoClient,
    repo: str,
    number: int,
    task_id: str,
    comment_id: int | None,
    body: str,
) -> int:
    """Edit the task's status comment in place; create it when it has none (or it was
    deleted), adopting one already posted for the task if its id was never stored."""
    if comment_id is None:
        marker = comment_marker(task_id)
        found = [
            c for c in client.list_issue_comments(repo, number) if marker in (c.get("body") or "")
        ]
        comment_id = int(found[0]["id"]) if found else None
    if comment_id is not None:
        try:
            client.edit_issue_comment(repo, comment_id, body)
            return comment_id
        except ForgejoNotFound:
            pass  # deleted: post a new one
        except ForgejoError as error:
            if error.status != 403:  # someone else's comment: post our own
                raise
    return int(client.create_issue_comment(repo, number, body)["id"])


def post_commit_status(
    client: ForgejoClient, repo: str, sha: str, view: View, target_url: str = ""
) -> bool:
    """Post the view's commit status on ``sha`` unless the latest one of Fleet's context
    already says the same; True when one was posted."""
    for status in client.list_commit_statuses(repo, sha):
        if status.get("context") == COMMIT_CONTEXT:
            if (status.get("status"), status.get("description")) == (
                view.commit_state,
                view.commit_description,
            ):
                return False
            break
    client.create_commit_status(
        repo,
        sha,
        state=view.commit_state,
        context=COMMIT_CONTEXT,
        description=view.commit_description,
        target_url=target_url,
    )
    return True


def _head_sha(client: ForgejoClient, task: Task) -> str | None:
    if task.pr_head_sha:
        return task.pr_head_sha
    number = pr_number_of(task)
    if number is None:
        return None
    try:
        pull = client.get_pull(str(task.repo), number)
    except ForgejoNotFound:
        return None
    sha = (pull.get("head") or {}).get("sha")
    return str(sha) if sha else None
