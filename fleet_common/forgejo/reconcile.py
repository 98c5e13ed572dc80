"""Reconcile one repository with Forgejo: what lost webhooks would have done.

Forgejo never retries a failed delivery, so a periodic sweep (``fleet.sweep.reconcile``, every
``[forgejo] reconcile_interval_secs`` for each of ``[forgejo] repos``) compares Forgejo with the
task table and repairs it:

1. **Open side.** Every open qualifying issue gets a task when it has none at all, or when its
   latest task ended and the issue was labelled again since (``issues.labelled_again``: it was
   cancelled because the issue stopped qualifying, or a qualifying label is new, or a label
   event left it unqualified in between), so the event that made it qualify was lost. An issue
   whose task completed or failed is otherwise left alone: a new task needs a new qualifying
   event, or every failed issue would be retried forever.
2. **Closed side.** Active tasks (queued, dispatched, running) whose issue is closed, gone, or
   no longer qualifying are cancelled (``cancelled_by_issue``), as the webhook would have.
   Tasks created after the sweep started are left alone: the issue list may predate them.
3. **Review side.** Tasks in review follow their PR: merged → completed, closed → failed
   (``pr_closed``); a PR accepted provisionally (Forgejo was down when the receipt came: no
   head SHA yet) is verified now and fails the task ``receipt_invalid`` if it does not qualify.

Each side is bounded by ``orchestrator.sweep_batch_size``; running twice is harmless (each
change re-checks the row under its lock). Decisions are made from Forgejo's answers first and
applied after, so no row is locked while Forgejo is being asked. The outcome is recorded in
intake health: ``last_reconcile_at`` on success, ``last_error`` when Forgejo failed.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_common.forgejo import health, issues, prs
from fleet_common.forgejo.client import ForgejoClient, ForgejoError, ForgejoNotFound
from fleet_common.forgejo.events import IssueInfo
from fleet_common.forgejo.receipts import verify_pull
from fleet_common.settings import Settings
from fleet_common.sweeps import Publish
from fleet_common.tasks.models import TERMINAL, Task, TaskStatus

log = logging.getLogger("fleet.forgejo")

ACTOR = "forgejo:reconcile"
_WORKING = (TaskStatus.QUEUED, TaskStatus.DISPATCHED, TaskStatus.RUNNING)
_IN_CHUNK = 500


@dataclass
class ReconcileResult:
    """What one reconcile of one repository did."""

    repo: str
    created: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    publish: list[Publish] = field(default_factory=list)
    error: str | None = None

    @property
    def task_ids(self) -> list[str]:
        """Tasks whose Forgejo view changed (for a write-back sync)."""
        return self.created + self.cancelled + self.completed + self.failed


def reconcile(
    session: Session, settings: Settings, client: ForgejoClient, repo: str, now: dt.datetime
) -> ReconcileResult:
    """Bring ``repo``'s tasks in line with Forgejo (see the module docstring)."""
    result = ReconcileResult(repo)
    try:
        open_issues = {
            info.number: info
            for info in map(issues.issue_from_api, client.list_issues(repo, state="open"))
            if info.number > 0 and not info.is_pull
        }
        _open_side(session, settings, client, repo, open_issues, now, result)
        _closed_side(session, settings, client, repo, open_issues, now, result)
        _review_side(session, settings, client, repo, now, result)
    except ForgejoError as error:
        result.error = f"reconcile: {error}"
        log.warning("reconcile %s: %s", repo, error)
        health.record_error(session, repo, result.error, now)
        return result
    health.touch(session, repo, last_reconcile_at=now)
    return result


def _open_side(
    session: Session,
    settings: Settings,
    client: ForgejoClient,
    repo: str,
    open_issues: dict[int, IssueInfo],
    now: dt.datetime,
    result: ReconcileResult,
) -> None:
    wanted = [
        n for n, i in open_issues.items() if issues.qualifies(settings.forgejo, i.labels, i.state)
    ]
    latest = _latest_tasks(session, repo, wanted)
    missing = [
        number
        for number in sorted(wanted)
        if issues.labelled_again(
            session, settings.forgejo, latest.get(number), open_issues[number].labels, before=now
        )
    ]
    clone_url = ""
    for number in missing[: settings.orchestrator.sweep_batch_size]:
        if not clone_url:
            clone_url = str(client.get_repo(repo).get("clone_url") or "")
        opened = issues.open_task(
            session,
            settings,
            repo=repo,
            clone_url=clone_url,
            issue=open_issues[number],
            actor=ACTOR,
            now=now,
        )
        if opened.outcome == "created" and opened.task is not None:
            result.created.append(opened.task.id)
            result.publish.extend(issues.wakes(opened))
        elif opened.outcome == "rejected":
            health.record_error(session, repo, opened.detail, now)


