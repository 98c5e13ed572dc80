"""The atomic claim: give one agent the best eligible task, exactly once.

The agent row is locked first, so two of its own concurrent dequeues cannot overrun its
capacity; the capacity is then counted in a later statement, which sees the claims committed
while we waited for the lock.

PostgreSQL then claims in one statement (:data:`_PG_CLAIM`): it picks the best unlocked head
of the queues the agent can serve, locks that one row (``FOR UPDATE SKIP LOCKED``), moves it to
``dispatched`` and appends its ``dispatched`` event (the one :func:`state.transition` would
write, built by :func:`state.event_data`), and returns the row. Only when every head it looked
at is locked by concurrent claimers does it walk the queues locking each one's first free row
(:data:`_PG_WALK`), so a free task is never missed. SQLite runs the simple query under its
single write lock (``BEGIN IMMEDIATE``) and moves the task with :func:`state.transition`.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import TextualSelect, bindparam, func, select, text
from sqlalchemy.orm import Session

from fleet_common.agents.models import Agent, AgentStatus, DesiredState
from fleet_common.auth import service as auth
from fleet_common.auth import tokens
from fleet_common.auth.models import Token
from fleet_common.auth.service import Principal
from fleet_common.db import Prebuilt, utcnow
from fleet_common.dispatch.routing import servable_keys
from fleet_common.settings import OrchestratorSettings
from fleet_common.tasks import state
from fleet_common.tasks.models import ACTIVE, Task, TaskStatus

T = TypeVar("T")


@dataclass(frozen=True)
class Claim(Generic[T]):
    task: T
    lease_token: str
    expires_at: dt.datetime


# The statements below are assembled from these constants only (S608 is a false alarm: every
# value is a bind parameter). Statuses are literals so the planner matches the partial indexes.
_ELIGIBLE = "status = 'queued' AND (not_before IS NULL OR not_before <= :now)"
_ORDER = "priority DESC, created_at, id"
# The best rows of each queue the agent can serve (its requirement keys, and the tasks
# assigned to it), in claim order, ``{lock}`` (nothing, or FOR UPDATE SKIP LOCKED).
_HEADS = f"""
    SELECT h.id, h.priority, h.created_at FROM unnest(CAST(:keys AS text[])) AS k(key)
    CROSS JOIN LATERAL (
        SELECT id, priority, created_at FROM tasks
        WHERE {_ELIGIBLE} AND assigned_agent_id IS NULL AND req_key = k.key
        ORDER BY {_ORDER} LIMIT :depth {{lock}}
    ) AS h
    UNION ALL
    SELECT id, priority, created_at FROM (
        SELECT id, priority, created_at FROM tasks
        WHERE {_ELIGIBLE} AND assigned_agent_id = :agent_id
        ORDER BY {_ORDER} LIMIT :depth {{lock}}
    ) AS a
"""  # noqa: S608
# Below the agent's capacity (an InitPlan: evaluated once, before anything is locked).
_HAS_ROOM = (
    "(SELECT count(*) FROM tasks WHERE agent_id = :agent_id"
    " AND status IN ('dispatched', 'running')) < :capacity"
)
# Move the picked row to dispatched and append its event; returns the task row.
_DISPATCH = """
claimed AS (
    UPDATE tasks SET
        status = :to_status, agent_id = :agent_id, not_before = NULL, updated_at = :now,
        event_seq = tasks.event_seq + 1, lease_digest = :lease_digest,
        lease_expires_at = :expires_at, dispatched_at = :now,
        deadline_at = :now + (tasks.timeout_secs + :grace) * interval '1 second',
        cancel_requested = false
    FROM picked WHERE tasks.id = picked.id
    RETURNING tasks.*
),
event AS (
    INSERT INTO task_events (task_id, seq, type, from_status, to_status, actor, data, at)
    SELECT id, event_seq, 'dispatched', :from_status, :to_status, :actor,
           CAST(:data AS jsonb) || jsonb_build_object('attempt', attempt), :now
    FROM claimed
)"""
_TASK_COLUMNS = tuple(Task.__table__.columns)
_RETURNED = ", ".join(f"claimed.{column.name}" for column in _TASK_COLUMNS)


def _claim_statement(picked: str) -> TextualSelect:
    """The claim with ``picked`` (the CTE choosing and locking the row): typed result
    columns, so the result metadata is cached with the compiled statement."""
    sql = f"WITH {picked},\n{_DISPATCH}\nSELECT {_RETURNED} FROM claimed"
    return text(sql).columns(*_TASK_COLUMNS)


# The usual case: lock only the best free head (re-checked once locked: a head claimed
# since the statement's snapshot no longer matches and is skipped).
_PG_CLAIM = _claim_statement(
    f"""
