"""Agents: the pull protocol's agent side (register, heartbeat, deregister, commands) and the
operators' view (list, inspect, change, delete, commands, token rotation)."""

from __future__ import annotations

from typing import Any, cast

import marshmallow as ma
from flask.views import MethodView
from marshmallow import validate

from fleet_api import context, lean
from fleet_api.resources.common import DESIRED_STATES, InSchema, OutSchema
from fleet_common.agents import commands, service
from fleet_common.agents.models import AgentMode, AgentStatus, CommandStatus
from fleet_common.auth.service import Acting
from fleet_common.errors import NotFound

blp = lean.Blueprint("agents", __name__, url_prefix="/api/v1/agents", description="Agents")

CAPABILITY = ma.fields.String(validate=validate.Length(min=1, max=64))


def short() -> ma.fields.String:
    return ma.fields.String(validate=validate.Length(max=200), allow_none=True)


class RegisterSchema(InSchema):
    join_token = ma.fields.String(required=True, validate=validate.Length(min=1, max=200))
    name = ma.fields.String(required=True, validate=validate.Length(min=1, max=200))
    host_uid = ma.fields.String(required=True, validate=validate.Length(min=1, max=200))
    capabilities = ma.fields.List(CAPABILITY, load_default=list, validate=validate.Length(max=64))
    max_concurrency = ma.fields.Integer(load_default=1, validate=validate.Range(1, 256))
    hostname = short()
    platform = short()
    version = short()
    agent_type = short()
    metadata = ma.fields.Dict(load_default=dict)


class AgentSchema(OutSchema):
    id = ma.fields.String()
    name = ma.fields.String()
    mode = ma.fields.String()
    agent_type = ma.fields.String(allow_none=True)
    capabilities = ma.fields.List(ma.fields.String())
    max_concurrency = ma.fields.Integer()
    host_id = ma.fields.String(allow_none=True)
    hostname = ma.fields.String(allow_none=True)
    platform = ma.fields.String(allow_none=True)
    version = ma.fields.String(allow_none=True)
    metadata = ma.fields.Dict(attribute="meta")
    status = ma.fields.String()
    desired_state = ma.fields.String()
    last_heartbeat_at = ma.fields.DateTime(allow_none=True)
    created_at = ma.fields.DateTime()


class RegisteredSchema(OutSchema):
    agent = ma.fields.Nested(AgentSchema)
    agent_token = ma.fields.String()
    heartbeat_interval_secs = ma.fields.Integer()
    lease_secs = ma.fields.Integer()


class LeaseRefSchema(InSchema):
    task_id = ma.fields.String(required=True, validate=validate.Length(min=1, max=40))
    lease_token = ma.fields.String(required=True, validate=validate.Length(min=1, max=200))


class HeartbeatSchema(InSchema):
    leases = ma.fields.List(
        ma.fields.Nested(LeaseRefSchema), load_default=list, validate=validate.Length(max=256)
    )
    metadata = ma.fields.Dict(load_default=dict)


class CommandSchema(OutSchema):
    id = ma.fields.String()
    kind = ma.fields.String()
    payload = ma.fields.Dict()
    status = ma.fields.String()
    success = ma.fields.Boolean(allow_none=True)
    result = ma.fields.Dict(allow_none=True)
    created_by = ma.fields.String()
    created_at = ma.fields.DateTime()
    expires_at = ma.fields.DateTime()
    delivered_at = ma.fields.DateTime(allow_none=True)
    acknowledged_at = ma.fields.DateTime(allow_none=True)
    completed_at = ma.fields.DateTime(allow_none=True)


class DeliveredCommandSchema(OutSchema):
    id = ma.fields.String()
    kind = ma.fields.String()
    payload = ma.fields.Dict()


class HeartbeatReplySchema(OutSchema):
    agent = ma.fields.Nested(AgentSchema)
    desired_state = ma.fields.String()
    commands = ma.fields.List(ma.fields.Nested(DeliveredCommandSchema))
    cancelled_task_ids = ma.fields.List(ma.fields.String())
    stale_task_ids = ma.fields.List(ma.fields.String())
    heartbeat_interval_secs = ma.fields.Integer()


_heartbeat_reply = lean.dumper(HeartbeatReplySchema)


class AgentQuerySchema(InSchema):
    status = ma.fields.String(validate=validate.OneOf([s.value for s in AgentStatus]))
    desired_state = ma.fields.String(validate=validate.OneOf(DESIRED_STATES))
    capability = ma.fields.String()
    mode = ma.fields.String(validate=validate.OneOf([m.value for m in AgentMode]))


class AgentPatchSchema(InSchema):
    name = ma.fields.String(validate=validate.Length(min=1, max=200))
    desired_state = ma.fields.String(validate=validate.OneOf(DESIRED_STATES))
    capabilities = ma.fields.List(CAPABILITY, validate=validate.Length(max=64))


class CommandCreateSchema(InSchema):
    kind = ma.fields.String(required=True, validate=validate.Length(min=1, max=40))
    payload = ma.fields.Dict(load_default=dict)


class CommandQuerySchema(InSchema):
    status = ma.fields.String(validate=validate.OneOf([s.value for s in CommandStatus]))


class CommandCompleteSchema(InSchema):
    success = ma.fields.Boolean(required=True)
    result = ma.fields.Dict(load_default=dict)


class TokenReplySchema(OutSchema):
    agent_token = ma.fields.String()


def _orch() -> Any:
    return context.fleet().settings.orchestrator


