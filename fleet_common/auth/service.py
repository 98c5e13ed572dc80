"""Minting, listing, revoking and authenticating tokens."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BindParameter, ScalarSelect, String, bindparam, select, update
from sqlalchemy.orm import Session

from fleet_common.auth import audit, tokens
from fleet_common.auth.models import Token, TokenKind
from fleet_common.db import Prebuilt, UTCDateTime, page_of, utcnow
from fleet_common.errors import InvalidInput, NotFound, Unauthorized
from fleet_common.ids import new_id

# last_used_at is a hint for people; writing it on every request would turn reads into writes.
LAST_USED_RESOLUTION = dt.timedelta(seconds=60)


@dataclass(frozen=True)
class Principal:
    """Who is calling: an admin, or one agent."""

    kind: TokenKind
    token_id: str
    agent_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.kind == TokenKind.ADMIN

    @property
    def actor(self) -> str:
        return f"agent:{self.agent_id}" if self.agent_id else f"admin:{self.token_id}"


def mint(
    session: Session,
    kind: TokenKind,
    *,
    actor: str,
    name: str = "",
    agent_id: str | None = None,
    ttl_secs: int | None = None,
    now: dt.datetime | None = None,
) -> tuple[Token, str]:
    """Create a token; returns the row and the secret (shown once, never stored)."""
    now = now or utcnow()
    secret = tokens.generate(kind)
    row = Token(
        id=new_id("tok"),
        kind=kind,
        name=name,
        digest=tokens.digest(secret),
        agent_id=agent_id,
        created_by=actor,
        created_at=now,
        expires_at=now + dt.timedelta(seconds=ttl_secs) if ttl_secs else None,
    )
    session.add(row)
    audit.record(
        session, actor, "token.create", f"{kind}_token", row.id, name=name, agent_id=agent_id
    )
    return row, secret


def list_tokens(
    session: Session, kind: TokenKind, *, page: int = 1, page_size: int = 100
) -> tuple[list[Token], int]:
    """A page of tokens of ``kind``, newest first, and the total."""
    query = select(Token).where(Token.kind == kind)
    return page_of(session, query, (Token.created_at.desc(), Token.id), page, page_size)


def revoke(session: Session, kind: TokenKind, token_id: str, *, actor: str) -> Token:
    """Revoke a token of ``kind``; unknown ids (or another kind's) are NotFound."""
    row = session.get(Token, token_id)
    if row is None or row.kind != kind:
        raise NotFound(f"no {kind} token {token_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        audit.record(session, actor, "token.revoke", f"{kind}_token", row.id)
    return row


def revoke_agent_tokens(session: Session, agent_id: str, *, actor: str, now: dt.datetime) -> None:
    session.execute(
        update(Token)
        .where(
            Token.agent_id == agent_id, Token.kind == TokenKind.AGENT, Token.revoked_at.is_(None)
        )
        .values(revoked_at=now)
    )
    audit.record(session, actor, "token.revoke_all", "agent", agent_id)


# Built once: authentication runs on every request, so it is one prebuilt Core statement
# (no ORM load, no per-request statement building) and no cache (revocation is immediate).
DIGEST: BindParameter[str] = bindparam("digest", type_=String())
NOW = bindparam("now", type_=UTCDateTime())
_BY_DIGEST = Prebuilt(
    select(
        Token.id,
        Token.kind,
        Token.agent_id,
        Token.digest,
        Token.revoked_at,
        Token.expires_at,
        Token.last_used_at,
    ).where(Token.digest == DIGEST)
)
_MARK_USED = Prebuilt(
    update(Token)
    .where(Token.id == bindparam("token_id"))
    .values(last_used_at=bindparam("used", type_=UTCDateTime()))
)


def authenticate(session: Session, secret: str, *, now: dt.datetime | None = None) -> Principal:
    """Resolve a bearer secret to a Principal; anything not a live admin/agent token is 401."""
    kind = tokens.kind_of(secret)
    if kind not in (TokenKind.ADMIN, TokenKind.AGENT):
        raise Unauthorized("invalid or expired token")
    now = now or utcnow()
    row = find_live(session, secret, kind, now=now)
    note_use(session, row.id, row.last_used_at, now)
    return Principal(kind=kind, token_id=row.id, agent_id=row.agent_id)


def note_use(
    session: Session, token_id: str, last_used_at: dt.datetime | None, now: dt.datetime
) -> None:
    """Record the token's use, at most once per LAST_USED_RESOLUTION."""
    if last_used_at is None or now - last_used_at > LAST_USED_RESOLUTION:
        _MARK_USED.execute(session, {"token_id": token_id, "used": now})


def find_live(
    session: Session, secret: str, kind: TokenKind, *, now: dt.datetime | None = None
) -> Any:
    """The live token of ``kind`` for ``secret`` (a row of its columns), or Unauthorized (one
    message for every case)."""
    now = now or utcnow()
    session.flush()  # a Core statement: make the session's pending changes visible to it
    found = _BY_DIGEST.execute(session, {"digest": tokens.digest(secret)}).first()
    if (
        found is None
        or found.kind != kind
        or not tokens.matches(secret, found.digest)
        or found.revoked_at is not None
        or (found.expires_at is not None and found.expires_at <= now)
    ):
        raise Unauthorized("invalid or expired token")
    return found


@dataclass(frozen=True)
class Acting(Principal):
    """An agent authenticated by a statement that also acted on its row (see
    :func:`authenticate_acting`); ``row`` is what that statement returned."""

    row: Any = None


def authenticate_acting(session: Session, secret: str, statement: Prebuilt) -> Principal:
    """Authenticate and act on the caller's agent in one statement: ``statement`` (built with
    :func:`live_agent_token`, parameters ``digest`` and ``now``) returns the agent's row with
    ``token_id`` and ``token_used_at``, or nothing. Nothing, or an admin token, takes the usual
    path and its answer (401, or an admin Principal, which agent endpoints refuse); a live
    agent token whose agent the statement did not find is NotFound."""
    if tokens.kind_of(secret) != TokenKind.AGENT:
        return authenticate(session, secret)
    now = utcnow()
    params = {"digest": tokens.digest(secret), "now": now}
    row = statement.execute(session, params).first()
    if row is None:
        who = authenticate(session, secret, now=now)  # Unauthorized unless the token is live
        raise NotFound(f"no agent {who.agent_id}")
    note_use(session, row.token_id, row.token_used_at, now)
    return Acting(kind=TokenKind.AGENT, token_id=row.token_id, agent_id=row.id, row=row)


def token_columns() -> tuple[Any, ...]:
    """What :func:`authenticate_acting` needs its statement to return about the token."""
    return (
        live_agent_token(Token.id).label("token_id"),
        live_agent_token(Token.last_used_at).label("token_used_at"),
    )


def live_agent_token(column: Any) -> ScalarSelect[Any]:
    """``column`` of the live agent token whose digest is the ``digest`` parameter, as a
    scalar subquery (NULL if there is none): the checks of :func:`find_live`, for statements
    that authenticate and act at once. ``now`` is a parameter too."""
    live = (
        Token.digest == DIGEST,
        Token.kind == TokenKind.AGENT,
        Token.revoked_at.is_(None),
        Token.expires_at.is_(None) | (Token.expires_at > NOW),
    )
    return select(column).where(*live).scalar_subquery()


def check_join_token(session: Session, secret: str, *, now: dt.datetime) -> Token:
    """A usable join token, locked for this transaction; it is spent by :func:`spend`."""
    if not isinstance(secret, str) or tokens.kind_of(secret) != TokenKind.JOIN:
        raise Unauthorized("invalid, expired or used join token")
    query = select(Token).where(Token.digest == tokens.digest(secret)).with_for_update()
    row = session.scalars(query).first()
    if (
        row is None
        or row.kind != TokenKind.JOIN
        or row.used_at is not None
        or row.revoked_at is not None
        or (row.expires_at is not None and row.expires_at <= now)
    ):
        raise Unauthorized("invalid, expired or used join token")
    return row


def spend(row: Token, agent_id: str, now: dt.datetime) -> None:
    row.used_at = now
    row.agent_id = agent_id


def validate_ttl(ttl_secs: int | None, maximum: int = 30 * 86400) -> None:
    if ttl_secs is not None and not 0 < ttl_secs <= maximum:
        raise InvalidInput(f"ttl_secs must be between 1 and {maximum}")
