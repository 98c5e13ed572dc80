"""Join tokens and admin tokens: mint (the secret is shown once), list, revoke."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask.views import MethodView
from marshmallow import validate

from fleet_api import context, lean
from fleet_api.resources.common import Extended, InSchema, OutSchema
from fleet_common.auth import service
from fleet_common.auth.models import TokenKind

blp = lean.Blueprint("tokens", __name__, url_prefix="/api/v1", description="Join and admin tokens")


class JoinTokenCreateSchema(InSchema):
    ttl_secs = ma.fields.Integer(validate=validate.Range(1, 30 * 86400))
    name = ma.fields.String(load_default="", validate=validate.Length(max=200))


class AdminTokenCreateSchema(InSchema):
    name = ma.fields.String(required=True, validate=validate.Length(min=1, max=200))


class TokenSchema(OutSchema):
    id = ma.fields.String()
    kind = ma.fields.String()
    name = ma.fields.String()
    agent_id = ma.fields.String(allow_none=True)
    created_by = ma.fields.String()
    created_at = ma.fields.DateTime()
    expires_at = ma.fields.DateTime(allow_none=True)
    revoked_at = ma.fields.DateTime(allow_none=True)
    used_at = ma.fields.DateTime(allow_none=True)
    last_used_at = ma.fields.DateTime(allow_none=True)


class MintedSchema(TokenSchema):
    token = ma.fields.String()


def _mint(kind: TokenKind, name: str, ttl_secs: int | None) -> Extended:
    row, secret = service.mint(
        context.session(), kind, actor=context.principal().actor, name=name, ttl_secs=ttl_secs
    )
    return Extended(row, token=secret)


def _paged(kind: TokenKind, pagination_parameters: Any) -> Any:
    rows, total = service.list_tokens(
        context.session(),
        kind,
        page=pagination_parameters.page,
        page_size=pagination_parameters.page_size,
    )
    pagination_parameters.item_count = total
    return rows


@blp.route("/join-tokens")
class JoinTokens(MethodView):
    @context.admin
    @blp.arguments(JoinTokenCreateSchema)
    @blp.response(201, MintedSchema)
    def post(self, body: dict[str, Any]) -> Any:
        """Mint a one-time join token (shown once)."""
        ttl = body.get("ttl_secs") or context.fleet().settings.orchestrator.join_token_ttl_secs
        return _mint(TokenKind.JOIN, body["name"], ttl)

    @context.admin
    @blp.response(200, TokenSchema(many=True))
    @blp.paginate(page_size=50, max_page_size=500)
    def get(self, pagination_parameters: Any) -> Any:
        """List join tokens (never their secrets)."""
        return _paged(TokenKind.JOIN, pagination_parameters)


@blp.route("/join-tokens/<token_id>")
class JoinTokenItem(MethodView):
    @context.admin
    @blp.response(204)
    def delete(self, token_id: str) -> Any:
        """Revoke a join token."""
        service.revoke(context.session(), TokenKind.JOIN, token_id, actor=context.principal().actor)


@blp.route("/admin-tokens")
class AdminTokens(MethodView):
    @context.admin
    @blp.arguments(AdminTokenCreateSchema)
    @blp.response(201, MintedSchema)
    def post(self, body: dict[str, Any]) -> Any:
        """Mint an admin token (shown once)."""
        return _mint(TokenKind.ADMIN, body["name"], None)

    @context.admin
    @blp.response(200, TokenSchema(many=True))
    @blp.paginate(page_size=50, max_page_size=500)
    def get(self, pagination_parameters: Any) -> Any:
        """List admin tokens (never their secrets)."""
        return _paged(TokenKind.ADMIN, pagination_parameters)


@blp.route("/admin-tokens/<token_id>")
class AdminTokenItem(MethodView):
    @context.admin
    @blp.response(204)
    def delete(self, token_id: str) -> Any:
        """Revoke an admin token."""
        service.revoke(
            context.session(), TokenKind.ADMIN, token_id, actor=context.principal().actor
        )