heads AS ({_HEADS.format(lock="")}),
picked AS (
    SELECT id FROM tasks
    WHERE id = ANY(ARRAY(SELECT id FROM heads)) AND {_ELIGIBLE}
      AND (assigned_agent_id IS NULL OR assigned_agent_id = :agent_id) AND {_HAS_ROOM}
    ORDER BY {_ORDER} LIMIT 1
    FOR UPDATE SKIP LOCKED
)"""  # noqa: S608
)
# Every head locked by others: walk each queue to its first free row (locking one per
# queue), as the heads may all be taken.
_PG_WALK = _claim_statement(
    f"""
picked AS (
    SELECT id FROM tasks WHERE id = (
        SELECT c.id FROM ({_HEADS.format(lock="FOR UPDATE SKIP LOCKED")}) AS c
        WHERE {_HAS_ROOM}
        ORDER BY c.priority DESC, c.created_at, c.id LIMIT 1)
)"""  # noqa: S608
)
# For a reply, run by the driver (see Prebuilt); loading the claimed task into the session
# (built once, like every hot statement).
_PG_CLAIM_ROW, _PG_WALK_ROW = Prebuilt(_PG_CLAIM), Prebuilt(_PG_WALK)
_PG_CLAIM_ORM = select(Task).from_statement(_PG_CLAIM).execution_options(populate_existing=True)
_PG_WALK_ORM = select(Task).from_statement(_PG_WALK).execution_options(populate_existing=True)
# Heads looked at per claim: enough to get past the rows concurrent claimers hold.
_HEADS_PER_CLAIM = 32

# What the claim needs of the agent, read under its row lock.
_AGENT_COLUMNS = (
    Agent.id,
    Agent.mode,
    Agent.capabilities,
    Agent.max_concurrency,
    Agent.status,
    Agent.desired_state,
    Agent.deleted_at,
)
_LOCK_AGENT = Prebuilt(
    select(*_AGENT_COLUMNS).where(Agent.id == bindparam("agent_id")).with_for_update()
)
_LOCK_BY_TOKEN = Prebuilt(
    select(*_AGENT_COLUMNS, *auth.token_columns())
    .where(Agent.id == auth.live_agent_token(Token.agent_id))
    .with_for_update(of=Agent)
)


def authenticate_locked(session: Session, secret: str) -> Principal:
    """Authenticate the caller and lock its agent's row in one statement (the dequeue's
    first step); an :class:`auth.Acting` whose row is what :func:`claim_next` takes as
    ``locked``."""
    return auth.authenticate_acting(session, secret, _LOCK_BY_TOKEN)


def active_count(session: Session, agent_id: str) -> int:
    query = select(func.count()).where(Task.agent_id == agent_id, Task.status.in_(ACTIVE))
    return int(session.scalar(query) or 0)


def is_eligible(agent: Any) -> bool:
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
    locked: Any = None,
) -> Claim[Task] | None:
    """Claim the best eligible task for ``agent_id`` (queued → dispatched), or None. The task
    is returned loaded in ``session`` (the caller may go on changing it there). ``locked``:
    the agent's row if this transaction already locked it (:func:`authenticate_locked`)."""
    return _claim(session, settings, agent_id, now, locked, orm=True)


def claim_for_reply(
    session: Session, settings: OrchestratorSettings, agent_id: str, *, locked: Any = None
) -> Claim[Any] | None:
    """:func:`claim_next` for a caller that only reads the claimed task (the dequeue
    endpoint): on PostgreSQL the task comes back as a row of its columns, not loaded into the
    session."""
    return _claim(session, settings, agent_id, None, locked, orm=False)


