"""Domain errors. Services raise these; one place in the API maps them to HTTP."""

from __future__ import annotations

from typing import Any


class FleetError(Exception):
    """Base of every domain error: ``status`` is the HTTP status it maps to."""

    status = 400
    reason: str | None = None

    def __init__(self, message: str, *, reason: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.extra = extra


class NotFound(FleetError):
    status = 404


class InvalidInput(FleetError):
    status = 422


class Unauthorized(FleetError):
    status = 401


class Forbidden(FleetError):
    status = 403


class Conflict(FleetError):
    status = 409


class StaleLease(Conflict):
    reason = "stale_lease"


class IllegalTransition(Conflict):
    reason = "illegal_transition"


class DatabaseUnavailable(FleetError):
    status = 503
    reason = "database_unavailable"
