"""Commands to agents: a server-side allowlist, delivered in heartbeat replies exactly once
(redelivered only if not acknowledged in time), acknowledged and completed by their agent."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import exists, or_, select, update
from sqlalchemy.orm import Session

from fleet_common.agents.models import Agent, Command, CommandKind, CommandStatus, DesiredState
from fleet_common.auth import audit
from fleet_common.db import page_of, utcnow
from fleet_common.errors import IllegalTransition, InvalidInput, NotFound
from fleet_common.ids import new_id
from fleet_common.settings import OrchestratorSettings
from fleet_common.tasks import service as tasks
from fleet_common.tasks.models import ACTIVE, Task

DELIVERY_BATCH = 50
OPEN = (CommandStatus.PENDING, CommandStatus.ACKNOWLEDGED)


def validate(kind: str, payload: dict[str, Any]) -> CommandKind:
    """Allowlist and payload shape; anything else is InvalidInput (422)."""
    try:
        command_kind = CommandKind(kind)
    except ValueError:
        allowed = ", ".join(k.value for k in CommandKind)
        raise InvalidInput(f"kind: {kind!r} is not an allowed command ({allowed})") from None
    if command_kind == CommandKind.UPGRADE and not isinstance(payload.get("version"), str):
        raise InvalidInput("payload.version: a string is required for upgrade")
    if command_kind == CommandKind.CANCEL_TASK and not isinstance(payload.get("task_id"), str):
        raise InvalidInput("payload.task_id: a string is required for cancel_task")
    return command_kind


def enqueue(
    session: Session,
    settings: OrchestratorSettings,
    agent: Agent,
    kind: str,
    payload: dict[str, Any] | None,
    *,
    actor: str,
    now: dt.datetime | None = None,
) -> Command:
    """Queue a command; ``drain`` and ``resume`` change the desired state at once, and
    ``cancel_task`` cancels the task when this agent holds it (stopping it without that would
    only leave it to its lease expiry, and so to a retry)."""
    now = now or utcnow()
    payload = payload or {}
    command_kind = validate(kind, payload)
    if command_kind == CommandKind.DRAIN:
        agent.desired_state = DesiredState.DRAINING
    elif command_kind == CommandKind.RESUME:
        agent.desired_state = DesiredState.ACTIVE
    elif command_kind == CommandKind.CANCEL_TASK:
        _cancel_held(session, agent, payload["task_id"], actor=actor, now=now)
    command = Command(
        id=new_id("cmd"),
        agent_id=agent.id,
        kind=command_kind,
        payload=payload,
        status=CommandStatus.PENDING,
        created_by=actor,
        created_at=now,
        expires_at=now + dt.timedelta(seconds=settings.command_ttl_secs),
    )
    session.add(command)
    audit.record(
        session, actor, "command.enqueue", "agent", agent.id, command_id=command.id, kind=kind
    )
    session.flush()
    return command


def _cancel_held(
    session: Session, agent: Agent, task_id: str, *, actor: str, now: dt.datetime
) -> None:
    task = session.scalars(select(Task).where(Task.id == task_id).with_for_update()).first()
    if task is not None and task.agent_id == agent.id and task.status in ACTIVE:
        tasks.cancel_task(session, task.id, actor=actor, now=now)


def _deliverable(agent_id: Any, now: Any, redeliver_before: dt.datetime | None) -> Any:
    condition = (
        (Command.agent_id == agent_id)
        & (Command.status == CommandStatus.PENDING)
        & (Command.expires_at > now)
    )
    if redeliver_before is not None:
        condition &= or_(Command.delivered_at.is_(None), Command.delivered_at < redeliver_before)
    return condition


def pending_exists(agent_id: Any, now: Any) -> Any:
    """An EXISTS expression: does ``agent_id`` (a value or a scalar subquery) have pending
    commands at ``now`` (a datetime or a bind parameter)?"""
    return exists().where(_deliverable(agent_id, now, None)).label("has_pending")


def deliver(
    session: Session, settings: OrchestratorSettings, agent_id: str, *, now: dt.datetime
) -> list[Command]:
    """Pending commands for the agent's heartbeat reply, each handed out once; one not
    acknowledged within a lease period is handed out again."""
    redeliver_before = now - dt.timedelta(seconds=settings.lease_secs)
    due = (
        select(Command.id)
        .where(_deliverable(agent_id, now, redeliver_before))
        .order_by(Command.created_at, Command.id)
        .limit(DELIVERY_BATCH)
        .with_for_update(skip_locked=True)
    )
    # One statement, so it is atomic on its own (a heartbeat may run without a transaction).
    statement = (
        update(Command)
        .where(Command.id.in_(due.scalar_subquery()))
        .values(delivered_at=now, delivery_count=Command.delivery_count + 1)
        .returning(Command)
        .execution_options(populate_existing=True)
    )
    return sorted(session.scalars(statement), key=lambda c: (c.created_at, c.id))


def own_command(session: Session, agent_id: str, command_id: str) -> Command:
    command = session.scalars(
        select(Command).where(Command.id == command_id).with_for_update()
    ).first()
    if command is None or command.agent_id != agent_id:
        raise NotFound(f"no command {command_id}")
    return command


def acknowledge(session: Session, agent_id: str, command_id: str) -> Command:
    """pending → acknowledged (repeating it is harmless)."""
    command = own_command(session, agent_id, command_id)
    if command.status == CommandStatus.ACKNOWLEDGED:
        return command
    if command.status != CommandStatus.PENDING:
        raise IllegalTransition(f"command is {command.status}")
    command.status = CommandStatus.ACKNOWLEDGED
    command.acknowledged_at = utcnow()
    return command


def complete(
    session: Session, agent_id: str, command_id: str, success: bool, result: dict[str, Any] | None
) -> Command:
    """pending or acknowledged → completed (success) or failed, keeping the result."""
    command = own_command(session, agent_id, command_id)
    if command.status not in OPEN:
        raise IllegalTransition(f"command is {command.status}")
    now = utcnow()
    command.acknowledged_at = command.acknowledged_at or now
    command.status = CommandStatus.COMPLETED if success else CommandStatus.FAILED
    command.success = success
    command.result = result or {}
    command.completed_at = now
    audit.record(
        session,
        f"agent:{agent_id}",
        "command.complete",
        "agent",
        agent_id,
        command_id=command.id,
        success=success,
    )
    return command


def list_commands(
    session: Session,
    agent_id: str,
    *,
    status: str | None = None,
    page: int = 1,
    page_size: int = 50,
) -> tuple[list[Command], int]:
    query = select(Command).where(Command.agent_id == agent_id)
    if status:
        query = query.where(Command.status == status)
    return page_of(session, query, (Command.created_at.desc(), Command.id.desc()), page, page_size)


def expire_for_agent(session: Session, agent_id: str, *, now: dt.datetime) -> None:
    session.execute(
        update(Command)
        .where(Command.agent_id == agent_id, Command.status.in_(OPEN))
        .values(status=CommandStatus.EXPIRED, completed_at=now)
    )


def expire_due(session: Session, *, now: dt.datetime, limit: int) -> int:
    """Sweep: pending commands past their expiry become expired. Returns how many."""
    due = session.scalars(
        select(Command)
        .where(Command.status == CommandStatus.PENDING, Command.expires_at <= now)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    count = 0
    for command in due:
        command.status = CommandStatus.EXPIRED
        command.completed_at = now
        count += 1
    return count
