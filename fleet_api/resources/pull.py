"""The pull protocol's task side: dequeue (long-poll), and the fenced writes of a lease holder.

The wire format is the SPEC's and is a contract: agents written by others depend on it.
"""

from __future__ import annotations

import random
import time
from typing import Any, cast

import marshmallow as ma
from flask.views import MethodView
from marshmallow import validate

from fleet_api import context, lean
from fleet_api.resources.common import InSchema, OutSchema
from fleet_api.resources.tasks import TaskSchema
from fleet_common.auth.service import Acting
from fleet_common.db import utcnow
from fleet_common.dispatch.claim import Claim, authenticate_locked, claim_for_reply
from fleet_common.tasks import lease, logs
from fleet_common.tasks.state import ATTEMPT_REASONS

blp = lean.Blueprint("pull", __name__, url_prefix="/api/v1", description="Pull agents: tasks")

LEASE_TOKEN = ma.fields.String(required=True, validate=validate.Length(min=1, max=200))
POLL_INTERVAL = 0.25


class DequeueSchema(InSchema):
    wait_secs = ma.fields.Integer(load_default=0, validate=validate.Range(0, 30))


class LeaseSchema(OutSchema):
    token = ma.fields.String()
    attempt = ma.fields.Integer()
    expires_at = ma.fields.DateTime()


class DequeuedSchema(OutSchema):
    task = ma.fields.Nested(TaskSchema)
    lease = ma.fields.Nested(LeaseSchema)


_dequeued = lean.dumper(DequeuedSchema)


class StatusSchema(InSchema):
    lease_token = LEASE_TOKEN
    status = ma.fields.String(required=True, validate=validate.OneOf(["running"]))
    message = ma.fields.String(allow_none=True, validate=validate.Length(max=2000))


class LogChunkSchema(InSchema):
    lease_token = LEASE_TOKEN
    seq = ma.fields.Integer(required=True, validate=validate.Range(0, 2**31 - 1))
    data = ma.fields.String(required=True, validate=validate.Length(max=262_144))


class ProgressReplySchema(OutSchema):
    cancel_requested = ma.fields.Boolean()
    lease_expires_at = ma.fields.DateTime(allow_none=True)


class CountsSchema(InSchema):
    passed = ma.fields.Integer(validate=validate.Range(min=0))
    failed = ma.fields.Integer(validate=validate.Range(min=0))


class TokensSchema(InSchema):
    input = ma.fields.Integer(validate=validate.Range(min=0))
    output = ma.fields.Integer(validate=validate.Range(min=0))


class ReceiptSchema(InSchema):
    exit_code = ma.fields.Integer(required=True)
    summary = ma.fields.String(allow_none=True, validate=validate.Length(max=20_000))
    branch = ma.fields.String(allow_none=True, validate=validate.Length(max=300))
    commit_sha = ma.fields.String(allow_none=True, validate=validate.Regexp(r"^[0-9a-fA-F]{4,64}$"))
    pr_url = ma.fields.Url(allow_none=True, require_tld=False)
    pr_number = ma.fields.Integer(allow_none=True, validate=validate.Range(min=1))
    tests = ma.fields.Nested(CountsSchema, allow_none=True)
    tokens = ma.fields.Nested(TokensSchema, allow_none=True)
    cost_usd = ma.fields.Float(allow_none=True, validate=validate.Range(min=0))
    agent_version = ma.fields.String(allow_none=True, validate=validate.Length(max=200))
    log_tail = ma.fields.String(allow_none=True, validate=validate.Length(max=65_536))


class CompleteSchema(InSchema):
    lease_token = LEASE_TOKEN
    receipt = ma.fields.Nested(ReceiptSchema, required=True)


class ReceiptPostSchema(CompleteSchema):
    task_id = ma.fields.String(required=True, validate=validate.Length(min=1, max=40))


class FailSchema(InSchema):
    lease_token = LEASE_TOKEN
    error = ma.fields.String(required=True, validate=validate.Length(min=1, max=20_000))
    retryable = ma.fields.Boolean(load_default=True)
    reason = ma.fields.String(
        load_default="exit_code", validate=validate.OneOf(sorted(ATTEMPT_REASONS))
    )


def _claim_once(locked: Any) -> Claim[Any] | None:
    ctx = context.fleet()
    agent_id = context.principal().agent_id or ""
    return claim_for_reply(context.session(), ctx.settings.orchestrator, agent_id, locked=locked)


