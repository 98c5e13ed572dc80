"""The receipt an agent leaves in ``$FLEET_RECEIPT_PATH``: parsing and validation.

Rules (SPEC, "Execution"): exit 0 without a receipt file is a minimal receipt
``{"exit_code": 0}``; a file that is not valid JSON, not an object, too large or has a field
of the wrong type fails the attempt with ``receipt_invalid: <what is wrong>``. Fields this
version does not know are dropped, so the server only ever sees the documented shape; ``null``
counts as absent.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_RECEIPT_BYTES = 65_536
MAX_LOG_TAIL_CHARS = 16_384

_SHA = re.compile(r"[0-9a-fA-F]{7,64}")


class ReceiptInvalid(ValueError):
    """The receipt file is unusable; ``str(exc)`` says what is wrong."""


@dataclass(frozen=True)
class ReceiptOutcome:
    """A parsed receipt, or why there is none (``error`` starts with ``receipt_invalid:``)."""

    receipt: dict[str, Any] | None
    error: str | None = None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ReceiptInvalid(f"{name} must be a string, got {type(value).__name__}")
    return value


def _count(name: str, value: Any) -> int:
    if not _is_int(value) or value < 0:
        raise ReceiptInvalid(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _pair(name: str, value: Any, keys: tuple[str, str]) -> dict[str, int]:
    if not isinstance(value, dict):
        raise ReceiptInvalid(f"{name} must be an object with {keys[0]} and {keys[1]}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise ReceiptInvalid(f"{name}.{missing[0]} is missing")
    return {k: _count(f"{name}.{k}", value[k]) for k in keys}


def _sha(name: str, value: Any) -> str:
    text = _text(name, value)
    if not _SHA.fullmatch(text):
        raise ReceiptInvalid(f"{name} must be a hexadecimal commit id, got {text[:80]!r}")
    return text.lower()


def _pr_number(name: str, value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise ReceiptInvalid(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _cost(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ReceiptInvalid(f"{name} must be a number, got {value!r}")
    if value < 0:
        raise ReceiptInvalid(f"{name} must not be negative, got {value!r}")
    return float(value)


def _log_tail(name: str, value: Any) -> str:
    return _text(name, value)[-MAX_LOG_TAIL_CHARS:]


_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "summary": _text,
    "branch": _text,
    "commit_sha": _sha,
    "pr_url": _text,
    "pr_number": _pr_number,
    "tests": lambda name, value: _pair(name, value, ("passed", "failed")),
    "tokens": lambda name, value: _pair(name, value, ("input", "output")),
    "cost_usd": _cost,
    "agent_version": _text,
    "log_tail": _log_tail,
}


def validate_receipt(raw: Any, exit_code: int) -> dict[str, Any]:
    """Check a decoded receipt and return its normalised copy; raises :class:`ReceiptInvalid`.

    A missing ``exit_code`` is filled in from the process; a present one must be an integer.
    """
    if not isinstance(raw, dict):
        raise ReceiptInvalid(f"receipt must be a JSON object, got {type(raw).__name__}")
    receipt: dict[str, Any] = {}
    code = raw.get("exit_code")
    if code is None:
        code = exit_code
    elif not _is_int(code):
        raise ReceiptInvalid(f"exit_code must be an integer, got {code!r}")
    receipt["exit_code"] = code
    for name, check in _FIELDS.items():
        value = raw.get(name)
        if value is not None:
            receipt[name] = check(name, value)
    return receipt


def parse_receipt(data: bytes | None, exit_code: int) -> ReceiptOutcome:
    """Apply the receipt rules to the file's bytes (``None``: no file) and the exit code."""
    if data is None:
        if exit_code == 0:
            return ReceiptOutcome({"exit_code": 0})
        return ReceiptOutcome(None)
    try:
        if len(data) > MAX_RECEIPT_BYTES:
            raise ReceiptInvalid(f"receipt is larger than {MAX_RECEIPT_BYTES} bytes")
        try:
            raw = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise ReceiptInvalid("receipt is not UTF-8") from None
        except json.JSONDecodeError as exc:
            raise ReceiptInvalid(f"not valid JSON: {exc}") from None
        return ReceiptOutcome(validate_receipt(raw, exit_code))
    except ReceiptInvalid as exc:
        return ReceiptOutcome(None, f"receipt_invalid: {exc}")
