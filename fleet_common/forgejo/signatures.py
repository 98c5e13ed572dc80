"""Webhook signatures: Forgejo signs the exact body bytes with HMAC-SHA256 of the hook's secret.

Forgejo sends the same MAC three times: bare hex in ``X-Forgejo-Signature`` and
``X-Gitea-Signature``, and ``sha256=<hex>`` in ``X-Hub-Signature-256``. Verify over the raw
request body; re-serialising the JSON would change the bytes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Protocol, TypeVar
from urllib.parse import parse_qs

# Read in this order; the first non-empty one is checked.
SIGNATURE_HEADERS = ("X-Forgejo-Signature", "X-Gitea-Signature", "X-Hub-Signature-256")
_HUB_PREFIX = "sha256="
_FORM_TYPE = "application/x-www-form-urlencoded"
#: hashlib lets the GIL go while it hashes 2 KiB or more in one update (a delivery is a few
#: KiB). For a hash of microseconds that only costs: in a threaded API worker the request
#: thread then waits to get the GIL back behind whatever thread took it. Smaller updates keep it.
_GIL_SLICE = 2047

_Hash = TypeVar("_Hash", "hashlib._Hash", hmac.HMAC)


def fed(hasher: _Hash, data: bytes) -> _Hash:
    """``hasher`` updated with ``data``, in slices small enough that it keeps the GIL."""
    view = memoryview(data)
    for start in range(0, len(view), _GIL_SLICE):
        hasher.update(view[start : start + _GIL_SLICE])
    return hasher


class Headers(Protocol):
    """What is read from request headers: a ``dict`` or werkzeug's ``Headers`` both fit."""

    def get(self, key: str, /) -> str | None: ...

    def items(self) -> Iterable[tuple[str, str]]: ...


def header(headers: Headers, name: str) -> str:
    """Case-insensitive header lookup that works on plain dicts and on werkzeug ``Headers``."""
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value or ""


def compute(body: bytes, secret: str) -> str:
    """Lowercase hex HMAC-SHA256 of ``body`` keyed with the UTF-8 bytes of ``secret``."""
    return fed(hmac.new(secret.encode(), digestmod=hashlib.sha256), body).hexdigest()


def sign(body: bytes, secret: str) -> dict[str, str]:
    """The signature headers Forgejo would send for ``body`` (for tests and benchmarks)."""
    sha256 = compute(body, secret)
    sha1 = hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()
    return {
        "X-Forgejo-Signature": sha256,
        "X-Gitea-Signature": sha256,
        "X-Gogs-Signature": sha256,
        "X-Hub-Signature": f"sha1={sha1}",
        "X-Hub-Signature-256": f"{_HUB_PREFIX}{sha256}",
    }


def signed_bytes(body: bytes, headers: Headers) -> bytes:
    """The bytes Forgejo signed: the body itself, or the ``payload`` field of a form hook."""
    content_type = header(headers, "Content-Type").split(";", 1)[0].strip().lower()
    if content_type != _FORM_TYPE:
        return body
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return fields.get("payload", [""])[0].encode()


def presented_signature(headers: Headers) -> str:
    """The hex signature the sender presented, or ``""`` when there is none."""
    for name in SIGNATURE_HEADERS:
        value = header(headers, name).strip()
        if name == "X-Hub-Signature-256":
            value = value[len(_HUB_PREFIX) :] if value.lower().startswith(_HUB_PREFIX) else ""
        if value:
            return value
    return ""


def verify(body: bytes, headers: Headers, secret: str) -> bool:
    """True when the delivery carries a valid signature for ``secret``.

    An empty secret refuses everything: an unsigned endpoint would accept anyone's events.
    """
    if not secret:
        return False
    presented = presented_signature(headers)
    if not presented:
        return False
    expected = compute(signed_bytes(body, headers), secret)
    return hmac.compare_digest(expected.encode(), presented.lower().encode("utf-8", "replace"))
