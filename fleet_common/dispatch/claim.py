"""The atomic claim: give one agent the best eligible task, exactly once.

The agent row is locked first, so two of its own concurrent dequeues cannot overrun its
capacity; the capacity is then counted in a later statement, which sees the claims committed
while we waited for the lock. A worker serving its own slots (:func:`claim_and_start`) bounds
its concurrent claims itself and claims in one statement that takes the row's lock shared, so
that its claims do not queue behind each other's commit; a drain, a deletion or a heartbeat of
the agent still waits for them, and they for it.

PostgreSQL then claims in one statement (:func:`_pg_claims`): it picks the best unlocked head
of the queues the agent can serve, locks that one row (``FOR UPDATE SKIP LOCKED``), moves it to
``dispatched`` and appends its ``dispatched`` event (the one :func:`state.transition` would
write, built by :func:`state.event_data`), and returns the row. Only when every head it looked
at is locked by concurrent claimers does it walk the queues locking each one's first free row
(:data:`_PG_WALK`), so a free task is never missed. SQLite runs the simple query under its
single write lock (``BEGIN IMMEDIATE``) and moves the task with :func:`state.transition`.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Integer, String, TextualSelect, bindparam, column, func, select, text
from sqlalchemy.orm import Session

from fleet_common.agents.models import Agent, AgentStatus, DesiredState
from fleet_common.auth import service as auth
from fleet_common.auth import tokens
from fleet_common.auth.models import Token
from fleet_common.auth.service import Principal
from fleet_common.db import JSONType, Prebuilt, utcnow
from fleet_common.dispatch.routing import servable_keys
from fleet_common.forgejo import writeback
from fleet_common.settings import OrchestratorSettings
from fleet_common.sql import compact
from fleet_common.tasks import lease, state
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
# The best ``{depth}`` rows of each queue the agent can serve (its requirement keys
# ``{keys}``, and the tasks assigned to it), in claim order, ``{lock}`` (nothing, or FOR UPDATE
# SKIP LOCKED). The statement's shape is literal, its values parameters: the depth, and the
# number of keys (``ARRAY[:key_0, ...]``, not one array parameter). With either a parameter
# PostgreSQL cannot cost a prepared statement's generic plan (it assumes a LIMIT of a tenth
# of the queue, an array of ten keys), finds it dearer than plans made for the values, and
# so plans the claim afresh on every run, which costs about as much as running it.
_HEADS = f"""
    SELECT h.id, h.priority, h.created_at FROM unnest(ARRAY[{{keys}}]) AS k(key)
    CROSS JOIN LATERAL (
        SELECT id, priority, created_at FROM tasks
        WHERE {_ELIGIBLE} AND assigned_agent_id IS NULL AND req_key = k.key
        ORDER BY {_ORDER} LIMIT {{depth}} {{lock}}
    ) AS h
    UNION ALL
    SELECT id, priority, created_at FROM (
        SELECT id, priority, created_at FROM tasks
        WHERE {_ELIGIBLE} AND assigned_agent_id = :agent_id
        ORDER BY {_ORDER} LIMIT {{depth}} {{lock}}
    ) AS a
