"""Pull requests and the tasks they belong to: attach, record, and the two PR transitions.

A PR belongs to a task when it comes from the task's branch ``fleet/<task_id>`` or closes the
task's issue under Forgejo's own keyword rules (``references.pull_links_task``). Attaching sets
``pr_number``, ``pr_url`` and ``pr_head_sha`` and writes a ``pr_attached`` event. The state
machine's PR moves are ``in_review → completed`` (merged) and ``in_review → failed``
(``pr_closed``, closed without merge).

A PR merged *before* its task reached ``in_review`` (an agent still running, a person merging
fast) is recorded (``pr_merged`` event, no transition); the receipt that names it then completes
the task, since receipt validation sees the PR merged. The issue closed by that merge does not
cancel the task either (:func:`merged_pr_recorded`), so the two events may come in either order.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from fleet_common.forgejo.events import PullInfo
from fleet_common.forgejo.references import (
    closing_issue_numbers,
    pull_links_task,
    task_id_from_branch,
)
from fleet_common.tasks import state
from fleet_common.tasks.models import TERMINAL, Task, TaskEvent, TaskStatus
from fleet_common.tasks.state import Reason

_PULL_REF_PREFIX = "refs/pull/"


@dataclass(frozen=True, slots=True)
class PullRef:
    """The parts of a PR Fleet acts on, from a webhook or from the REST API."""

    number: int
    title: str
    body: str
    state: str
    merged: bool
    head_branch: str | None
    head_sha: str
    html_url: str
    base_repo: str  # full name of the repository the PR targets ("" when not given)

    @classmethod
    def from_event(cls, pull: PullInfo, repo: str) -> PullRef:
        """From a webhook's ``pull_request`` (the delivery's repository is the base)."""
        return cls(
            number=pull.number,
            title=pull.title,
            body=pull.body,
            state=pull.state,
            merged=pull.merged,
            head_branch=pull.head_branch,
            head_sha=pull.head_sha,
            html_url=pull.html_url,
            base_repo=repo,
        )

    @classmethod
    def from_api(cls, pull: dict[str, Any]) -> PullRef:
        """From ``GET /repos/{o}/{r}/pulls/{n}`` (every key treated as optional)."""
        head, base = _obj(pull.get("head")), _obj(pull.get("base"))
        ref, label = _str(head.get("ref")), _str(head.get("label"))
        number = pull.get("number")
        return cls(
            number=number if isinstance(number, int) and not isinstance(number, bool) else 0,
            title=_str(pull.get("title")),
            body=_str(pull.get("body")),
            state=_str(pull.get("state")),
            merged=pull.get("merged") is True,
            head_branch=ref if ref and not ref.startswith(_PULL_REF_PREFIX) else (label or None),
            head_sha=_str(head.get("sha")),
            html_url=_str(pull.get("html_url")),
            base_repo=_str(_obj(base.get("repo")).get("full_name")),
        )

    @property
    def closed_unmerged(self) -> bool:
        return self.state == "closed" and not self.merged


def links(task: Task, pull: PullRef, server_url: str | None) -> bool:
    """True when ``pull`` belongs to ``task`` (its branch, or it closes the task's issue)."""
    return pull_links_task(
        title=pull.title,
        body=pull.body,
        head_branch=pull.head_branch,
        repo_full_name=task.repo or "",
        issue_number=task.issue_number,
        task_id=task.id,
        server_url=server_url,
    )


def linked_tasks(session: Session, repo: str, pull: PullRef, server_url: str | None) -> list[Task]:
    """The non-terminal tasks of ``repo`` that ``pull`` belongs to, locked, in id order."""
    conditions = []
    branch_task = task_id_from_branch(pull.head_branch)
    if branch_task:
        conditions.append(Task.id == branch_task)
    numbers = closing_issue_numbers(pull.title, pull.body, repo, server_url=server_url)
    if numbers:
        conditions.append(Task.issue_number.in_(numbers))
    if not conditions:
        return []
    return _locked(session, repo, conditions)


def attached_tasks(session: Session, repo: str, number: int) -> list[Task]:
    """The non-terminal tasks ``repo``'s PR ``number`` is attached to, locked, in id order."""
    return _locked(session, repo, [Task.pr_number == number])


def _locked(session: Session, repo: str, conditions: list[Any]) -> list[Task]:
    query = (
        select(Task)
        .where(Task.repo == repo, Task.status.not_in(TERMINAL), or_(*conditions))
        .order_by(Task.id)
        .with_for_update()
    )
    return list(session.scalars(query))


def attach(
    session: Session, task: Task, pull: PullRef, *, actor: str, now: dt.datetime | None = None
) -> bool:
    """Attach ``pull`` to ``task`` (``pr_attached``); False when it already was, unchanged."""
    unchanged = (
        task.pr_number == pull.number
        and task.pr_head_sha == (pull.head_sha or task.pr_head_sha)
        and task.pr_url == (pull.html_url or task.pr_url)
    )
    if unchanged:
        return False
    previous = task.pr_number
    data: dict[str, Any] = {"pr_number": pull.number, "pr_url": pull.html_url}
    data["head_sha"] = pull.head_sha or None
    if previous not in (None, pull.number):
        data["replaced_pr_number"] = previous
    changes = {
        "pr_number": pull.number,
        "pr_url": pull.html_url or task.pr_url,
        "pr_head_sha": pull.head_sha or None,
    }
    state.transition(
        session,
        task,
        task.status,
        event="pr_attached",
        actor=actor,
        changes=changes,
        data=data,
        now=now,
    )
    return True


def detach(session: Session, task: Task, *, actor: str, now: dt.datetime) -> None:
    """The PR no longer belongs to ``task`` (its references were edited away)."""
    data = {"pr_number": task.pr_number}
    changes = {"pr_number": None, "pr_url": None, "pr_head_sha": None}
    state.transition(
        session,
        task,
        task.status,
        event="pr_detached",
        actor=actor,
        changes=changes,
        data=data,
        now=now,
    )


def record(
    session: Session, task: Task, event: str, pull: PullRef, *, actor: str, now: dt.datetime
) -> None:
    """An event about ``task``'s PR without a status change (synchronized, merged early…)."""
    changes: dict[str, Any] = {}
    if pull.head_sha and task.pr_number == pull.number:
        changes["pr_head_sha"] = pull.head_sha
    data = {"pr_number": pull.number, "head_sha": pull.head_sha or None}
    state.transition(
        session, task, task.status, event=event, actor=actor, changes=changes, data=data, now=now
    )


def complete_merged(
    session: Session, task: Task, pull: PullRef, *, actor: str, now: dt.datetime
) -> None:
    """``in_review → completed``: the task's PR was merged."""
    data = {"pr_number": pull.number, "pr_url": pull.html_url or task.pr_url}
    state.transition(
        session, task, TaskStatus.COMPLETED, event="pr_merged", actor=actor, data=data, now=now
    )
    task.finished_at = now


def fail_closed(
    session: Session, task: Task, pull: PullRef, *, actor: str, now: dt.datetime
) -> None:
    """``in_review → failed (pr_closed)``: a person closed the PR without merging it."""
    error = f"pull request #{pull.number} was closed without being merged"
    state.transition(
        session,
        task,
        TaskStatus.FAILED,
        event="pr_closed",
        actor=actor,
        changes={"failure_reason": Reason.PR_CLOSED, "last_error": error},
        data={"pr_number": pull.number},
        now=now,
    )
    task.finished_at = now


def fail_unverifiable(
    session: Session, task: Task, error: str, *, actor: str, now: dt.datetime
) -> None:
    """``in_review → failed (receipt_invalid)``: the PR a receipt named, accepted while Forgejo
    was unreachable, turned out not to qualify. A task in review has no attempt to retry."""
    state.transition(
        session,
        task,
        TaskStatus.FAILED,
        event="failed",
        actor=actor,
        changes={"failure_reason": Reason.RECEIPT_INVALID, "last_error": error[:4000]},
        data={"attempt": task.attempt, "reason": str(Reason.RECEIPT_INVALID)},
        now=now,
    )
    task.finished_at = now


def merged_pr_recorded(session: Session, task: Task) -> bool:
    """True when a PR of ``task`` was merged before the task reached ``in_review``."""
    if task.pr_number is None:
        return False
    query = select(TaskEvent.id).where(
        TaskEvent.task_id == task.id,
        TaskEvent.type == "pr_merged",
        TaskEvent.to_status == task.status,
    )
    return session.scalars(query.limit(1)).first() is not None


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""
