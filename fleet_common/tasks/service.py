"""Task services for operators: create, list, inspect, change, cancel, retry."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import String, bindparam, cast, exc, insert, select, type_coerce
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value

from fleet_common.agents.models import Agent, AgentMode, DesiredState
from fleet_common.db import Prebuilt, has_orm, page_of, utcnow
from fleet_common.dispatch.routing import (
    can_serve,
    req_key,
    requirements_from_labels,
    validate_capabilities,
)
from fleet_common.errors import Conflict, IllegalTransition, InvalidInput, NotFound
from fleet_common.ids import new_id
from fleet_common.settings import Settings
from fleet_common.sql import insert_new, row_of, table_of
from fleet_common.tasks import state
from fleet_common.tasks.models import ACTIVE, TERMINAL, Task, TaskEvent, TaskStatus

CREATE_FIELDS = (
    "title",
    "prompt",
    "labels",
    "priority",
    "repo",
    "clone_url",
    "requires_pr",
    "max_retries",
    "timeout_secs",
    "assigned_agent_id",
    "issue_number",
    "source",
)


# (column, default) of the task columns with a constant default, which new_task() fills in.
_SCALAR_DEFAULTS = [
    (column.key, column.default.arg)
    for column in Task.__table__.columns
    if column.default is not None and column.default.is_scalar
]


# The task columns without any default: NULL in a new row unless set.
_NULL_COLUMNS = [
    column.key
    for column in Task.__table__.columns
    if column.default is None and column.server_default is None
]
_INSERT_EVENT = insert(table_of(TaskEvent))


@dataclass
class Created:
    task: Task
    warnings: list[str] = field(default_factory=list)
    created: bool = True
    #: Whether a worker's agent (``ssh_cli``) could ever claim the task, so that a wake-up
    #: message is worth sending: pull agents poll, and a message no worker reads stays in the
    #: broker. (A worker that registers later wakes itself when it connects.)
    woken: bool = True


def _digest(data: dict[str, Any]) -> str:
    canonical = json.dumps({k: data.get(k) for k in CREATE_FIELDS}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def create_task(
    session: Session,
    settings: Settings,
    data: dict[str, Any],
    *,
    actor: str,
    idempotency_key: str | None = None,
    now: dt.datetime | None = None,
) -> Created:
    """Queue a new task (or return the one an earlier request with the same key created)."""
    now = now or utcnow()
    request_digest = _digest(data)
    if idempotency_key is not None:
        existing = _by_idempotency_key(session, idempotency_key)
        if existing is not None:
            return _replay(existing, request_digest)
    task = new_task(settings, data, now=now)
    task.idempotency_key = idempotency_key
    assigned = task.assigned_agent_id
    if assigned is not None:
        _live_agent(session, assigned, "assigned_agent_id")
    if task.issue_number is not None:
        warned = capability_warnings(session, task.requirements, assigned)
        return _create_watched(session, task, actor, warned, request_digest)
    stored = insert_checked(session, task, actor)
    if stored is not None:
        warnings, woken = stored
        return Created(task, warnings, woken=woken)
    # A new task's id is fresh and an API task has no issue: only its Idempotency-Key can
    # clash, with a concurrent request that committed first. Answer as it did.
    existing = None if idempotency_key is None else _by_idempotency_key(session, idempotency_key)
    if existing is None:
        raise Conflict("the task could not be stored; retry", reason="conflict")
    return _replay(existing, request_digest)


def _create_watched(
    session: Session, task: Task, actor: str, warnings: list[str], request_digest: str
) -> Created:
    """Create a task linked to a Forgejo issue through the unit of work, whose flushes the
    Forgejo write-back watches to queue the task's sync after commit."""
    key = task.idempotency_key
    if key is None:
        session.add(task)
        state.record_creation(session, task, actor)
        session.flush()
        return Created(task, warnings)
    try:
        with session.begin_nested():
            session.add(task)
            state.record_creation(session, task, actor)
    except exc.IntegrityError:
        # A concurrent request with the same key won the race: answer as it did.
        existing = _by_idempotency_key(session, key)
        if existing is None:
            raise
        return _replay(existing, request_digest)
    return Created(task, warnings)


def insert_created(session: Session, task: Task, actor: str) -> bool:
    """Store a :func:`new_task` and its ``created`` event (as the state machine makes it) with
    two Core ``INSERT`` statements instead of the unit of work; the task is then a loaded
    object of the session (of a lean one only if it has made its Session: otherwise the
    task stays apart, every column set). False, and nothing written, when a unique
    constraint refused the task (``ON CONFLICT DO NOTHING``, which waits for a concurrent
    transaction holding the same key: an issue's active task, an Idempotency-Key)."""
    return _insert(session, task, actor, check=False) is not None


