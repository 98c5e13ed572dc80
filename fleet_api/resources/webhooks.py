"""The Forgejo webhook receiver and intake health.

``POST /api/v1/webhooks/forgejo`` takes no bearer token: the HMAC signature over the raw body is
its authentication (401, nothing stored, when it is missing or wrong, or when no
``webhook_secret`` is configured). Everything it does is database work in this request's
transaction (``fleet_common.forgejo.intake``); wake-ups and the write-back sync run after commit,
so Forgejo gets its answer long before its 5 s delivery timeout.
"""

from __future__ import annotations

import logging
from typing import Any

import marshmallow as ma
from flask import request
from flask.views import MethodView
from flask_smorest import abort

from fleet_api import context, lean
from fleet_api.metrics import WEBHOOKS
from fleet_api.resources.common import OutSchema
from fleet_common.errors import Unauthorized
from fleet_common.forgejo import health, intake
from fleet_common.forgejo.events import InvalidDelivery, parse_delivery
from fleet_common.forgejo.signatures import verify

log = logging.getLogger("fleet.api")

blp = lean.Blueprint("forgejo", __name__, url_prefix="/api/v1", description="Forgejo intake")


class WebhookReplySchema(OutSchema):
    outcome = ma.fields.String()
    detail = ma.fields.String()
    task_ids = ma.fields.List(ma.fields.String())


class RepoHealthSchema(OutSchema):
    repo = ma.fields.String()
    configured = ma.fields.Boolean()
    last_webhook_at = ma.fields.DateTime(allow_none=True)
    last_reconcile_at = ma.fields.DateTime(allow_none=True)
    last_error = ma.fields.String(allow_none=True)
    last_error_at = ma.fields.DateTime(allow_none=True)


_reply = lean.dumper(WebhookReplySchema)


@blp.route("/webhooks/forgejo")
class ForgejoWebhook(MethodView):
    @blp.response(202, WebhookReplySchema)
    @blp.doc(security=[])
    @context.public
    def post(self) -> Any:
        """Receive a Forgejo delivery (signed with ``X-Forgejo-Signature``,
        ``X-Gitea-Signature`` or ``X-Hub-Signature-256``); unknown events are accepted and
        ignored."""
        ctx = context.fleet()
        body = request.get_data(cache=True)
        if not verify(body, request.headers, ctx.settings.forgejo.webhook_secret):
            WEBHOOKS.labels(event="unknown", outcome="unauthorized").inc()
            raise Unauthorized("missing or invalid webhook signature")
        try:
            delivery = parse_delivery(request.headers, body)
        except InvalidDelivery as error:
            WEBHOOKS.labels(event="unknown", outcome="invalid").inc()
            abort(400, message=str(error))
        result = intake.receive(context.session(), ctx.settings, delivery)
        context.publish_after_commit(result.publish)
        if result.task_ids:
            changed = list(result.task_ids)
            context.after_commit(lambda: _notify(ctx, changed))
        WEBHOOKS.labels(event=delivery.event[:40] or "unknown", outcome=result.outcome).inc()
        return lean.reply(_reply(result), 202)


def _notify(ctx: context.FleetContext, task_ids: list[str]) -> None:
    # The delivery is stored and answered whatever the hook does; the write-back's own sweep
    # catches up with anything a failing hook missed.
    try:
        ctx.on_forgejo_change(task_ids)
    except Exception:
        log.warning("forgejo change hook failed for %s", task_ids, exc_info=True)


@blp.route("/intake/health")
class IntakeHealth(MethodView):
    @blp.response(200, RepoHealthSchema(many=True))
    @context.admin
    def get(self) -> Any:
        """Per repository: last webhook, last reconcile, last error (configured repositories
        are listed even before anything arrived)."""
        return health.intake_health(context.session(), context.fleet().settings)
