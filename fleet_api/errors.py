"""One JSON error shape for every failure: ``{"code", "status", "message", "errors"?,
"reason"?}`` (flask-smorest's, plus a machine-readable reason where clients must tell cases
apart). Domain errors, HTTP errors and unexpected ones all come out this way, never as HTML or a
traceback."""

from __future__ import annotations

import logging
from typing import Any

import marshmallow as ma
from flask import Flask
from flask_smorest import Api
from sqlalchemy import exc as sa_exc
from werkzeug.exceptions import HTTPException, InternalServerError, ServiceUnavailable
from werkzeug.http import HTTP_STATUS_CODES

from fleet_common.errors import DatabaseUnavailable, FleetError

log = logging.getLogger("fleet.api")

# How long a client should wait before retrying when the database is unavailable.
RETRY_AFTER = {"Retry-After": "2"}


class ErrorSchema(ma.Schema):
    code = ma.fields.Integer(required=True)
    status = ma.fields.String(required=True)
    message = ma.fields.String(required=True)
    errors = ma.fields.Dict()
    reason = ma.fields.String()


def _payload(code: int, message: str, **extra: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "code": code,
        "status": HTTP_STATUS_CODES.get(code, "Error"),
        "message": message,
    }
    payload.update({k: v for k, v in extra.items() if v is not None})
    return payload


def _summary(errors: Any) -> str:
    """A one-line message from webargs/marshmallow's nested error dict."""
    if isinstance(errors, dict):
        for location, fields in errors.items():
            if isinstance(fields, dict) and fields:
                name, problems = next(iter(fields.items()))
                text = problems[0] if isinstance(problems, list) and problems else problems
                if isinstance(text, dict):
                    return f"{location}.{name}: invalid value"
                return f"{name}: {text}"
    return "the request is not valid"


class FleetApi(Api):
    """flask-smorest's Api with Fleet's error shape."""

    ERROR_SCHEMA = ErrorSchema

    def handle_http_exception(self, error: HTTPException) -> Any:
        code = error.code or 500
        data = getattr(error, "data", None) or {}
        errors = data.get("errors") or data.get("messages")
        message = data.get("message") or (
            _summary(errors) if errors else (error.description or HTTP_STATUS_CODES.get(code, ""))
        )
        if code == 400 and "Invalid JSON" in str(errors or message):
            message = "the request body is not valid JSON"
        if code == 413:
            message = "the request body is too large"
        headers = data.get("headers") or {}
        return _payload(code, message, errors=errors, reason=data.get("reason")), code, headers


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(FleetError)
    def _domain(error: FleetError) -> Any:
        headers = RETRY_AFTER if isinstance(error, DatabaseUnavailable) else {}
        body = _payload(error.status, error.message, reason=error.reason, **error.extra)
        return body, error.status, headers

    @app.errorhandler(sa_exc.OperationalError)
    @app.errorhandler(sa_exc.InterfaceError)
    @app.errorhandler(sa_exc.TimeoutError)
    def _database(error: Exception) -> Any:
        log.warning("database unavailable: %s", error)
        body = _payload(503, "the database is unavailable", reason="database_unavailable")
        return body, ServiceUnavailable.code, RETRY_AFTER

    @app.errorhandler(sa_exc.DataError)
    def _data(error: Exception) -> Any:
        # The database refused a value from the request that the schemas cannot see (a NUL
        # character in a path or header, which PostgreSQL will not take): bad input, not a 500.
        log.warning("the database refused a value: %s", error)
        return _payload(422, "the request carries a value the database cannot take"), 422

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Any:
        if isinstance(error, HTTPException):
            return app.extensions["fleet_api"].handle_http_exception(error)
        log.exception("unhandled error")
        return _payload(500, "internal error (logged on the server)"), InternalServerError.code
