"""The periodic sweeps. Each is bounded (a batch per run), lock-aware (``SKIP LOCKED``) and
idempotent, so two running at once are harmless. Beat runs them; tests call them directly.

Each takes a session and returns what it did; the caller's unit of work commits.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from fleet_common.agents import commands
from fleet_common.agents.models import Agent, AgentMode, AgentStatus, DesiredState
from fleet_common.agents.service import release_tasks
from fleet_common.auth import audit
from fleet_common.dispatch.routing import can_serve, requirements_of
from fleet_common.forgejo.models import UNQUALIFIED, WebhookDelivery
from fleet_common.settings import OrchestratorSettings, Settings
from fleet_common.tasks import lease
from fleet_common.tasks.models import ACTIVE, TERMINAL, Task, TaskLogChunk, TaskStatus
from fleet_common.tasks.state import Reason, transition


@dataclass(frozen=True)
class Publish:
    """A wake-up to send after commit: the task's routing key and assignment."""

    task_id: str
    req_key: str
    assigned_agent_id: str | None

    @classmethod
    def of(cls, task: Task) -> Publish:
        """The wake-up of a queued ``task``, on the route a claim would take."""
        return cls(task.id, task.req_key, task.assigned_agent_id)


def offline_agents(session: Session, settings: OrchestratorSettings, now: dt.datetime) -> int:
    """Agents silent past the threshold go offline; their tasks fail ``agent_lost``."""
    cutoff = now - dt.timedelta(seconds=settings.offline_after_secs)
    silent = session.scalars(
        select(Agent)
        .where(
            Agent.status == AgentStatus.ONLINE,
            Agent.deleted_at.is_(None),
            Agent.last_heartbeat_at < cutoff,
        )
        .order_by(Agent.last_heartbeat_at)
        .limit(settings.sweep_batch_size)
        .with_for_update(skip_locked=True)
    )
    count = 0
    for agent in silent:
        agent.status = AgentStatus.OFFLINE
        agent.updated_at = now
        release_tasks(
            session,
            settings,
            agent.id,
            Reason.AGENT_LOST,
            f"no heartbeat for {settings.offline_after_secs}s",
            now=now,
        )
        audit.record(session, "fleet", "agent.offline", "agent", agent.id)
        count += 1
    return count