@blp.route("/tasks/dequeue")
class Dequeue(MethodView):
    # Authenticates and locks the agent's row; then the claim: all Prebuilt statements.
    @context.agent_via(authenticate_locked, lean=True)
    @lean.arguments(blp, DequeueSchema)
    @blp.response(200, DequeuedSchema)
    @blp.alt_response(204, description="Nothing eligible")
    def post(self, body: dict[str, Any]) -> Any:
        """Claim the best eligible task, waiting up to ``wait_secs`` for one."""
        deadline = time.monotonic() + body["wait_secs"]
        s = context.session()
        locked = cast(Acting, context.principal()).row  # for the first attempt only
        while True:
            claim = _claim_once(locked)
            if claim is not None:
                task = claim.task
                lease_out = {
                    "token": claim.lease_token,
                    "attempt": task.attempt,
                    "expires_at": claim.expires_at,
                }
                return lean.reply(_dequeued({"task": task, "lease": lease_out}))
            s.commit()  # end this attempt's transaction (and locks) before waiting
            locked = None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "", 204
            time.sleep(min(remaining, POLL_INTERVAL * (0.8 + 0.4 * random.random())))


def _held(task_id: str, lease_token: str) -> lease.Held:
    agent_id = context.principal().agent_id or ""
    return lease.held_task(context.session(), task_id, agent_id, lease_token, now=utcnow())


def _progress(held: lease.Held) -> dict[str, Any]:
    if held.cancelled:
        return {"cancel_requested": True, "lease_expires_at": None}
    expires = lease.renew(held.task, context.fleet().settings.orchestrator, utcnow())
    return {"cancel_requested": False, "lease_expires_at": expires}


@blp.route("/tasks/<task_id>/status")
class Status(MethodView):
    @context.agent
    @blp.arguments(StatusSchema)
    @blp.response(200, ProgressReplySchema)
    def post(self, body: dict[str, Any], task_id: str) -> Any:
        """Report progress (``running``); the reply says whether to stop."""
        held = _held(task_id, body["lease_token"])
        lease.report_status(
            context.session(), held, body["status"], body.get("message"), now=utcnow()
        )
        return _progress(held)


@blp.route("/tasks/<task_id>/logs")
class Logs(MethodView):
    @context.agent
    @blp.arguments(LogChunkSchema)
    @blp.response(200, ProgressReplySchema)
    def post(self, body: dict[str, Any], task_id: str) -> Any:
        """Append a log chunk (a repeated ``seq`` is ignored, so retries are safe)."""
        held = _held(task_id, body["lease_token"])
        settings = context.fleet().settings.orchestrator
        logs.append(
            context.session(),
            held.task,
            body["seq"],
            body["data"],
            max_bytes=settings.max_log_bytes,
            now=utcnow(),
        )
        return _progress(held)


def _complete(task_id: str, body: dict[str, Any]) -> Any:
    held = _held(task_id, body["lease_token"])
    ctx = context.fleet()
    receipt = {k: v for k, v in body["receipt"].items() if v is not None}
    kwargs = {"pr_check": ctx.pr_check} if ctx.pr_check else {}
    # A failed attempt waits out its backoff; the relay wakes a worker when it ends.
    return lease.complete(context.session(), ctx.settings.orchestrator, held, receipt, **kwargs)


@blp.route("/tasks/<task_id>/complete")
class Complete(MethodView):
    @context.agent
    @blp.arguments(CompleteSchema)
    @blp.response(200, TaskSchema)
    def post(self, body: dict[str, Any], task_id: str) -> Any:
        """Hand back the receipt: completed, in_review, or a failed attempt."""
        return _complete(task_id, body)


@blp.route("/receipts")
class Receipts(MethodView):
    @context.agent
    @blp.arguments(ReceiptPostSchema)
    @blp.response(200, TaskSchema)
    def post(self, body: dict[str, Any]) -> Any:
        """The same as complete, with the task id in the body."""
        return _complete(body["task_id"], body)


@blp.route("/tasks/<task_id>/fail")
class Fail(MethodView):
    @context.agent
    @blp.arguments(FailSchema)
    @blp.response(200, TaskSchema)
    def post(self, body: dict[str, Any], task_id: str) -> Any:
        """Report a failed attempt (retried while attempts remain, unless not retryable)."""
        held = _held(task_id, body["lease_token"])
        return lease.fail(
            context.session(),
            context.fleet().settings.orchestrator,
            held,
            body["error"],
            reason=body["reason"],
            retryable=body["retryable"],
        )
