"""Liveness, readiness and metrics (no authentication)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from fleet_api import context, metrics

blp = Blueprint("health", __name__)


@blp.get("/healthz")
def healthz() -> Any:
    """The process is up."""
    return jsonify(status="ok")


@blp.get("/readyz")
def readyz() -> Any:
    """The database (and, when one is configured, the broker) are reachable."""
    ctx = context.fleet()
    checks: dict[str, str] = {}
    try:
        ctx.db.ping()
        checks["database"] = "ok"
    except Exception as error:  # any failure at all means not ready
        checks["database"] = f"unavailable: {type(error).__name__}"
    if ctx.broker_check is not None:
        checks["broker"] = ctx.broker_check()
    ready = all(v == "ok" for v in checks.values())
    return jsonify(status="ready" if ready else "unavailable", checks=checks), 200 if ready else 503


@blp.get("/metrics")
def metrics_view() -> Any:
    body, content_type = metrics.render(context.fleet().db)
    return Response(body, content_type=content_type)
