"""The request boundary: one session per request, authentication, and after-commit hooks.

A view decorated with :func:`admin`, :func:`agent` or :func:`public` runs inside one unit of
work: the session is ``g.session``, the caller ``g.principal``. The boundary commits when the
view returns (services only flush), then runs the callbacks registered with
:func:`after_commit` (publishing wake-ups), so nothing is announced that was not stored.
The guard goes first, above flask-smorest's decorators: the caller is authenticated before the
request is parsed, so a request without a valid token is 401 whatever its body.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from flask import current_app, g, request
from sqlalchemy.orm import Session

from fleet_common.auth import service as auth
from fleet_common.auth import tokens
from fleet_common.auth.models import TokenKind
from fleet_common.auth.service import Principal
from fleet_common.db import Database
from fleet_common.errors import Forbidden, Unauthorized
from fleet_common.settings import Settings
from fleet_common.sweeps import Publish

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class FleetContext:
    """What the app holds for its requests: settings, the database, the publisher."""

    settings: Settings
    db: Database
    publish: Callable[[list[Publish]], None] = field(default=lambda items: None)
    # Collects the publisher's messages during a request, sent together at its end.
    holding: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext
    pr_check: Any = None
    broker_check: Callable[[], str] | None = None
    # Called after commit with the ids of tasks a Forgejo delivery changed (the write-back
    # schedules its sync here); a no-op until something plugs in.
    on_forgejo_change: Callable[[list[str]], None] = field(default=lambda task_ids: None)


def fleet() -> FleetContext:
    return cast(FleetContext, current_app.extensions["fleet"])


def session() -> Session:
    return cast(Session, g.session)


def principal() -> Principal:
    return cast(Principal, g.principal)


def after_commit(callback: Callable[[], None]) -> None:
    g.after_commit.append(callback)


def publish_after_commit(items: list[Publish]) -> None:
    """Wake workers for these tasks once the transaction that queued them commits."""
    if items:
        ctx = fleet()
        after_commit(lambda: ctx.publish(items))


def _bearer() -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if not hmac.compare_digest(scheme.lower().encode(), b"bearer") or not value.strip():
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    return value.strip()


Authenticate = Callable[[Session, str], Principal]


def _run(
    view: Callable[..., Any],
    who: str | None,
    authenticate: Authenticate,
    single: Callable[[], bool] | None,
    lean: bool,
    args: Any,
    kwargs: Any,
) -> Any:
    ctx = fleet()
    g.after_commit = []
    autocommit = single is not None and _token_fits(who) and single()
    with ctx.holding():  # what the request publishes after commit goes out together
        with ctx.db.session(autocommit=autocommit, lean=lean) as s:
            g.session = s
            if who is not None:
                g.principal = authenticate(s, _bearer())
                if who == "admin" and not g.principal.is_admin:
                    raise Forbidden("this endpoint needs an admin token")
                if who == "agent" and g.principal.is_admin:
                    raise Forbidden("this endpoint is for agents; use an agent token")
            result = view(*args, **kwargs)
        for callback in g.after_commit:
            callback()
    return result


def _token_fits(who: str | None) -> bool:
    """Whether the bearer token is of the kind the endpoint serves (by its prefix only). A
    request refused for its token's kind writes nothing, not even the token's last use: it
    runs in a transaction, which the refusal rolls back."""
    wanted = {"admin": TokenKind.ADMIN, "agent": TokenKind.AGENT}.get(who or "")
    if wanted is None:
        return True
    secret = request.headers.get("Authorization", "").partition(" ")[2]
    return tokens.kind_of(secret.strip()) == wanted


def _guard(
    who: str | None,
    authenticate: Authenticate = auth.authenticate,
    single: Callable[[], bool] | None = None,
    lean: bool = False,
) -> Callable[[F], F]:
    def decorate(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return _run(view, who, authenticate, single, lean, args, kwargs)

        return cast(F, wrapper)

    return decorate


admin = _guard("admin")
# An admin endpoint that is mostly Prebuilt statements: its Session is made only if needed.
admin_lean = _guard("admin", lean=True)
# ... whose statements are each atomic and correct on their own: on PostgreSQL, no transaction.
admin_statements = _guard("admin", single=lambda: True, lean=True)
agent = _guard("agent")
any_token = _guard("any")
public = _guard(None)


def agent_via(
    authenticate: Authenticate, *, single: Callable[[], bool] | None = None, lean: bool = False
) -> Callable[[F], F]:
    """:func:`agent`, authenticating with ``authenticate`` (which may do the request's
    first write in the same statement, and return a Principal carrying its result).
    ``single``: true for a request whose every statement is atomic and correct on its own,
    whatever the outcome (see ``Database.session(autocommit=True)``). ``lean``: the request
    is mostly Prebuilt statements; its Session is made only if needed (``Database.session``)."""
    return _guard("agent", authenticate, single, lean)
