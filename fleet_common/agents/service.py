"""Agent lifecycle: register, heartbeat, deregister, inspect, change, delete, rotate tokens."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Row, String, bindparam, cast, exc, select, update
from sqlalchemy.orm import Session

from fleet_common.agents import commands
from fleet_common.agents.models import Agent, AgentMode, AgentStatus, Command, DesiredState
from fleet_common.auth import audit
from fleet_common.auth import service as auth
from fleet_common.auth.models import Token, TokenKind
from fleet_common.auth.service import NOW, Principal
from fleet_common.db import Prebuilt, page_of, utcnow
from fleet_common.dispatch.routing import validate_capabilities
from fleet_common.errors import InvalidInput, NotFound, StaleLease
from fleet_common.ids import new_id
from fleet_common.settings import OrchestratorSettings
from fleet_common.tasks import lease as leases
from fleet_common.tasks.models import ACTIVE, Task
from fleet_common.tasks.state import Reason

MAX_METADATA_BYTES = 16_384
PROFILE_FIELDS = ("name", "hostname", "platform", "version", "agent_type", "max_concurrency")


@dataclass
class Registered:
    agent: Agent
    token: str


@dataclass
class HeartbeatReply:
    agent: Any  # a row of AGENT_VIEW
    commands: list[Command] = field(default_factory=list)
    cancelled_task_ids: list[str] = field(default_factory=list)
    stale_task_ids: list[str] = field(default_factory=list)


def get_agent(session: Session, agent_id: str, *, for_update: bool = False) -> Agent:
    query = select(Agent).where(Agent.id == agent_id, Agent.deleted_at.is_(None))
    if for_update:
        query = query.with_for_update()
    agent = session.scalars(query).first()
    if agent is None:
        raise NotFound(f"no agent {agent_id}")
    return agent


def _metadata(value: dict[str, Any] | None) -> dict[str, Any]:
    value = value or {}
    if len(json.dumps(value, default=str)) > MAX_METADATA_BYTES:
        raise InvalidInput(f"metadata: at most {MAX_METADATA_BYTES} bytes of JSON")
    return value


def register(
    session: Session, body: dict[str, Any], *, now: dt.datetime | None = None
) -> Registered:
    """Register with a join token; the same ``host_uid`` again is the same agent, with a new
    token (the old ones revoked). Validation happens before the join token is spent."""
    now = now or utcnow()
    capabilities = validate_capabilities(body.get("capabilities") or [], "capabilities")
    metadata = _metadata(body.get("metadata"))
    join = auth.check_join_token(session, body.get("join_token", ""), now=now)
    profile = {k: body[k] for k in PROFILE_FIELDS if body.get(k) is not None}
    agent = _live_by_host_uid(session, body["host_uid"])
    created = False
    if agent is None:
        agent = Agent(
            id=new_id("agt"),
            host_uid=body["host_uid"],
            mode=AgentMode.HTTP_PULL,
            capabilities=capabilities,
            meta=metadata,
            status=AgentStatus.ONLINE,
            desired_state=DesiredState.ACTIVE,
            last_heartbeat_at=now,
            created_at=now,
            updated_at=now,
            **profile,
        )
        try:
            with session.begin_nested():
                session.add(agent)
            created = True
        except exc.IntegrityError:
            # A concurrent registration of the same host won the race: join it.
            agent = _live_by_host_uid(session, body["host_uid"])
            assert agent is not None
    if not created:
        for key, value in profile.items():
            setattr(agent, key, value)
        agent.capabilities = capabilities
        agent.meta = {**(agent.meta or {}), **metadata}
        agent.status = AgentStatus.ONLINE
        agent.last_heartbeat_at = now
        agent.updated_at = now
        auth.revoke_agent_tokens(session, agent.id, actor=f"agent:{agent.id}", now=now)
    action = "agent.register" if created else "agent.reregister"
    auth.spend(join, agent.id, now)
    _, secret = auth.mint(
        session,
        TokenKind.AGENT,
        actor=f"join:{join.id}",
        name=agent.name,
        agent_id=agent.id,
        now=now,
    )
    audit.record(session, f"join:{join.id}", action, "agent", agent.id, host_uid=agent.host_uid)
    session.flush()
    return Registered(agent, secret)


def _live_by_host_uid(session: Session, host_uid: str) -> Agent | None:
    query = (
        select(Agent)
        .where(Agent.host_uid == host_uid, Agent.deleted_at.is_(None))
        .with_for_update()
    )
    return session.scalars(query).first()


def ensure_configured(
    session: Session,
    *,
    host_uid: str,
    name: str,
    host_id: str,
    hostname: str,
    agent_type: str,
    capabilities: Sequence[str],
    max_concurrency: int,
    now: dt.datetime | None = None,
) -> Agent:
    """The ``ssh_cli`` agent row of one configured host slot (created or refreshed)."""
    now = now or utcnow()
    agent = _live_by_host_uid(session, host_uid)
    if agent is None:
        agent = Agent(
            id=new_id("agt"),
            host_uid=host_uid,
            mode=AgentMode.SSH_CLI,
            created_at=now,
            desired_state=DesiredState.ACTIVE,
        )
        session.add(agent)
        audit.record(session, f"worker:{host_id}", "agent.register", "agent", agent.id)
    agent.name = name
    agent.host_id = host_id
    agent.hostname = hostname
    agent.agent_type = agent_type
    agent.capabilities = sorted(set(capabilities))
    agent.max_concurrency = max_concurrency
    agent.status = AgentStatus.ONLINE
    agent.last_heartbeat_at = now
    agent.updated_at = now
    session.flush()
    return agent


# What a heartbeat returns of the agent (its public columns), and the pending-commands flag.
AGENT_VIEW = (
    Agent.id,
    Agent.name,
    Agent.mode,
    Agent.agent_type,
    Agent.capabilities,
    Agent.max_concurrency,
    Agent.host_id,
    Agent.hostname,
    Agent.platform,
    Agent.version,
    Agent.meta.label("meta"),
    Agent.status,
    Agent.desired_state,
    Agent.last_heartbeat_at,
    Agent.created_at,
)


def _touch_statement(agent_id: Any) -> Any:
    """Mark the agent ``agent_id`` (a value or a scalar subquery) online, locking its row;
    returns AGENT_VIEW and whether commands wait for it."""
    # The id as given, not the Agent.id column: SQLite renders a column in RETURNING
    # unqualified, and inside the EXISTS over commands "id" would then mean commands.id.
    return (
        update(Agent)
        .where(Agent.id == agent_id, Agent.deleted_at.is_(None))
        .values(status=AgentStatus.ONLINE, last_heartbeat_at=NOW, updated_at=NOW)
        .returning(*AGENT_VIEW, commands.pending_exists(agent_id, NOW))
    )


# Built once (statements are the hot path's main cost): by agent id, and by the caller's
# token, which authenticates and marks online in one statement.
_TOUCH_BY_ID = Prebuilt(_touch_statement(bindparam("agent_id")))
_TOUCH_BY_TOKEN = Prebuilt(
    _touch_statement(auth.live_agent_token(Token.agent_id)).returning(*auth.token_columns())
)
_SET_METADATA = Prebuilt(
    update(Agent)
    .where(Agent.id == bindparam("agent_id"))
    .values(meta=bindparam("meta", type_=Agent.meta.type), updated_at=NOW)
    .returning(*AGENT_VIEW)
)


def authenticate_online(session: Session, secret: str) -> Principal:
    """Authenticate the caller and mark its agent online in the same statement (the
    heartbeat's hot path: one round trip); an :class:`auth.Acting` whose row is AGENT_VIEW
    plus ``has_pending``. A deleted agent is NotFound."""
    return auth.authenticate_acting(session, secret, _TOUCH_BY_TOKEN)


def heartbeat(
    session: Session,
    settings: OrchestratorSettings,
    agent_id: str,
    presented: Sequence[dict[str, str]],
    metadata: dict[str, Any] | None = None,
    *,
    now: dt.datetime | None = None,
) -> HeartbeatReply:
    """Liveness: renew the presented leases, merge metadata, deliver pending commands.

    The hot path is one statement: the agent row is updated and returned together with
    whether any command is waiting, so an idle agent's heartbeat costs a single round trip."""
    now = now or utcnow()
    session.flush()  # Core statements follow
    row = _TOUCH_BY_ID.execute(session, {"agent_id": agent_id, "now": now}).first()
    if row is None:
        raise NotFound(f"no agent {agent_id}")
    return heartbeat_online(
        session, settings, row, bool(row.has_pending), presented, metadata, now=now
    )


def heartbeat_online(
    session: Session,
    settings: OrchestratorSettings,
    agent: Row[Any],
    has_pending: bool,
    presented: Sequence[dict[str, str]],
    metadata: dict[str, Any] | None = None,
    *,
    now: dt.datetime | None = None,
) -> HeartbeatReply:
    """The rest of a heartbeat once the agent was marked online (``agent``, a row of
    AGENT_VIEW): metadata, lease renewals, commands."""
    now = now or utcnow()
    if metadata:
        merged = {**(agent.meta or {}), **_metadata(metadata)}
        params = {"agent_id": agent.id, "meta": merged, "now": now}
        agent = _SET_METADATA.execute(session, params).one()
    reply = HeartbeatReply(agent)
    if presented:
        _renew_presented(session, settings, agent.id, presented, reply, now)
    if has_pending:
        reply.commands = commands.deliver(session, settings, agent.id, now=now)
    return reply


def _renew_presented(
    session: Session,
    settings: OrchestratorSettings,
    agent_id: str,
    presented: Sequence[dict[str, str]],
    reply: HeartbeatReply,
    now: dt.datetime,
) -> None:
    ids = [item["task_id"] for item in presented]
    query = select(Task).where(Task.id.in_(ids)).order_by(Task.id).with_for_update()
    tasks = {t.id: t for t in session.scalars(query)}
    for item in presented:
        task = tasks.get(item["task_id"])
        try:
            held = leases.check(
                session, task, item["task_id"], agent_id, item["lease_token"], now=now
            )
        except (StaleLease, NotFound):
            reply.stale_task_ids.append(item["task_id"])
            continue
        if held.cancelled:
            reply.cancelled_task_ids.append(held.task.id)
        else:
            leases.renew(held.task, settings, now)


def deregister(
    session: Session,
    settings: OrchestratorSettings,
    agent_id: str,
    *,
    now: dt.datetime | None = None,
) -> Agent:
    """The agent leaves: it goes offline and the tasks it holds are requeued."""
    now = now or utcnow()
    agent = get_agent(session, agent_id, for_update=True)
    agent.status = AgentStatus.OFFLINE
    agent.updated_at = now
    release_tasks(session, settings, agent.id, Reason.AGENT_LOST, "the agent deregistered", now=now)
    audit.record(session, f"agent:{agent.id}", "agent.deregister", "agent", agent.id)
    return agent


def release_tasks(
    session: Session,
    settings: OrchestratorSettings,
    agent_id: str,
    reason: Reason,
    error: str,
    *,
    now: dt.datetime,
) -> list[Task]:
    """Fail the current attempt of every task ``agent_id`` holds (they are retried)."""
    held = session.scalars(
        select(Task)
        .where(Task.agent_id == agent_id, Task.status.in_(ACTIVE))
        .order_by(Task.id)
        .with_for_update()
    )
    released = []
    for task in held:
        leases.fail_attempt(session, settings, task, reason, error, actor="fleet", now=now)
        released.append(task)
    return released


def list_agents(
    session: Session,
    *,
    status: str | None = None,
    desired_state: str | None = None,
    capability: str | None = None,
    mode: str | None = None,
    page: int = 1,
    page_size: int = 50,
) -> tuple[list[Agent], int]:
    query = select(Agent).where(Agent.deleted_at.is_(None))
    if status:
        query = query.where(Agent.status == status)
    if desired_state:
        query = query.where(Agent.desired_state == desired_state)
    if mode:
        query = query.where(Agent.mode == mode)
    if capability:
        query = query.where(
            cast(Agent.capabilities, String).contains(json.dumps(capability), autoescape=True)
        )
    return page_of(session, query, (Agent.created_at, Agent.id), page, page_size)


def update_agent(session: Session, agent_id: str, changes: dict[str, Any], *, actor: str) -> Agent:
    """PATCH name, desired_state or capabilities (operators only)."""
    agent = get_agent(session, agent_id, for_update=True)
    applied: dict[str, Any] = {}
    if changes.get("name") is not None:
        applied["name"] = agent.name = changes["name"]
    if changes.get("desired_state") is not None:
        applied["desired_state"] = agent.desired_state = DesiredState(changes["desired_state"])
    if changes.get("capabilities") is not None:
        agent.capabilities = validate_capabilities(changes["capabilities"], "capabilities")
        applied["capabilities"] = agent.capabilities
    if applied:
        agent.updated_at = utcnow()
        audit.record(session, actor, "agent.update", "agent", agent.id, **applied)
    session.flush()
    return agent


def delete_agent(
    session: Session, settings: OrchestratorSettings, agent_id: str, *, actor: str
) -> None:
    """Remove an agent: its tokens are revoked, its tasks requeued, its commands expired."""
    now = utcnow()
    agent = get_agent(session, agent_id, for_update=True)
    agent.deleted_at = now
    agent.status = AgentStatus.OFFLINE
    agent.desired_state = DesiredState.DISABLED
    auth.revoke_agent_tokens(session, agent.id, actor=actor, now=now)
    release_tasks(session, settings, agent.id, Reason.AGENT_LOST, "the agent was deleted", now=now)
    commands.expire_for_agent(session, agent.id, now=now)
    audit.record(session, actor, "agent.delete", "agent", agent.id)
    session.flush()


def rotate_token(
    session: Session, settings: OrchestratorSettings, agent_id: str, *, actor: str
) -> str:
    """A new agent token; the current ones stay valid for the grace period, then expire."""
    now = utcnow()
    agent = get_agent(session, agent_id, for_update=True)
    grace_end = now + dt.timedelta(seconds=settings.token_rotation_grace_secs)
    live = select(Token).where(
        Token.agent_id == agent.id, Token.kind == TokenKind.AGENT, Token.revoked_at.is_(None)
    )
    for token in session.scalars(live):
        if token.expires_at is None or token.expires_at > grace_end:
            token.expires_at = grace_end
    _, secret = auth.mint(
        session, TokenKind.AGENT, actor=actor, name=agent.name, agent_id=agent.id, now=now
    )
    audit.record(session, actor, "token.rotate", "agent", agent.id)
    session.flush()
    return secret