@blp.route("/register")
class Register(MethodView):
    @context.public
    @blp.arguments(RegisterSchema)
    @blp.response(201, RegisteredSchema)
    @blp.doc(security=[])  # the join token is in the body
    def post(self, body: dict[str, Any]) -> Any:
        """Register with a join token; the same ``host_uid`` again is the same agent."""
        registered = service.register(context.session(), body)
        return {
            "agent": registered.agent,
            "agent_token": registered.token,
            "heartbeat_interval_secs": _orch().heartbeat_interval_secs,
            "lease_secs": _orch().lease_secs,
        }


@blp.route("/heartbeat")
class Heartbeat(MethodView):
    # Authenticates and marks online in one statement; with nothing else in the body the
    # rest is at most the delivery of commands, one statement too: no transaction needed.
    @context.agent_via(service.authenticate_online, single=lean.at_defaults(HeartbeatSchema))
    @lean.arguments(blp, HeartbeatSchema)
    @blp.response(200, HeartbeatReplySchema)
    def post(self, body: dict[str, Any]) -> Any:
        """Liveness, lease renewals, metadata; the reply carries desired state and commands."""
        online = cast(Acting, context.principal()).row
        reply = service.heartbeat_online(
            context.session(),
            _orch(),
            online,
            online.has_pending,
            body["leases"],
            body["metadata"],
        )
        return lean.reply(
            _heartbeat_reply(
                {
                    "agent": reply.agent,
                    "desired_state": reply.agent.desired_state,
                    "commands": reply.commands,
                    "cancelled_task_ids": reply.cancelled_task_ids,
                    "stale_task_ids": reply.stale_task_ids,
                    "heartbeat_interval_secs": _orch().heartbeat_interval_secs,
                }
            )
        )


@blp.route("/deregister")
class Deregister(MethodView):
    @context.agent
    @blp.response(200, AgentSchema)
    def post(self) -> Any:
        """Leave: the agent goes offline and the tasks it holds are requeued."""
        return service.deregister(context.session(), _orch(), context.principal().agent_id or "")


@blp.route("")
class Agents(MethodView):
    @context.admin
    @blp.arguments(AgentQuerySchema, location="query")
    @blp.response(200, AgentSchema(many=True))
    @blp.paginate(page_size=50, max_page_size=500)
    def get(self, query: dict[str, Any], pagination_parameters: Any) -> Any:
        """List agents; filter by status, desired state, capability, mode."""
        items, total = service.list_agents(
            context.session(),
            **query,
            page=pagination_parameters.page,
            page_size=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return items


@blp.route("/<agent_id>")
class AgentItem(MethodView):
    @context.admin
    @blp.response(200, AgentSchema)
    def get(self, agent_id: str) -> Any:
        """Inspect an agent."""
        return service.get_agent(context.session(), agent_id)

    @context.admin
    @blp.arguments(AgentPatchSchema)
    @blp.response(200, AgentSchema)
    def patch(self, body: dict[str, Any], agent_id: str) -> Any:
        """Change name, desired state or capabilities."""
        return service.update_agent(
            context.session(), agent_id, body, actor=context.principal().actor
        )

    @context.admin
    @blp.response(204)
    def delete(self, agent_id: str) -> Any:
        """Remove an agent: tokens revoked, tasks requeued."""
        service.delete_agent(context.session(), _orch(), agent_id, actor=context.principal().actor)


@blp.route("/<agent_id>/commands")
class AgentCommands(MethodView):
    @context.admin
    @blp.arguments(CommandCreateSchema)
    @blp.response(201, CommandSchema)
    def post(self, body: dict[str, Any], agent_id: str) -> Any:
        """Queue a command (drain, resume, restart, upgrade, cancel_task)."""
        s = context.session()
        agent = service.get_agent(s, agent_id, for_update=True)
        return commands.enqueue(
            s, _orch(), agent, body["kind"], body["payload"], actor=context.principal().actor
        )

    @context.admin
    @blp.arguments(CommandQuerySchema, location="query")
    @blp.response(200, CommandSchema(many=True))
    @blp.paginate(page_size=50, max_page_size=500)
    def get(self, query: dict[str, Any], agent_id: str, pagination_parameters: Any) -> Any:
        """The agent's commands, newest first."""
        s = context.session()
        service.get_agent(s, agent_id)
        items, total = commands.list_commands(
            s,
            agent_id,
            status=query.get("status"),
            page=pagination_parameters.page,
            page_size=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return items


@blp.route("/commands/<command_id>/ack")
class CommandAck(MethodView):
    @context.agent
    @blp.response(200, CommandSchema)
    def post(self, command_id: str) -> Any:
        """Acknowledge one of this agent's commands."""
        return commands.acknowledge(
            context.session(), context.principal().agent_id or "", command_id
        )


@blp.route("/commands/<command_id>/complete")
class CommandComplete(MethodView):
    @context.agent
    @blp.arguments(CommandCompleteSchema)
    @blp.response(200, CommandSchema)
    def post(self, body: dict[str, Any], command_id: str) -> Any:
        """Complete one of this agent's commands with a success flag and a result."""
        return commands.complete(
            context.session(),
            context.principal().agent_id or "",
            command_id,
            body["success"],
            body["result"],
        )


@blp.route("/<agent_id>/rotate-token")
class RotateToken(MethodView):
    @context.any_token
    @blp.response(201, TokenReplySchema)
    def post(self, agent_id: str) -> Any:
        """A new agent token (admin, or the agent itself); the old one has a grace period."""
        who = context.principal()
        if not who.is_admin and who.agent_id != agent_id:
            raise NotFound(f"no agent {agent_id}")
        token = service.rotate_token(context.session(), _orch(), agent_id, actor=who.actor)
        return {"agent_token": token}