def _claim(
    session: Session,
    settings: OrchestratorSettings,
    agent_id: str,
    now: dt.datetime | None,
    locked: Any,
    *,
    orm: bool,
) -> Claim[Any] | None:
    state.check_move(TaskStatus.QUEUED, TaskStatus.DISPATCHED)
    session.flush()  # Core statements follow
    agent = locked
    if agent is None or agent.id != agent_id:
        agent = _LOCK_AGENT.execute(session, {"agent_id": agent_id}).first()
    if agent is None or not is_eligible(agent):
        return None
    # Read the clock once the agent's lock is ours: a claim never predates what it claims.
    now = now or utcnow()
    keys = servable_keys(agent.capabilities, settings.max_requirements)
    lease = tokens.new_lease_token()
    expires = now + dt.timedelta(seconds=settings.lease_secs)
    # The claiming agent is always the actor: lease fencing tells a zombie (an earlier
    # holder) from a stranger by these events.
    actor = f"agent:{agent.id}"
    changes = {"agent_id": agent.id, "not_before": None}
    # The worker kills the agent at timeout_secs; the sweep acts a little later, for what a
    # dead worker could not.
    grace = min(settings.lease_secs, 30)
    if session.get_bind().dialect.name == "postgresql":
        params = {
            "keys": keys,
            "agent_id": agent.id,
            "now": now,
            "capacity": agent.max_concurrency,
            "depth": max(1, _HEADS_PER_CLAIM // (len(keys) + 1)),
            "from_status": TaskStatus.QUEUED.value,
            "to_status": TaskStatus.DISPATCHED.value,
            "actor": actor,
            # Without the attempt, which the statement adds from the row.
            "data": json.dumps(state.event_data(changes, {"mode": agent.mode})),
            "lease_digest": tokens.digest(lease),
            "expires_at": expires,
            "grace": grace,
        }
        task = _claim_pg(session, params, orm=orm)
    else:
        task = _claim_simple(session, agent, keys, now, lease, expires, actor, changes, grace)
    return None if task is None else Claim(task=task, lease_token=lease, expires_at=expires)


def _claim_pg(session: Session, params: dict[str, Any], *, orm: bool) -> Any:
    """The claimed task (an ORM object if ``orm``, else a row), or None."""
    statements = (_PG_CLAIM_ORM, _PG_WALK_ORM) if orm else (_PG_CLAIM_ROW, _PG_WALK_ROW)
    for statement in statements:
        if isinstance(statement, Prebuilt):
            task = statement.execute(session, params).first()
        else:
            task = session.scalars(statement, params).first()
        if task is not None:
            return task
        params["depth"] = 1  # the walk stops at each queue's first free row
    return None


def _claim_simple(
    session: Session,
    agent: Any,
    keys: list[str],
    now: dt.datetime,
    lease: str,
    expires: dt.datetime,
    actor: str,
    changes: dict[str, Any],
    grace: int,
) -> Task | None:
    """SQLite: one writer at a time, so a plain query and the ORM's state.transition."""
    if active_count(session, agent.id) >= agent.max_concurrency:
        return None
    eligible = (Task.status == TaskStatus.QUEUED) & (
        Task.not_before.is_(None) | (Task.not_before <= now)
    )
    query = (
        select(Task)
        .where(
            eligible,
            ((Task.assigned_agent_id.is_(None)) & Task.req_key.in_(keys))
            | (Task.assigned_agent_id == agent.id),
        )
        .order_by(Task.priority.desc(), Task.created_at, Task.id)
        .limit(1)
    )
    task = session.scalars(query).first()
    if task is None:
        return None
    state.transition(
        session,
        task,
        TaskStatus.DISPATCHED,
        event="dispatched",
        actor=actor,
        changes=changes,
        data={"attempt": task.attempt, "mode": agent.mode},
        now=now,
    )
    task.lease_digest = tokens.digest(lease)
    task.lease_expires_at = expires
    task.dispatched_at = now
    task.deadline_at = now + dt.timedelta(seconds=task.timeout_secs + grace)
    task.cancel_requested = False
    session.flush()
    return task
