"""Redact secrets from agent output before it is stored, also across chunk boundaries.

A :class:`Redactor` knows literal secrets, configured regular expressions and built-in token
patterns. :meth:`Redactor.stream` wraps an output sink: it holds back a short tail of each chunk
so a secret split across two chunks is still recognised once the rest arrives.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

REDACTED = b"[REDACTED]"

# A pattern may mark the part to hide with a group named ``secret``; otherwise the whole
# match is replaced. Patterns are matched against bytes, so ``\s`` and friends are ASCII-only.
BUILTIN_PATTERNS: tuple[str, ...] = (
    # Fleet's own tokens: admin, join, agent (prefix + 43 URL-safe chars) and lease tokens.
    r"fl[ajtl]_[A-Za-z0-9_-]{32,}",
    # GitHub personal access, OAuth, user-to-server, server-to-server and refresh tokens.
    r"gh[pousr]_[A-Za-z0-9]{30,}",
    r"github_pat_[A-Za-z0-9_]{30,}",
    # OpenAI / Anthropic style API keys (sk-..., sk-proj-..., sk-ant-...).
    r"sk-[A-Za-z0-9_-]{20,}",
    # HTTP authorization headers: keep the scheme, hide the credential.
    r"(?i:authorization:\s*(?:bearer|basic|token)\s+)(?P<secret>[^\s'\"]+)",
    # Credentials in URLs: https://user:password@host, https://token@host.
    r"(?i:\b[a-z][a-z0-9+.-]{0,15}://)(?P<secret>[^/\s@'\"]{1,1024})@",
)

DEFAULT_HOLD = 256
MAX_PENDING = 65_536


@dataclass(frozen=True)
class _Span:
    start: int  # extent of the whole match, to decide whether it may still grow
    end: int
    hide_start: int  # the part replaced by [REDACTED]
    hide_end: int


class Redactor:
    """Replaces secrets and token patterns with ``[REDACTED]`` in bytes and text."""

    def __init__(
        self,
        secrets: Iterable[str] = (),
        patterns: Iterable[str] = (),
        *,
        builtin: bool = True,
    ) -> None:
        literals = sorted({s for s in secrets if s}, key=len, reverse=True)
        sources = [re.escape(s) for s in literals] + list(patterns)
        if builtin:
            sources += BUILTIN_PATTERNS
        compiled = []
        for source in sources:
            try:
                compiled.append(re.compile(source.encode("utf-8")))
            except re.error as exc:
                raise ValueError(f"bad redaction pattern {source!r}: {exc}") from None
        self._patterns: tuple[re.Pattern[bytes], ...] = tuple(compiled)
        # A partial secret shorter than this stays in the tail buffer until it is complete.
        self.hold = max([DEFAULT_HOLD, *(len(s.encode("utf-8")) for s in literals)])

    def redact(self, data: bytes) -> bytes:
        """Redact a complete piece of output."""
        return self._replace(data, self._spans(data), len(data))

    def redact_text(self, text: str) -> str:
        """Redact a complete string (a receipt's summary, an error message)."""
        return self.redact(text.encode("utf-8", "surrogateescape")).decode(
            "utf-8", "surrogateescape"
        )

    def stream(self, sink: Callable[[bytes], None]) -> RedactingStream:
        """A chunk-by-chunk redactor that writes clean output to ``sink``."""
        return RedactingStream(self, sink)

    def _spans(self, data: bytes) -> list[_Span]:
        if not data:
            return []
        spans = []
        for pattern in self._patterns:
            for match in pattern.finditer(data):
                if match.end() == match.start():
                    continue
                if "secret" in pattern.groupindex and match.start("secret") >= 0:
                    hide = match.span("secret")
                else:
                    hide = match.span()
                spans.append(_Span(match.start(), match.end(), *hide))
        spans.sort(key=lambda s: (s.hide_start, -s.hide_end))
        return spans

    @staticmethod
    def _replace(data: bytes, spans: list[_Span], cut: int) -> bytes:
        """``data[:cut]`` with every hidden span before ``cut`` replaced."""
        out = []
        pos = 0
        for span in spans:
            if span.hide_start >= cut:
                break
            if span.hide_end <= pos:
                continue  # inside a span already replaced
            out.append(data[pos : max(pos, span.hide_start)])
            out.append(REDACTED)
            pos = span.hide_end
        out.append(data[pos:cut])
        return b"".join(out)


@functools.lru_cache(maxsize=64)
def redactor_for(secrets: tuple[str, ...], patterns: tuple[str, ...]) -> Redactor:
    """The Redactor of these secrets and patterns, made once (it holds nothing per use)."""
    return Redactor(secrets, patterns)


class RedactingStream:
    """Feeds chunks through a :class:`Redactor`, holding back a tail that may hold a secret.

    Call :meth:`feed` per chunk, :meth:`flush_idle` when output pauses (it releases the held
    tail up to its last whitespace, so a live log does not lag) and :meth:`close` at the end.
    """

    def __init__(self, redactor: Redactor, sink: Callable[[bytes], None]) -> None:
        self._redactor = redactor
        self._sink = sink
        self._pending = b""

    def __call__(self, chunk: bytes) -> None:
        self.feed(chunk)

    def feed(self, chunk: bytes) -> None:
        """Redact and emit what can no longer be part of an unfinished secret."""
        if not chunk:
            return
        data = self._pending + chunk
        self._emit(data, len(data) - self._redactor.hold)

    def flush_idle(self) -> None:
        """Output paused: emit the held tail up to and including its last whitespace."""
        data = self._pending
        last_space = max(data.rfind(c) for c in (b" ", b"\n", b"\t", b"\r"))
        self._emit(data, last_space + 1)

    def close(self) -> None:
        """The stream ended: redact and emit everything still held."""
        data, self._pending = self._pending, b""
        if data:
            self._sink(self._redactor.redact(data))

    def _emit(self, data: bytes, cut: int) -> None:
        cut = max(cut, 0)
        forced = len(data) > MAX_PENDING
        spans = self._redactor._spans(data)
        # Move the cut back before any match it would split, and before any match that reaches
        # the end of the buffer (``sk-abc`` may go on with the next chunk). Only ever moving
        # back makes this converge.
        moved = True
        while moved:
            moved = False
            for span in spans:
                splits = span.start < cut < span.end
                may_grow = span.start < cut and span.end >= len(data) and not forced
                if splits or may_grow:
                    cut = span.start
                    moved = True
        if forced and cut == 0:
            cut = len(data)  # one enormous match: give up holding rather than grow forever
        out = Redactor._replace(data, spans, cut)
        self._pending = data[cut:]
        if out:
            self._sink(out)