def _latest_tasks(session: Session, repo: str, numbers: list[int]) -> dict[int, Task]:
    latest: dict[int, Task] = {}
    for start in range(0, len(numbers), _IN_CHUNK):
        query = (
            select(Task)
            .where(Task.repo == repo, Task.issue_number.in_(numbers[start : start + _IN_CHUNK]))
            .order_by(Task.created_at, Task.id)
        )
        for task in session.scalars(query):
            if task.issue_number is not None:
                latest[task.issue_number] = task
    return latest


def _closed_side(
    session: Session,
    settings: Settings,
    client: ForgejoClient,
    repo: str,
    open_issues: dict[int, IssueInfo],
    now: dt.datetime,
    result: ReconcileResult,
) -> None:
    query = (
        select(Task.id, Task.issue_number)
        .where(
            Task.repo == repo,
            Task.issue_number.is_not(None),
            Task.status.in_(_WORKING),
            Task.created_at < now,
        )
        .order_by(Task.id)
        .limit(settings.orchestrator.sweep_batch_size)
    )
    stale: list[str] = []
    for task_id, number in session.execute(query).all():
        if number is None:
            continue
        issue = open_issues.get(number)
        if issue is None:  # not in the open list: closed, deleted, or reopened since
            try:
                issue = issues.issue_from_api(client.get_issue(repo, number))
            except ForgejoNotFound:
                issue = None
        if issue is None or not issues.qualifies(settings.forgejo, issue.labels, issue.state):
            stale.append(task_id)
    for task_id in stale:
        task = _lock(session, task_id)
        if task is None or task.status not in _WORKING:
            continue
        if issues.stop_task(session, task, actor=ACTOR, now=now) == "cancelled":
            result.cancelled.append(task.id)


def _review_side(
    session: Session,
    settings: Settings,
    client: ForgejoClient,
    repo: str,
    now: dt.datetime,
    result: ReconcileResult,
) -> None:
    query = (
        select(Task.id, Task.pr_number)
        .where(Task.repo == repo, Task.status == TaskStatus.IN_REVIEW, Task.pr_number.is_not(None))
        .order_by(Task.updated_at, Task.id)
        .limit(settings.orchestrator.sweep_batch_size)
    )
    server_url = settings.forgejo.url or None
    for task_id, number in session.execute(query).all():
        if number is None:
            continue
        try:
            pull: prs.PullRef | None = prs.PullRef.from_api(client.get_pull(repo, number))
        except ForgejoNotFound:
            pull = None
        task = _lock(session, task_id)
        if task is None or task.status != TaskStatus.IN_REVIEW or task.pr_number != number:
            continue
        if pull is None:
            error = f"pull request #{number} does not exist in {repo}"
            prs.fail_unverifiable(session, task, error, actor=ACTOR, now=now)
            result.failed.append(task.id)
        elif pull.merged:
            prs.complete_merged(session, task, pull, actor=ACTOR, now=now)
            result.completed.append(task.id)
        elif pull.closed_unmerged:
            prs.fail_closed(session, task, pull, actor=ACTOR, now=now)
            result.failed.append(task.id)
        elif not task.pr_head_sha:  # accepted while Forgejo was unreachable: verify now
            problem = verify_pull(task, pull, server_url)
            if problem:
                prs.fail_unverifiable(session, task, problem, actor=ACTOR, now=now)
                result.failed.append(task.id)
            else:
                prs.attach(session, task, pull, actor=ACTOR, now=now)
        elif pull.head_sha and pull.head_sha != task.pr_head_sha:
            prs.record(session, task, "pr_synchronized", pull, actor=ACTOR, now=now)


def _lock(session: Session, task_id: str) -> Task | None:
    query = select(Task).where(Task.id == task_id, Task.status.not_in(TERMINAL))
    # A row a delivery holds right now is left to that delivery (and the next sweep).
    return session.scalars(query.with_for_update(skip_locked=True)).first()
