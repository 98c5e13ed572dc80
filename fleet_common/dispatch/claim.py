"""The atomic claim: give one agent the best eligible task, exactly once.

PostgreSQL walks the claim index once per requirement key the agent can serve, each walk
``FOR UPDATE SKIP LOCKED LIMIT 1``, and takes the best of those heads; concurrent claimers skip
each other's rows instead of waiting. SQLite runs the same query under its single write lock
(``BEGIN IMMEDIATE``). The agent row is locked first so its capacity cannot be overrun by two
of its own concurrent dequeues.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from fleet_common.agents.models import Agent, AgentStatus, DesiredState
from fleet_common.auth import tokens
from fleet_common.db import utcnow
from fleet_common.dispatch.routing import servable_keys
from fleet_common.settings import OrchestratorSettings
from fleet_common.tasks import state
from fleet_common.tasks.models import ACTIVE, Task, TaskStatus


@dataclass(frozen=True)
class Claim:
    task: Task
    lease_token: str
    expires_at: dt.datetime


_PG_CANDIDATES = text(
    """
    SELECT tasks.* FROM tasks WHERE tasks.id = (
    SELECT c.id FROM (
        SELECT t.id, t.priority, t.created_at FROM unnest(CAST(:keys AS text[])) AS k(key)
        CROSS JOIN LATERAL (
            SELECT id, priority, created_at FROM tasks
            WHERE status = 'queued' AND assigned_agent_id IS NULL AND req_key = k.key
              AND (not_before IS NULL OR not_before <= :now)
            ORDER BY priority DESC, created_at, id
            LIMIT 1 FOR UPDATE SKIP LOCKED
        ) AS t
        UNION ALL
        SELECT id, priority, created_at FROM (
            SELECT id, priority, created_at FROM tasks
            WHERE status = 'queued' AND assigned_agent_id = :agent_id
              AND (not_before IS NULL OR not_before <= :now)
            ORDER BY priority DESC, created_at, id
            LIMIT 1 FOR UPDATE SKIP LOCKED
        ) AS a
    ) AS c
    ORDER BY c.priority DESC, c.created_at, c.id
    LIMIT 1)
    """
)


def active_count(session: Session, agent_id: str) -> int:
    query = select(func.count()).where(Task.agent_id == agent_id, Task.status.in_(ACTIVE))
    return int(session.scalar(query) or 0)


def is_eligible(agent: Agent) -> bool:
    """Only live, online, active agents take new work."""
    return (
        agent.deleted_at is None
        and agent.status == AgentStatus.ONLINE
        and agent.desired_state == DesiredState.ACTIVE
    )


def claim_next(
    session: Session,
    settings: OrchestratorSettings,
    agent_id: str,
    *,
    now: dt.datetime | None = None,
) -> Claim | None:
    """Claim the best eligible task for ``agent_id`` (queued → dispatched), or None."""
    agent = session.scalars(select(Agent).where(Agent.id == agent_id).with_for_update()).first()
    if agent is None or not is_eligible(agent):
        return None
    # Counted in a statement of its own, after the lock: under READ COMMITTED a new statement
    # sees the attempts a concurrent claimer for this agent committed while we waited (a count
    # inside the locking statement would use the snapshot from before the wait).
    if active_count(session, agent.id) >= agent.max_concurrency:
        return None
    # Read the clock once the agent's lock is ours: a claim never predates what it claims.
    now = now or utcnow()
    keys = servable_keys(agent.capabilities, settings.max_requirements)
    task = _candidate(session, keys, agent.id, now)
    if task is None:
        return None
    assert task.status == TaskStatus.QUEUED
    lease = tokens.new_lease_token()
    expires = now + dt.timedelta(seconds=settings.lease_secs)
    state.transition(
        session,
        task,
        TaskStatus.DISPATCHED,
        event="dispatched",
        # The claiming agent is always the actor: lease fencing tells a zombie (an earlier
        # holder) from a stranger by these events.
        actor=f"agent:{agent.id}",
        changes={"agent_id": agent.id, "not_before": None},
        data={"attempt": task.attempt, "mode": agent.mode},
        now=now,
    )
    task.lease_digest = tokens.digest(lease)
    task.lease_expires_at = expires
    task.dispatched_at = now
    # The worker kills the agent at timeout_secs; the sweep acts a little later, for what a
    # dead worker could not.
    grace = min(settings.lease_secs, 30)
    task.deadline_at = now + dt.timedelta(seconds=task.timeout_secs + grace)
    task.cancel_requested = False
    session.flush()
    return Claim(task=task, lease_token=lease, expires_at=expires)


def _candidate(session: Session, keys: list[str], agent_id: str, now: dt.datetime) -> Task | None:
    if session.get_bind().dialect.name == "postgresql":
        query = select(Task).from_statement(_PG_CANDIDATES)
        params = {"keys": keys, "agent_id": agent_id, "now": now}
        return session.scalars(query, params).first()
    eligible = (Task.status == TaskStatus.QUEUED) & (
        Task.not_before.is_(None) | (Task.not_before <= now)
    )
    query = (
        select(Task)
        .where(
            eligible,
            ((Task.assigned_agent_id.is_(None)) & Task.req_key.in_(keys))
            | (Task.assigned_agent_id == agent_id),
        )
        .order_by(Task.priority.desc(), Task.created_at, Task.id)
        .limit(1)
    )
    return session.scalars(query).first()
