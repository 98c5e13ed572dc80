"""The task state machine: which moves are legal, and the one function that makes them.

Every state change goes through :func:`transition`, which updates the task row and appends its
event in the caller's transaction, so the row is always a projection of the log.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

from sqlalchemy.orm import Session

from fleet_common.db import utcnow
from fleet_common.errors import IllegalTransition
from fleet_common.settings import OrchestratorSettings
from fleet_common.tasks.models import Task, TaskEvent, TaskStatus

S = TaskStatus


class Reason(StrEnum):
    EXIT_CODE = "exit_code"
    TIMEOUT = "timeout"
    LEASE_EXPIRED = "lease_expired"
    AGENT_LOST = "agent_lost"
    RECEIPT_INVALID = "receipt_invalid"
    NO_PR = "no_pr"
    PR_CLOSED = "pr_closed"
    NO_CAPABLE_AGENT = "no_capable_agent"
    CANCELLED_BY_USER = "cancelled_by_user"
    CANCELLED_BY_ISSUE = "cancelled_by_issue"


# Reasons that use up an attempt (and so may be retried); the others are terminal at once.
ATTEMPT_REASONS = frozenset(
    {
        Reason.EXIT_CODE,
        Reason.TIMEOUT,
        Reason.LEASE_EXPIRED,
        Reason.AGENT_LOST,
        Reason.RECEIPT_INVALID,
        Reason.NO_PR,
    }
)

ALLOWED: dict[str, frozenset[str]] = {
    S.QUEUED: frozenset({S.DISPATCHED, S.CANCELLED, S.FAILED}),
    S.DISPATCHED: frozenset({S.RUNNING, S.IN_REVIEW, S.COMPLETED, S.QUEUED, S.FAILED, S.CANCELLED}),
    S.RUNNING: frozenset({S.IN_REVIEW, S.COMPLETED, S.QUEUED, S.FAILED, S.CANCELLED}),
    S.IN_REVIEW: frozenset({S.COMPLETED, S.FAILED, S.CANCELLED}),
    S.FAILED: frozenset({S.QUEUED}),
    S.COMPLETED: frozenset(),
    S.CANCELLED: frozenset(),
}

# The task's pull request (set by ``forgejo.prs``: attached, detached, head synchronized).
PR_COLUMNS = ("pr_number", "pr_url", "pr_head_sha")

# The task columns the event log reproduces; ``fleet events verify`` compares exactly these.
PROJECTED = (
    "status",
    "attempt",
    "retry_base",
    "agent_id",
    "assigned_agent_id",
    "priority",
    "max_retries",
    "failure_reason",
    "last_error",
    "not_before",
    "receipt",
    "artifacts",
    *PR_COLUMNS,
)


def to_json(value: Any) -> Any:
    """Column value → JSON-safe value (datetimes as RFC 3339)."""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat()
    return value


def backoff_secs(settings: OrchestratorSettings, attempt: int) -> int:
    """``base × 2^(attempt−1)``, capped at the maximum."""
    exponent = max(attempt - 1, 0)
    if exponent > 30:
        return settings.retry_backoff_max_secs
    return min(settings.retry_backoff_base_secs * 2**exponent, settings.retry_backoff_max_secs)


def retries_left(task: Task) -> int:
    return task.max_retries - (task.attempt - 1 - task.retry_base)


def transition(
    session: Session,
    task: Task,
    to_status: str,
    *,
    event: str,
    actor: str,
    changes: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    now: dt.datetime | None = None,
) -> TaskEvent:
    """Move ``task`` to ``to_status`` (or record a change in place when equal), apply
    ``changes`` to the row and append the event. Raises IllegalTransition, writing nothing."""
    from_status = task.status
    check_move(from_status, to_status)
    return _write(session, task, from_status, to_status, event, actor, changes, data, now)


def check_move(from_status: str, to_status: str) -> None:
    """Raise IllegalTransition unless a task may move from ``from_status`` to ``to_status``
    (equal statuses: a change recorded in place)."""
    if to_status != from_status and to_status not in ALLOWED[from_status]:
        raise IllegalTransition(f"cannot move a task from {from_status} to {to_status}")


def event_data(changes: dict[str, Any], data: dict[str, Any] | None) -> dict[str, Any]:
    """An event's ``data``: ``data`` plus the projected ``changes`` (JSON-safe). Statements
    that move a task in SQL build their event from this, so it is the one :func:`transition`
    would have written."""
    payload: dict[str, Any] = dict(data or {})
    projected = {k: to_json(v) for k, v in changes.items() if k in PROJECTED}
    if projected:
        payload["changes"] = projected
    return payload


def record_creation(session: Session, task: Task, actor: str) -> TaskEvent:
    """The first event: a snapshot of every projected column."""
    row = TaskEvent(**creation_row(task, actor))
    session.add(row)
    return row


def creation_row(task: Task, actor: str) -> dict[str, Any]:
    """:func:`record_creation`'s event as the columns of its row, applied to ``task`` (for
    callers that insert the task and its event with Core statements)."""
    changes = {name: getattr(task, name) for name in PROJECTED if name != "status"}
    return _moved(task, None, task.status, "created", actor, changes, None, task.created_at)


def _write(
    session: Session,
    task: Task,
    from_status: str | None,
    to_status: str,
    event: str,
    actor: str,
    changes: dict[str, Any] | None,
    data: dict[str, Any] | None,
    now: dt.datetime | None,
) -> TaskEvent:
    changes = dict(changes or {})
    for name, value in changes.items():
        setattr(task, name, value)
    row = TaskEvent(**_moved(task, from_status, to_status, event, actor, changes, data, now))
    session.add(row)
    return row


def _moved(
    task: Task,
    from_status: str | None,
    to_status: str,
    event: str,
    actor: str,
    changes: dict[str, Any],
    data: dict[str, Any] | None,
    now: dt.datetime | None,
) -> dict[str, Any]:
    """Move ``task`` (its ``changes`` already applied) to ``to_status``: status, update time,
    event number; the columns of its event's row."""
    now = now or utcnow()
    task.status = to_status
    task.updated_at = now
    task.event_seq = (task.event_seq or 0) + 1
    return {
        "task_id": task.id,
        "seq": task.event_seq,
        "type": event,
        "from_status": from_status,
        "to_status": to_status,
        "actor": actor,
        "data": event_data(changes, data),
        "at": now,
    }