def worker_could_claim(session: Session, task: Task) -> bool:
    """Whether a worker's agent (``ssh_cli``, live, not disabled) could claim ``task``, so
    that its wake-up is worth sending (see :attr:`Created.woken`): pull agents poll, and a
    message no worker reads stays in the broker."""
    requirements, assigned = list(task.requirements or []), task.assigned_agent_id
    if session.get_bind().dialect.name != "postgresql":
        return _reach(session, requirements, assigned)[1]
    query = _capable_query("", assigned is not None, bool(requirements), workers=True)
    params = {"assigned": assigned, "requirements": requirements}
    return bool(session.execute(select(query.exists()), params).scalar())


def insert_checked(session: Session, task: Task, actor: str) -> tuple[list[str], bool] | None:
    """:func:`insert_created` with the task's :func:`capability_warnings` and whether a
    worker's agent could claim it (:attr:`Created.woken`); None when nothing was inserted.
    On PostgreSQL both checks are part of the insert's statement (one round trip fewer; the
    agents they read are the ones a check just before would have read)."""
    requirements, assigned = task.requirements, task.assigned_agent_id
    if session.get_bind().dialect.name != "postgresql":
        capable, woken = _reach(session, requirements, assigned)
        if not insert_created(session, task, actor):
            return None
    else:
        stored = _insert(session, task, actor, check=True)
        if stored is None:
            return None
        capable, woken = stored.capable, stored.woken
    return ([] if capable else _no_capable_agent(requirements)), woken


def _insert(session: Session, task: Task, actor: str, *, check: bool) -> Any:
    """:func:`insert_created`'s work: what the statement returned (on PostgreSQL a row, with
    ``capable`` if ``check``: see :func:`_capable_query`), None when nothing was inserted."""
    event_row = state.creation_row(task, actor)
    row = row_of(task)
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        # One round trip: the event is inserted for the task the CTE inserted, if any.
        params = {**row, **{_EVENT + key: value for key, value in event_row.items()}}
        variant = None
        if check:
            variant = (task.assigned_agent_id is not None, bool(task.requirements))
            params[_CHECK + "assigned"] = task.assigned_agent_id
            params[_CHECK + "requirements"] = list(task.requirements)
        statement = _insert_both(frozenset(row), frozenset(event_row), variant)
        stored = statement.execute(session, params).first()
        if stored is None:
            return None
    else:
        stored = insert_new(connection, Task, row)
        if stored is None:
            return None
        connection.execute(_INSERT_EVENT, event_row)
    if has_orm(session):
        make_transient_to_detached(task)  # the row is stored: the object is now a loaded one
        for key in _NULL_COLUMNS:
            if key not in row:  # NULL in the row: known, so reading it loads nothing
                set_committed_value(task, key, None)
        session.add(task)
    return stored


_EVENT = "evt_"  # the event's parameters' prefix (``event_seq`` is a task column)
_CHECK = "check_"  # the capability check's (``requirements`` is a task column too)


@functools.cache
def _insert_both(
    task_keys: frozenset[str], event_keys: frozenset[str], check: tuple[bool, bool] | None
) -> Prebuilt:
    """PostgreSQL: ``WITH new AS (INSERT task ON CONFLICT DO NOTHING RETURNING id) INSERT
    event SELECT FROM new RETURNING``: no row when the task was not inserted. ``check``
    (assigned?, requirements?): the row also says whether an agent is ``capable``, with
    :func:`_capable_query` on the parameters ``check_assigned`` and ``check_requirements``."""
    tasks, events = table_of(Task), table_of(TaskEvent)
    new = (
        postgresql.insert(tasks)
        .values({key: bindparam(key, type_=tasks.c[key].type) for key in sorted(task_keys)})
        .on_conflict_do_nothing()
        .returning(tasks.c.id)
        .cte("new_task")
    )
    keys = sorted(event_keys - {"task_id"})
    values = [bindparam(_EVENT + key, type_=events.c[key].type) for key in keys]
    returned = [events.c.task_id]
    if check is not None:
        returned.append(_capable_query(_CHECK, *check).exists().label("capable"))
        returned.append(_capable_query(_CHECK, *check, workers=True).exists().label("woken"))
    return Prebuilt(
        insert(events)
        .add_cte(new)
        .from_select(["task_id", *keys], select(new.c.id, *values))
        .returning(*returned)
    )


