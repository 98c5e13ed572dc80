"""What the holder of a task's lease may do: start, report, complete, fail.

Every write is fenced: the caller must be the agent holding the current lease and present its
token. A zombie (an earlier holder) gets StaleLease; an agent that never held the task gets
NotFound, exactly as if the task did not exist.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_common.auth import tokens
from fleet_common.db import utcnow
from fleet_common.errors import IllegalTransition, InvalidInput, NotFound, StaleLease
from fleet_common.settings import OrchestratorSettings
from fleet_common.tasks import state
from fleet_common.tasks.models import ACTIVE, Task, TaskEvent, TaskStatus
from fleet_common.tasks.state import Reason

# Decides whether a receipt naming a PR sends the task to in_review (a Forgejo-connected repo)
# and may reject the PR; returns (in_review, error) — error fails the attempt receipt_invalid.
PrCheck = Callable[[Task, dict[str, Any]], tuple[bool, str | None]]


def no_forge(_task: Task, _receipt: dict[str, Any]) -> tuple[bool, str | None]:
    return False, None


@dataclass(frozen=True)
class Held:
    task: Task
    cancelled: bool  # cancelled while held: the agent must stop; only logs are still taken


def held_task(
    session: Session, task_id: str, agent_id: str, lease_token: str, *, now: dt.datetime
) -> Held:
    """The task ``agent_id`` holds with ``lease_token``, locked for this transaction."""
    task = session.scalars(select(Task).where(Task.id == task_id).with_for_update()).first()
    return check(session, task, task_id, agent_id, lease_token, now=now)


def check(
    session: Session,
    task: Task | None,
    task_id: str,
    agent_id: str,
    lease_token: str,
    *,
    now: dt.datetime,
) -> Held:
    """Fence one write: Held, StaleLease (an earlier holder) or NotFound (anyone else)."""
    if task is None:
        raise NotFound(f"no task {task_id}")
    if task.agent_id == agent_id and tokens.matches(lease_token, task.lease_digest):
        if task.status == TaskStatus.CANCELLED and task.cancel_requested:
            return Held(task, cancelled=True)
        if task.status in ACTIVE and task.lease_expires_at and task.lease_expires_at > now:
            return Held(task, cancelled=False)
        raise StaleLease("this lease has expired or ended")
    if _ever_held(session, task_id, agent_id):
        raise StaleLease("this lease is no longer current: the task was taken by another attempt")
    raise NotFound(f"no task {task_id}")


def _ever_held(session: Session, task_id: str, agent_id: str) -> bool:
    query = select(TaskEvent.id).where(
        TaskEvent.task_id == task_id,
        TaskEvent.type == "dispatched",
        TaskEvent.actor == f"agent:{agent_id}",
    )
    return session.scalars(query.limit(1)).first() is not None


def _require_live(held: Held) -> Task:
    if held.cancelled:
        raise IllegalTransition("the task was cancelled")
    return held.task


def report_status(
    session: Session, held: Held, status: str, message: str | None, *, now: dt.datetime
) -> Task:
    """Progress from the agent; ``running`` from ``dispatched`` starts the task."""
    if held.cancelled:
        return held.task
    task = held.task
    if status != TaskStatus.RUNNING:
        raise InvalidInput(f"status: an agent can report only 'running', not {status!r}")
    if task.status == TaskStatus.DISPATCHED:
        data = {"message": message} if message else None
        state.transition(
            session,
            task,
            TaskStatus.RUNNING,
            event="started",
            actor=f"agent:{task.agent_id}",
            data=data,
            now=now,
        )
        task.started_at = now
    return task


def renew(task: Task, settings: OrchestratorSettings, now: dt.datetime) -> dt.datetime:
    """Extend the lease (no event: renewals are not state changes)."""
    task.lease_expires_at = now + dt.timedelta(seconds=settings.lease_secs)
    return task.lease_expires_at


def complete(
    session: Session,
    settings: OrchestratorSettings,
    held: Held,
    receipt: dict[str, Any],
    *,
    pr_check: PrCheck = no_forge,
    now: dt.datetime | None = None,
) -> Task:
    """Apply a receipt: completed, in_review, or a failed attempt (exit code, no PR, invalid)."""
    task = _require_live(held)
    now = now or utcnow()
    actor = f"agent:{task.agent_id}"
    exit_code = receipt.get("exit_code", 0)
    if exit_code != 0:
        return fail_attempt(
            session,
            settings,
            task,
            Reason.EXIT_CODE,
            f"agent exited with {exit_code}",
            actor=actor,
            now=now,
            receipt=receipt,
        )
    has_pr = bool(receipt.get("pr_url") or receipt.get("pr_number"))
    if not has_pr and task.requires_pr:
        return fail_attempt(
            session,
            settings,
            task,
            Reason.NO_PR,
            "the receipt names no pull request",
            actor=actor,
            now=now,
            receipt=receipt,
        )
    in_review = False
    if has_pr:
        in_review, error = pr_check(task, receipt)
        if error:
            return fail_attempt(
                session,
                settings,
                task,
                Reason.RECEIPT_INVALID,
                error,
                actor=actor,
                now=now,
                receipt=receipt,
            )
    artifacts = list(task.artifacts or [])
    if has_pr:
        artifacts.append(
            {
                "kind": "pull_request",
                "url": receipt.get("pr_url"),
                "number": receipt.get("pr_number"),
            }
        )
    target = TaskStatus.IN_REVIEW if in_review else TaskStatus.COMPLETED
    state.transition(
        session,
        task,
        target,
        event="in_review" if in_review else "completed",
        actor=actor,
        changes={"receipt": receipt, "artifacts": artifacts},
        now=now,
    )
    if target == TaskStatus.COMPLETED:
        task.finished_at = now
    task.lease_expires_at = None
    return task


def fail(
    session: Session,
    settings: OrchestratorSettings,
    held: Held,
    error: str,
    *,
    reason: str = Reason.EXIT_CODE,
    retryable: bool = True,
    now: dt.datetime | None = None,
) -> Task:
    """The agent reports that its attempt failed."""
    task = _require_live(held)
    if reason not in state.ATTEMPT_REASONS:
        raise InvalidInput(f"reason: must be one of {sorted(state.ATTEMPT_REASONS)}")
    return fail_attempt(
        session,
        settings,
        task,
        Reason(reason),
        error,
        actor=f"agent:{task.agent_id}",
        retryable=retryable,
        now=now,
    )


def fail_attempt(
    session: Session,
    settings: OrchestratorSettings,
    task: Task,
    reason: Reason,
    error: str,
    *,
    actor: str,
    retryable: bool = True,
    now: dt.datetime | None = None,
    receipt: dict[str, Any] | None = None,
) -> Task:
    """End the current attempt: back to queued after the backoff while retries remain,
    otherwise (or for a non-retryable failure) failed for good."""
    now = now or utcnow()
    changes: dict[str, Any] = {"failure_reason": reason, "last_error": error[:4000]}
    if receipt is not None:
        changes["receipt"] = receipt
    data = {"attempt": task.attempt, "reason": str(reason)}
    if retryable and reason in state.ATTEMPT_REASONS and state.retries_left(task) > 0:
        delay = state.backoff_secs(settings, task.attempt - task.retry_base)
        changes.update(
            attempt=task.attempt + 1,
            agent_id=None,
            not_before=now + dt.timedelta(seconds=delay),
        )
        state.transition(
            session,
            task,
            TaskStatus.QUEUED,
            event="attempt_failed",
            actor=actor,
            changes=changes,
            data={**data, "retry_in_secs": delay},
            now=now,
        )
        task.last_published_at = None
    else:
        state.transition(
            session,
            task,
            TaskStatus.FAILED,
            event="failed",
            actor=actor,
            changes=changes,
            data=data,
            now=now,
        )
        task.finished_at = now
    task.lease_digest = None
    task.lease_expires_at = None
    session.flush()
    return task
