"""The Flask app factory."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from flask import Flask

from fleet_api import writeback
from fleet_api.context import FleetContext
from fleet_api.errors import FleetApi, register_error_handlers
from fleet_api.resources import agents, health, pull, tasks, tokens, webhooks
from fleet_common.db import Database
from fleet_common.forgejo.receipts import make_pr_check
from fleet_common.settings import Settings, load_settings

SWAGGER_UI_URL = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/"


def create_app(
    settings: Settings | None = None,
    *,
    db: Database | None = None,
    publisher: Any = None,
    sync_publisher: Any = None,
) -> Flask:
    """Build the API for ``settings`` (loaded from the environment when not given).

    ``publisher`` sends task wake-ups after commit; by default the Celery publisher for the
    configured broker (``publisher=False`` for none, e.g. in tests of the pull path alone).
    ``sync_publisher`` queues the Forgejo write-back's syncs after commit; by default that
    same Celery publisher when it is the default one (a test's recorder of wake-ups gets none).
    """
    settings = settings or load_settings()
    app = Flask(__name__)
    app.config.update(
        API_TITLE="Fleet",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="docs",
        OPENAPI_SWAGGER_UI_URL=SWAGGER_UI_URL,
        MAX_CONTENT_LENGTH=settings.server.max_body_bytes,
        JSON_SORT_KEYS=False,
    )
    db = db or Database(settings.database_url, pool_size=20)
    ctx = FleetContext(settings=settings, db=db)
    if publisher is None:
        publisher = _celery_publisher(settings)
        sync_publisher = publisher if sync_publisher is None else sync_publisher
    if publisher:
        ctx.publish = publisher.publish
        ctx.broker_check = getattr(publisher, "check", None)
        ctx.holding = getattr(publisher, "holding", contextlib.nullcontext)
    if settings.forgejo.enabled:
        ctx.pr_check = make_pr_check(settings)
        if sync_publisher:
            writeback.install(ctx, db, sync_publisher)
    app.extensions["fleet"] = ctx

    api = FleetApi(app, spec_kwargs=_spec_kwargs())
    app.extensions["fleet_api"] = api
    for module in (tasks, pull, agents, tokens, webhooks):
        api.register_blueprint(module.blp)
    app.register_blueprint(health.blp)
    register_error_handlers(app)
    logging.getLogger("fleet").setLevel(logging.INFO)
    return app


def _celery_publisher(settings: Settings) -> Any:
    try:
        from fleet_worker.celery_app import make_celery
        from fleet_worker.publisher import Publisher
    except ImportError:  # the worker package is optional for an API-only install
        return False
    return Publisher(make_celery(settings))


def _spec_kwargs() -> dict[str, Any]:
    return {
        "info": {"description": "Fleet: an orchestrator for fleets of AI coding agents."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