def new_task(settings: Settings, data: dict[str, Any], *, now: dt.datetime) -> Task:
    """The queued task ``data`` describes (validated; not yet added to any session), with every
    column set, defaults included. Raises InvalidInput."""
    orch = settings.orchestrator
    labels = list(dict.fromkeys(data.get("labels") or []))
    requirements = validate_capabilities(requirements_from_labels(labels), "labels")
    if len(requirements) > orch.max_requirements:
        raise InvalidInput(
            f"labels: a task may require at most {orch.max_requirements} capabilities "
            f"(orchestrator.max_requirements), got {len(requirements)}"
        )
    columns: dict[str, Any] = dict(
        id=new_id("tsk"),
        title=data["title"],
        prompt=data.get("prompt") or "",
        labels=labels,
        requirements=requirements,
        req_key=req_key(requirements),
        priority=data.get("priority") or 0,
        repo=data.get("repo"),
        clone_url=data.get("clone_url"),
        issue_number=data.get("issue_number"),
        requires_pr=bool(data.get("requires_pr", False)),
        source=data.get("source") or "api",
        max_retries=_default(data.get("max_retries"), orch.default_max_retries),
        timeout_secs=_default(data.get("timeout_secs"), orch.task_timeout_secs),
        assigned_agent_id=data.get("assigned_agent_id"),
        status=TaskStatus.QUEUED,
        attempt=1,
        retry_base=0,
        artifacts=[],
        request_digest=_digest(data),
        created_at=now,
        updated_at=now,
        # The caller wakes a worker after commit; the relay re-sends if that wake-up is lost.
        last_published_at=now,
    )
    for key, value in _SCALAR_DEFAULTS:
        if columns.get(key) is None:
            columns[key] = value
    return Task(**columns)


def _default(value: int | None, default: int) -> int:
    return default if value is None else value


def _by_idempotency_key(session: Session, key: str) -> Task | None:
    return session.scalars(select(Task).where(Task.idempotency_key == key)).first()


def _replay(existing: Task, request_digest: str) -> Created:
    if existing.request_digest != request_digest:
        raise Conflict(
            "Idempotency-Key was already used with a different request body",
            reason="idempotency_conflict",
        )
    return Created(existing, [], created=False)


def _live_agent(session: Session, agent_id: str, field_name: str) -> Agent:
    agent = session.get(Agent, agent_id)
    if agent is None or agent.deleted_at is not None:
        raise InvalidInput(f"{field_name}: no agent {agent_id}")
    return agent


def capability_warnings(
    session: Session, requirements: Sequence[str], assigned: str | None
) -> list[str]:
    """Warn when no known agent could ever run a task with these requirements.

    One query that stops at the first capable agent: without requirements any live agent will
    do; on PostgreSQL the JSONB containment (``@>``) is checked in the database; SQLite reads
    the candidates' capabilities."""
    if session.get_bind().dialect.name == "postgresql":
        found = _capable(assigned is not None, bool(requirements)).execute(
            session, {"assigned": assigned, "requirements": list(requirements)}
        )
        capable = found.first() is not None
    else:
        capable = _reach(session, requirements, assigned)[0]
    return [] if capable else _no_capable_agent(requirements)


def _no_capable_agent(requirements: Sequence[str]) -> list[str]:
    needed = ", ".join(requirements) or "none"
    return [
        f"no_capable_agent: no registered agent has the capabilities this task needs ({needed})"
    ]


def _reach(
    session: Session, requirements: Sequence[str], assigned: str | None
) -> tuple[bool, bool]:
    """(an agent could run the task, a worker's agent could): SQLite reads the candidates."""
    query = select(Agent.mode, Agent.capabilities).where(*_live(assigned is not None))
    capable = woken = False
    for mode, capabilities in session.execute(query, {"assigned": assigned}):
        if can_serve(capabilities, requirements):
            capable = True
            woken = woken or mode == AgentMode.SSH_CLI
    return capable, woken


def _live(assigned: bool, prefix: str = "") -> list[Any]:
    """The agents that may get a new task (``:assigned`` only, if given; the parameter's name
    prefixed with ``prefix``)."""
    live = [Agent.deleted_at.is_(None), Agent.desired_state != DesiredState.DISABLED]
    if assigned:
        live.append(Agent.id == bindparam(prefix + "assigned", type_=String()))
    return live