"""  # noqa: S608
# Below the agent's capacity (an InitPlan: evaluated once, before anything is locked).
# {other}: a task not to count (nothing, or one the same statement completes).
_ROOM = (
    "(SELECT count(*) FROM tasks WHERE agent_id = :agent_id{other}"
    " AND status IN ('dispatched', 'running')) < :capacity"
)
_HAS_ROOM = _ROOM.format(other="")
# Move the picked row to dispatched and append its event; returns the task row. {start}:
# a claim that also starts the task (the worker's, which runs it at once) moves it on to
# running and appends the ``started`` event too (:data:`_STARTED`), as two statements would;
# its time is the picked row's ``at`` ({at}), never before the task's last change.
_DISPATCH = """
claimed AS (
    UPDATE tasks SET
        status = {status}, agent_id = :agent_id, not_before = NULL, updated_at = {at},
        event_seq = tasks.event_seq + {moves}, lease_digest = :claim_digest,
        lease_expires_at = {expires}, dispatched_at = {at},
        deadline_at = {at} + (tasks.timeout_secs + :grace) * interval '1 second',
        cancel_requested = false{started_at}
    FROM picked WHERE tasks.id = picked.id
    RETURNING {returned}
),
claim_events AS (
    INSERT INTO task_events (task_id, seq, type, from_status, to_status, actor, data, at)
    SELECT id, {dispatched_seq}, 'dispatched', :from_status, :to_status, :actor,
           CAST(:dispatched_data AS jsonb) || jsonb_build_object('attempt', attempt), {event_at}
    FROM claimed{start}
)"""
_STARTED = """
    UNION ALL
    SELECT id, event_seq, 'started', :to_status, 'running', :actor,
           CAST(:started_data AS jsonb), dispatched_at
    FROM claimed"""
# The worker's claim is one statement on its own (no transaction around it): it locks the
# agent's row shared itself, and claims only if the row is eligible and as the worker last
# read it (the keys, capacity and mode the claim is made with). The row's values come back
# even when nothing was claimed, so a worker whose reading is out of date learns them.
AGENT_SHARED = """
agent AS (
    SELECT mode, capabilities, max_concurrency FROM agents
    WHERE id = :agent_id AND deleted_at IS NULL AND status = 'online'
      AND desired_state = 'active'
    FOR SHARE
),
known AS (
    SELECT 1 FROM agent WHERE mode = :mode AND max_concurrency = :capacity
      AND capabilities = CAST(:capabilities AS jsonb)
),"""
_AT = "GREATEST(CAST(:now AS timestamptz), updated_at)"
_TASK_COLUMNS = tuple(Task.__table__.columns)
#: What a worker that runs the task at once needs of it (``Attempt.of``; ``issue_number`` also
#: for the Forgejo write-back).
_RUN_COLUMNS = tuple(
    Task.__table__.c[name]
    for name in (
        "id", "agent_id", "attempt", "prompt", "repo", "clone_url", "timeout_secs",
        "issue_number", "lease_expires_at",
    )
)  # fmt: skip
_AGENT_RETURNED = (
    column("agent_mode", String),
    column("agent_capabilities", JSONType),
    column("agent_max_concurrency", Integer),
)


def _dispatch(*, start: bool) -> str:
    """:data:`_DISPATCH` for a claim that starts the task or not."""
    columns = _RUN_COLUMNS if start else _TASK_COLUMNS
    # What the caller reads, and what the events need.
    returning = ", ".join(f"tasks.{c.name}" for c in columns) + ", tasks.event_seq"
    return _DISPATCH.format(
        status="'running'" if start else ":to_status",
        at="picked.at" if start else ":now",
        expires="picked.at + :lease_secs * interval '1 second'" if start else ":expires_at",
        moves=2 if start else 1,
        dispatched_seq="event_seq - 1" if start else "event_seq",
        started_at=", started_at = picked.at" if start else "",
        returned=f"{returning}, tasks.dispatched_at" if start else "tasks.*",
        event_at="dispatched_at" if start else ":now",
        start=_STARTED if start else "",
    )


def _shaped(picked: str, keys: int, **parts: str) -> str:
    """``picked`` (a template of ``{at}``, ``{room}``, ``{depth}`` and ``{keys}``) for an
    agent serving ``keys`` requirement keys (:func:`_key_params`)."""
    names = ", ".join(f"CAST(:key_{n} AS text)" for n in range(keys))
    return picked.format(depth=_heads_depth(keys), keys=names, **parts)


def _claim_statement(picked: str, keys: int) -> TextualSelect:
    """The claim with ``picked`` (the CTE choosing and locking the row, see :func:`_shaped`)
    for ``keys`` requirement keys: typed result columns, so the result metadata is cached with
    the compiled statement."""
    returned = ", ".join(f"claimed.{column.name}" for column in _TASK_COLUMNS)
    picked = _shaped(picked, keys, at="", room=_HAS_ROOM)
    sql = f"WITH {picked},\n{_dispatch(start=False)}\nSELECT {returned} FROM claimed"
    return text(compact(sql)).columns(*_TASK_COLUMNS)


def started_ctes(picked: str, keys: int, room: str = _HAS_ROOM, *, agent: bool = True) -> str:
    """The CTEs of the worker's claim (:func:`claim_and_start`) for ``keys`` requirement
    keys, claiming if ``room``; without ``agent``, those after :data:`AGENT_SHARED` (for a
    statement that puts it first)."""
    room = f"{room} AND EXISTS (SELECT 1 FROM known)"  # noqa: S608
    picked = _shaped(picked, keys, at=f", {_AT} AS at", room=room)
    return f"{AGENT_SHARED if agent else ''}{picked},\n{_dispatch(start=True)}"


#: What the worker's claim returns: the agent's row (nothing if it takes no work) and the
#: claimed task's columns (NULL if nothing was claimed).
STARTED_RESULT = (
    "agent.mode AS agent_mode, agent.capabilities AS agent_capabilities,"
    " agent.max_concurrency AS agent_max_concurrency, "
    + ", ".join(f"claimed.{column.name}" for column in _RUN_COLUMNS)
)
STARTED_FROM = "agent LEFT JOIN claimed ON true"
STARTED_COLUMNS: tuple[Any, ...] = (*_AGENT_RETURNED, *_RUN_COLUMNS)


def _started_statement(picked: str, keys: int) -> TextualSelect:
    sql = f"WITH {started_ctes(picked, keys)}\nSELECT {STARTED_RESULT} FROM {STARTED_FROM}"
    return text(compact(sql)).columns(*STARTED_COLUMNS)


# The usual case: lock only the best free head (re-checked once locked: a head claimed
# since the statement's snapshot no longer matches and is skipped).
_PICK_HEAD = f"""
heads AS ({_HEADS.format(lock="", depth="{depth}", keys="{keys}")}),
picked AS (
    SELECT id{{at}} FROM tasks
    WHERE id = ANY(ARRAY(SELECT id FROM heads)) AND {_ELIGIBLE}
      AND (assigned_agent_id IS NULL OR assigned_agent_id = :agent_id) AND {{room}}
    ORDER BY {_ORDER} LIMIT 1
    FOR UPDATE SKIP LOCKED
)"""  # noqa: S608
# Every head locked by others: walk each queue to its first free row (locking one per
# queue), as the heads may all be taken.
_FIRST_FREE = _HEADS.format(lock="FOR UPDATE SKIP LOCKED", depth=1, keys="{keys}")
_PICK_WALKING = f"""
picked AS (
    SELECT id{{at}} FROM tasks WHERE id = (
        SELECT c.id FROM ({_FIRST_FREE}) AS c
        WHERE {{room}}
        ORDER BY c.priority DESC, c.created_at, c.id LIMIT 1)
)"""  # noqa: S608
# Heads looked at per claim: enough to get past the rows concurrent claimers hold.
_HEADS_PER_CLAIM = 32


def _heads_depth(keys: int) -> int:
    """How many heads of each queue a claim looks at, for an agent serving ``keys``
    requirement keys (and its assigned tasks): :data:`_HEADS_PER_CLAIM` in all."""
    return max(1, _HEADS_PER_CLAIM // (keys + 1))


def _key_params(keys: Sequence[str]) -> dict[str, Any]:
    """The parameters naming the requirement keys an agent serves, and their number
    (``key_count``, which picks the statements made for it)."""
    return {"key_count": len(keys)} | {f"key_{n}": key for n, key in enumerate(keys)}


def _orm(statement: TextualSelect) -> Any:
    """``statement`` loading the claimed task into the session."""
    return select(Task).from_statement(statement).execution_options(populate_existing=True)


# The statements are made once for each number of keys agents serve (a handful).
@functools.cache
def _pg_claims(keys: int, *, orm: bool) -> tuple[Any, Any]:
    """The claim's two statements (the heads, then the walk), for a reply (run by the
    driver, see Prebuilt) or loading the claimed task into the session (``orm``)."""
    head, walk = _claim_statement(_PICK_HEAD, keys), _claim_statement(_PICK_WALKING, keys)
    return (_orm(head), _orm(walk)) if orm else (Prebuilt(head), Prebuilt(walk))


@functools.cache
def _pg_start_claims(keys: int) -> tuple[Prebuilt, Prebuilt]:
    """The worker's claim's two statements (the heads, then the walk)."""
    return (
        Prebuilt(_started_statement(_PICK_HEAD, keys)),
        Prebuilt(_started_statement(_PICK_WALKING, keys)),
    )


def claim_after_completion(keys: int) -> str:
    """The worker's claim as part of its completion's statement (``lease_sql``, whose CTE
    ``done`` is the completed task, ``:task_id``): only after that completion, and counting
    the capacity without the task it completes (still running in the statement's snapshot).
    The heads only: a claim that finds them all taken is made again on its own."""
    room = _ROOM.format(other=" AND id <> :task_id") + " AND EXISTS (SELECT 1 FROM done)"  # noqa: S608
    return started_ctes(_PICK_HEAD, keys, room, agent=False)


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


@dataclass(frozen=True)
class AgentReading:
    """What a claim depends on of an agent's row, as its worker last read it."""

    mode: str
    capabilities: tuple[str, ...]
    max_concurrency: int

    @classmethod
    def of(cls, agent: Any) -> AgentReading:
        return cls(str(agent.mode), tuple(agent.capabilities), int(agent.max_concurrency))


def claim_and_start(
    session: Session, settings: OrchestratorSettings, agent_id: str, reading: AgentReading
) -> tuple[Claim[Any] | None, AgentReading | None]:
    """Claim the best eligible task for ``agent_id`` and start it (queued → dispatched →
    running, both events), for a worker that runs it at once and never has more claims in
    flight for the agent than it has free places (``HostWorker``'s slot accounting). Returns
    the claim (or None) and the agent row's reading now (None: it takes no work).

    On PostgreSQL this is one statement, atomic on its own (``session`` may be an autocommit
    one): it locks the agent's row shared (a drain, deletion or heartbeat of the agent waits
    for it, and it for them, but the worker's claims run side by side), claims only if the
    row is eligible and still as ``reading`` says (else it returns the row's values and
    claims nothing), and counts the capacity in its snapshot, which may miss a concurrent
    claim not yet committed (one the caller counts). The task comes back as a row of the
    columns a run needs (:data:`_RUN_COLUMNS`). Elsewhere the claim is :func:`claim_next`'s
    and the start :func:`lease.report_status`'s."""
    if session.get_bind().dialect.name != "postgresql":
        claim = claim_next(session, settings, agent_id)
        if claim is not None:
            held = lease.Held(claim.task, cancelled=False)
            lease.report_status(session, held, TaskStatus.RUNNING, None, now=utcnow())
        return claim, reading
    params, token = started_params(settings, agent_id, reading)
    for statement in _pg_start_claims(params["key_count"]):
        row = statement.execute(session, params).first()
        claim, now = read_started(session, row, token)
        if claim is not None or now != reading:
            return claim, now
    return None, reading


def started_params(
    settings: OrchestratorSettings, agent_id: str, reading: AgentReading
) -> tuple[dict[str, Any], str]:
    """The parameters of the worker's claim (:data:`STARTED_RESULT`), and its lease token."""
    state.check_move(TaskStatus.QUEUED, TaskStatus.DISPATCHED)
    state.check_move(TaskStatus.DISPATCHED, TaskStatus.RUNNING)
    token = tokens.new_lease_token()
    params = _pg_params(
        settings, agent_id, reading.mode, reading.capabilities, reading.max_concurrency, token,
        utcnow(),  # the statement takes the later of this and the task's last change
    )  # fmt: skip
    params.update(
        mode=reading.mode,
        capabilities=json.dumps(list(reading.capabilities)),
        lease_secs=settings.lease_secs,
        started_data=json.dumps(state.event_data({}, None)),
    )
    return params, token


def read_started(
    session: Session, row: Any, token: str
) -> tuple[Claim[Any] | None, AgentReading | None]:
    """The worker's claim from its statement's row (:data:`STARTED_RESULT`; None: the agent
    takes no work), and the agent's reading."""
    if row is None or row.agent_mode is None:
        return None, None
    reading = AgentReading(row.agent_mode, tuple(row.agent_capabilities), row.agent_max_concurrency)
    if row.id is None:
        return None, reading
    if row.issue_number is not None:  # Core writes: tell the Forgejo write-back
        writeback.inserted(session, [row.id])
    return Claim(task=row, lease_token=token, expires_at=row.lease_expires_at), reading


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
    lease = tokens.new_lease_token()
    expires = now + dt.timedelta(seconds=settings.lease_secs)
    if session.get_bind().dialect.name == "postgresql":
        params = _pg_params(
            settings, agent.id, agent.mode, agent.capabilities, agent.max_concurrency, lease, now
        )
        task = _claim_pg(session, params, orm=orm)
    else:
        keys = servable_keys(agent.capabilities, settings.max_requirements)
        actor, changes, grace = _actor(agent.id), _changes(agent.id), _grace(settings)
        task = _claim_simple(session, agent, keys, now, lease, expires, actor, changes, grace)
    return None if task is None else Claim(task=task, lease_token=lease, expires_at=expires)


def _actor(agent_id: str) -> str:
    """The claiming agent is always the actor: lease fencing tells a zombie (an earlier
    holder) from a stranger by these events."""
    return f"agent:{agent_id}"


def _changes(agent_id: str) -> dict[str, Any]:
    return {"agent_id": agent_id, "not_before": None}


def _grace(settings: OrchestratorSettings) -> int:
    """The worker kills the agent at timeout_secs; the sweep acts a little later, for what
    a dead worker could not."""
    return min(settings.lease_secs, 30)


def _pg_params(
    settings: OrchestratorSettings,
    agent_id: str,
    mode: str,
    capabilities: Any,
    capacity: int,
    lease: str,
    now: dt.datetime,
) -> dict[str, Any]:
    """The parameters of the PostgreSQL claim statements."""
    keys = servable_keys(capabilities, settings.max_requirements)
    return _key_params(keys) | {
        "agent_id": agent_id,
        "now": now,
        "capacity": capacity,
        "from_status": TaskStatus.QUEUED.value,
        "to_status": TaskStatus.DISPATCHED.value,
        "actor": _actor(agent_id),
        # Without the attempt, which the statement adds from the row.
        "dispatched_data": json.dumps(state.event_data(_changes(agent_id), {"mode": mode})),
        "claim_digest": tokens.digest(lease),
        "expires_at": now + dt.timedelta(seconds=settings.lease_secs),
        "grace": _grace(settings),
    }


def _claim_pg(session: Session, params: dict[str, Any], *, orm: bool) -> Any:
    """The claimed task (an ORM object if ``orm``, else a row), or None."""
    for statement in _pg_claims(params["key_count"], orm=orm):
        if isinstance(statement, Prebuilt):
            task = statement.execute(session, params).first()
        else:
            task = session.scalars(statement, params).first()
        if task is not None:
            return task
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
