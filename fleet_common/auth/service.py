"""Minting, listing, revoking and authenticating tokens."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fleet_common.auth import audit, tokens
from fleet_common.auth.models import Token, TokenKind
from fleet_common.db import page_of, utcnow
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


def authenticate(session: Session, secret: str, *, now: dt.datetime | None = None) -> Principal:
    """Resolve a bearer secret to a Principal; anything not a live admin/agent token is 401."""
    kind = tokens.kind_of(secret)
    if kind not in (TokenKind.ADMIN, TokenKind.AGENT):
        raise Unauthorized("invalid or expired token")
    row = find_live(session, secret, kind, now=now)
    now = now or utcnow()
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
        row.last_used_at = now
    return Principal(kind=kind, token_id=row.id, agent_id=row.agent_id)


def find_live(
    session: Session, secret: str, kind: TokenKind, *, now: dt.datetime | None = None
) -> Token:
    """The live token of ``kind`` for ``secret``, or Unauthorized (one message for every case)."""
    now = now or utcnow()
    found = session.scalars(select(Token).where(Token.digest == tokens.digest(secret))).first()
    if (
        found is None
        or found.kind != kind
        or not tokens.matches(secret, found.digest)
        or found.revoked_at is not None
        or (found.expires_at is not None and found.expires_at <= now)
    ):
        raise Unauthorized("invalid or expired token")
    return found


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