def _capable_query(
    prefix: str, assigned: bool, requirements: bool, *, workers: bool = False
) -> Any:
    """One capable agent, if any (PostgreSQL: ``:requirements`` checked with ``@>``); a
    worker's (``ssh_cli``) only, if ``workers``."""
    query = select(Agent.capabilities).where(*_live(assigned, prefix))
    if workers:
        query = query.where(Agent.mode == AgentMode.SSH_CLI)
    if requirements:
        needed = bindparam(prefix + "requirements", type_=JSONB())
        query = query.where(type_coerce(Agent.capabilities, JSONB).contains(needed))
    return query.limit(1)


@functools.cache
def _capable(assigned: bool, requirements: bool) -> Prebuilt:
    return Prebuilt(_capable_query("", assigned, requirements))


def get_task(session: Session, task_id: str, *, for_update: bool = False) -> Task:
    query = select(Task).where(Task.id == task_id)
    if for_update:
        query = query.with_for_update()
    task = session.scalars(query).first()
    if task is None:
        raise NotFound(f"no task {task_id}")
    return task


def task_events(session: Session, task_id: str) -> list[TaskEvent]:
    """A task's events, oldest first."""
    get_task(session, task_id)
    query = select(TaskEvent).where(TaskEvent.task_id == task_id).order_by(TaskEvent.seq)
    return list(session.scalars(query))


def list_tasks(
    session: Session,
    *,
    status: Sequence[str] = (),
    agent_id: str | None = None,
    repo: str | None = None,
    label: str | None = None,
    page: int = 1,
    page_size: int = 50,
) -> tuple[list[Task], int]:
    """A page of tasks, newest first, and the total matching."""
    query = select(Task)
    if status:
        query = query.where(Task.status.in_(status))
    if agent_id:
        query = query.where(Task.agent_id == agent_id)
    if repo:
        query = query.where(Task.repo == repo)
    if label:
        # Labels are a JSON list; a textual containment check works on both backends and the
        # filter is applied on top of the indexed ones above.
        query = query.where(cast(Task.labels, String).contains(json.dumps(label), autoescape=True))
    return page_of(session, query, (Task.created_at.desc(), Task.id.desc()), page, page_size)


def update_task(session: Session, task_id: str, changes: dict[str, Any], *, actor: str) -> Task:
    """PATCH priority / assignment of a task that is still queued."""
    task = get_task(session, task_id, for_update=True)
    if task.status != TaskStatus.QUEUED:
        raise IllegalTransition(f"a task can be changed only while queued; it is {task.status}")
    applied: dict[str, Any] = {}
    if "priority" in changes and changes["priority"] is not None:
        applied["priority"] = changes["priority"]
    if "assigned_agent_id" in changes:
        assigned = changes["assigned_agent_id"]
        if assigned is not None:
            _live_agent(session, assigned, "assigned_agent_id")
        applied["assigned_agent_id"] = assigned
    if applied:
        state.transition(
            session, task, TaskStatus.QUEUED, event="updated", actor=actor, changes=applied
        )
        task.last_published_at = utcnow()  # the caller wakes a worker for the new routing
        session.flush()
    return task


def cancel_task(
    session: Session,
    task_id: str,
    *,
    actor: str,
    reason: str = state.Reason.CANCELLED_BY_USER,
    now: dt.datetime | None = None,
) -> Task:
    """Cancel a non-terminal task; a running agent learns of it from its next reply."""
    task = get_task(session, task_id, for_update=True)
    if task.status in TERMINAL:
        raise IllegalTransition(f"task is already {task.status}")
    was_active = task.status in ACTIVE
    state.transition(
        session,
        task,
        TaskStatus.CANCELLED,
        event="cancelled",
        actor=actor,
        changes={"failure_reason": reason},
        now=now,
    )
    task.cancel_requested = was_active
    task.finished_at = task.updated_at
    session.flush()
    return task


def retry_task(session: Session, task_id: str, *, actor: str) -> Task:
    """Queue a failed task again now, with a fresh retry budget."""
    task = get_task(session, task_id, for_update=True)
    if task.status != TaskStatus.FAILED:
        raise IllegalTransition(f"only failed tasks can be retried; this one is {task.status}")
    next_attempt = task.attempt + 1
    state.transition(
        session,
        task,
        TaskStatus.QUEUED,
        event="retried",
        actor=actor,
        changes={
            "attempt": next_attempt,
            "retry_base": next_attempt - 1,
            "agent_id": None,
            "not_before": None,
            "failure_reason": None,
        },
    )
    task.lease_digest = None
    task.lease_expires_at = None
    task.finished_at = None
    task.last_published_at = utcnow()  # the caller wakes a worker after commit
    session.flush()
    return task
