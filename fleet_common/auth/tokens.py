"""Token secrets: generation, digests and constant-time checks.

Tokens carry a visible kind prefix (``fla_`` admin, ``flj_`` join, ``flt_`` agent) so secret
scanners and people can tell them apart. Only SHA-256 digests are ever stored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from fleet_common.auth.models import TokenKind

PREFIXES = {TokenKind.ADMIN: "fla_", TokenKind.JOIN: "flj_", TokenKind.AGENT: "flt_"}
LEASE_PREFIX = "fll_"


def generate(kind: TokenKind) -> str:
    """A new secret of ``kind``: prefix + 43 URL-safe characters (256 bits)."""
    return PREFIXES[kind] + secrets.token_urlsafe(32)


def new_lease_token() -> str:
    return LEASE_PREFIX + secrets.token_urlsafe(24)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def matches(secret: str | None, stored_digest: str | None) -> bool:
    """Constant-time check of ``secret`` against a stored digest."""
    if not secret or not stored_digest:
        return False
    return hmac.compare_digest(digest(secret), stored_digest)


def kind_of(secret: str) -> TokenKind | None:
    for kind, prefix in PREFIXES.items():
        if secret.startswith(prefix):
            return kind
    return None