def _active_due(session: Session, column: Any, now: dt.datetime, limit: int) -> list[Task]:
    return list(
        session.scalars(
            select(Task)
            .where(Task.status.in_(ACTIVE), column < now)
            .order_by(column)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )


def expired_leases(session: Session, settings: OrchestratorSettings, now: dt.datetime) -> int:
    """Attempts whose lease ran out fail ``lease_expired``."""
    due = _active_due(session, Task.lease_expires_at, now, settings.sweep_batch_size)
    for task in due:
        lease.fail_attempt(
            session,
            settings,
            task,
            Reason.LEASE_EXPIRED,
            "the lease expired",
            actor="fleet",
            now=now,
        )
    return len(due)


def timed_out(session: Session, settings: OrchestratorSettings, now: dt.datetime) -> int:
    """Attempts past their deadline fail ``timeout`` (the worker usually got there first)."""
    due = _active_due(session, Task.deadline_at, now, settings.sweep_batch_size)
    for task in due:
        lease.fail_attempt(
            session,
            settings,
            task,
            Reason.TIMEOUT,
            f"timed out after {task.timeout_secs}s",
            actor="fleet",
            now=now,
        )
    return len(due)


def due_for_publish(
    session: Session, settings: OrchestratorSettings, now: dt.datetime
) -> list[Publish]:
    """Queued tasks never published, or whose last wake-up is older than ``relay_after_secs``
    (a broker outage, a lost message, a retry whose backoff just ended), as many per route as
    the workers' agents that could claim them have free places: a wake-up beyond those would
    find every place taken (a place that frees up claims the next task by itself, and a
    worker that connects wakes itself), so a long backlog does not send its whole length again
    every sweep. Marks every task looked at (sent or not: the next ones get their turn);
    the caller sends the wake-ups after commit."""
    stale = now - dt.timedelta(seconds=settings.relay_after_secs)
    due = session.scalars(
        select(Task)
        .where(
            Task.status == TaskStatus.QUEUED,
            (Task.last_published_at.is_(None)) | (Task.last_published_at < stale),
            (Task.not_before.is_(None)) | (Task.not_before <= now),
        )
        .order_by(Task.priority.desc(), Task.created_at)
        .limit(settings.sweep_batch_size)
        .with_for_update(skip_locked=True)
    ).all()
    places = free_places(session, {(task.req_key, task.assigned_agent_id) for task in due})
    out = []
    for task in due:
        task.last_published_at = now
        route = (task.req_key, task.assigned_agent_id)
        if places.get(route, 0) > 0:
            places[route] -= 1
            out.append(Publish.of(task))
    return out


Route = tuple[str, str | None]  # a task's requirement key and assigned agent


def free_places(session: Session, routes: set[Route]) -> dict[Route, int]:
    """For each route, the free places of the agents a wake-up on it can reach: live, online,
    active ``ssh_cli`` agents (served by workers) that can serve the key (or the assigned one),
    each place not held by a dispatched or running task, as a claim counts them."""
    if not routes:
        return {}
    agents = session.execute(
        select(Agent.id, Agent.capabilities, Agent.max_concurrency).where(
            Agent.mode == AgentMode.SSH_CLI,
            Agent.deleted_at.is_(None),
            Agent.status == AgentStatus.ONLINE,
            Agent.desired_state == DesiredState.ACTIVE,
        )
    ).all()
    held: dict[str | None, int] = {
        agent_id: count
        for agent_id, count in session.execute(
            select(Task.agent_id, func.count())
            .where(Task.agent_id.in_([a.id for a in agents]), Task.status.in_(ACTIVE))
            .group_by(Task.agent_id)
        )
    }
    free = {a.id: max(0, a.max_concurrency - held.get(a.id, 0)) for a in agents}
    places: dict[Route, int] = {}
    for key, assigned in routes:
        if assigned is not None:
            places[key, assigned] = free.get(assigned, 0)
        else:
            needs = requirements_of(key)
            places[key, None] = sum(free[a.id] for a in agents if can_serve(a.capabilities, needs))
    return places


def no_capable_agent(session: Session, settings: OrchestratorSettings, now: dt.datetime) -> int:
    """Queued tasks that no known agent can serve fail ``no_capable_agent`` after a wait."""
    cutoff = now - dt.timedelta(seconds=settings.no_capable_agent_after_secs)
    keys = list(
        session.scalars(
            select(Task.req_key)
            .distinct()
            .where(
                Task.status == TaskStatus.QUEUED,
                Task.assigned_agent_id.is_(None),
                Task.created_at < cutoff,
            )
        )
    )
    if not keys:
        return 0
    fleet_caps = list(
        session.scalars(
            select(Agent.capabilities).where(
                Agent.deleted_at.is_(None), Agent.desired_state != DesiredState.DISABLED
            )
        )
    )
    hopeless = [
        key for key in keys if not any(can_serve(caps, requirements_of(key)) for caps in fleet_caps)
    ]
    if not hopeless:
        return 0
    tasks = session.scalars(
        select(Task)
        .where(
            Task.status == TaskStatus.QUEUED,
            Task.assigned_agent_id.is_(None),
            Task.req_key.in_(hopeless),
            Task.created_at < cutoff,
        )
        .limit(settings.sweep_batch_size)
        .with_for_update(skip_locked=True)
    )
    count = 0
    for task in tasks:
        transition(
            session,
            task,
            TaskStatus.FAILED,
            event="failed",
            actor="fleet",
            changes={
                "failure_reason": Reason.NO_CAPABLE_AGENT,
                "last_error": f"no agent can serve {', '.join(task.requirements)} "
                f"after {settings.no_capable_agent_after_secs}s",
            },
            now=now,
        )
        task.finished_at = now
        count += 1
    return count


def expired_commands(session: Session, settings: OrchestratorSettings, now: dt.datetime) -> int:
    return commands.expire_due(session, now=now, limit=settings.sweep_batch_size)


def expired_logs(session: Session, settings: OrchestratorSettings, now: dt.datetime) -> int:
    """Delete the logs of tasks finished more than ``log_retention_days`` ago."""
    cutoff = now - dt.timedelta(days=settings.log_retention_days)
    old = list(
        session.scalars(
            select(Task.id)
            .where(Task.status.in_(TERMINAL), Task.finished_at < cutoff, Task.log_bytes > 0)
            .limit(settings.sweep_batch_size)
        )
    )
    if not old:
        return 0
    session.execute(delete(TaskLogChunk).where(TaskLogChunk.task_id.in_(old)))
    for task in session.scalars(select(Task).where(Task.id.in_(old))):
        task.log_bytes = 0
    return len(old)


def expired_deliveries(session: Session, settings: Settings, now: dt.datetime) -> int:
    """Delete the oldest batch of webhook deliveries received more than
    ``forgejo.delivery_retention_days`` ago (kept until then to dedupe redeliveries). A
    delivery that left its issue unqualified is kept: it is how intake remembers that a
    finished issue's trigger label was removed (:func:`issues.labelled_again`), however long
    ago; such events are rare (one per label removal)."""
    cutoff = now - dt.timedelta(days=settings.forgejo.delivery_retention_days)
    old = list(
        session.scalars(
            select(WebhookDelivery.id)
            .where(WebhookDelivery.received_at < cutoff, WebhookDelivery.outcome != UNQUALIFIED)
            .order_by(WebhookDelivery.received_at)
            .limit(settings.orchestrator.sweep_batch_size)
            .with_for_update(skip_locked=True)
        )
    )
    if not old:
        return 0
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.id.in_(old)))
    return len(old)


# The tasks table has changed by more than autovacuum's analyze threshold (its settings:
# 50 rows + 10% of the table by default) since it was last analyzed.
_TASKS_STALE = text(
    "SELECT s.n_mod_since_analyze > current_setting('autovacuum_analyze_threshold')::float8"
    " + current_setting('autovacuum_analyze_scale_factor')::float8 * greatest(c.reltuples, 0)"
    " FROM pg_stat_user_tables AS s JOIN pg_class AS c ON c.oid = s.relid"
    " WHERE s.relid = CAST('tasks' AS regclass)"
)


def task_statistics(session: Session, settings: OrchestratorSettings, now: dt.datetime) -> int:
    """PostgreSQL: analyze the tasks table once it has changed as much as would make
    autovacuum analyze it, without waiting for autovacuum (which looks at a database about
    once a minute). Returns 1 if it did.

    The plans of the hot statements (the claim above all) follow the table's statistics, and
    a prepared statement's generic plan is made again only when they change. Plans made
    while the table was small read it sequentially: after a burst grew it from 200 to 50,000
    queued tasks, a dequeue took 36 ms instead of 1.3 ms until the next analyze."""
    if session.get_bind().dialect.name != "postgresql":
        return 0
    if not session.scalar(_TASKS_STALE):
        return 0
    session.execute(text("ANALYZE tasks"))
    return 1


SWEEPS = {
    "heartbeats": offline_agents,
    "leases": expired_leases,
    "timeouts": timed_out,
    "no_capable_agent": no_capable_agent,
    "commands": expired_commands,
    "logs": expired_logs,
    "statistics": task_statistics,
}
