"""Redaction of secrets and token patterns, including secrets split across chunks."""

from __future__ import annotations

import pytest

from fleet_worker.redaction import Redactor

FLEET_TOKEN = "flt_" + "Qx7-_b" * 7 + "Z"  # 43 URL-safe characters, like a real one
GITHUB = "ghp_" + "A1b2C3d4E5" * 4
API_KEY = "sk-proj-" + "x9Y8z7W6v5" * 3


def stream_through(redactor: Redactor, chunks: list[bytes], idle_after: int = -1) -> bytes:
    out: list[bytes] = []
    stream = redactor.stream(out.append)
    for i, chunk in enumerate(chunks):
        stream.feed(chunk)
        if i == idle_after:
            stream.flush_idle()
    stream.close()
    return b"".join(out)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"token={FLEET_TOKEN}!", "token=[REDACTED]!"),
        (f"use {GITHUB} now", "use [REDACTED] now"),
        (f"OPENAI_API_KEY={API_KEY}", "OPENAI_API_KEY=[REDACTED]"),
        ("Authorization: Bearer abc.def.ghi", "Authorization: Bearer [REDACTED]"),
        ("authorization: token 1234abcd", "authorization: token [REDACTED]"),
        (
            "git clone https://oauth2:s3cr3t@git.example.com/a/b",
            "git clone https://[REDACTED]@git.example.com/a/b",
        ),
        ("nothing to see", "nothing to see"),
    ],
)
def test_builtin_patterns(text: str, expected: str) -> None:
    assert Redactor().redact_text(text) == expected


def test_configured_secrets_and_patterns() -> None:
    redactor = Redactor(secrets=["hunter2", ""], patterns=[r"pass(word)?=\S+"])
    assert (
        redactor.redact_text("pw hunter2 and password=xyz done")
        == "pw [REDACTED] and [REDACTED] done"
    )


def test_a_bad_pattern_is_named() -> None:
    with pytest.raises(ValueError, match=r"bad redaction pattern '\(unclosed'"):
        Redactor(patterns=["(unclosed"])


@pytest.mark.parametrize("secret", ["hunter2-is-my-password", FLEET_TOKEN, GITHUB, API_KEY])
def test_a_secret_split_at_any_point_across_chunks_is_redacted(secret: str) -> None:
    redactor = Redactor(secrets=["hunter2-is-my-password"])
    text = f"line one\nthe value is {secret} and more\n".encode()
    start = text.index(secret.encode())
    for cut in range(start, start + len(secret) + 1):
        out = stream_through(redactor, [text[:cut], text[cut:]])
        assert out == text.replace(secret.encode(), b"[REDACTED]"), cut


def test_a_secret_split_into_many_small_chunks_is_redacted() -> None:
    text = f"x={FLEET_TOKEN}.".encode()
    chunks = [text[i : i + 3] for i in range(0, len(text), 3)]
    assert stream_through(Redactor(), chunks) == b"x=[REDACTED]."


def test_output_is_not_held_back_longer_than_needed() -> None:
    out: list[bytes] = []
    stream = Redactor().stream(out.append)
    stream.feed(b"a" * 1000)
    assert len(b"".join(out)) >= 1000 - stream._redactor.hold
    stream.feed(b"\nprogress: 50% sk-abc")
    stream.flush_idle()  # the pause releases everything up to the last whitespace
    assert b"".join(out).endswith(b"progress: 50% ")
    stream.feed(b"defghijklmnopqrstuvwxyz0123 done")
    stream.close()
    assert b"".join(out).endswith(b"50% [REDACTED] done")


def test_a_long_unbroken_match_does_not_grow_the_buffer_forever() -> None:
    out: list[bytes] = []
    stream = Redactor().stream(out.append)
    stream.feed(b"sk-" + b"a" * 200_000)
    assert b"".join(out) == b"[REDACTED]"
    stream.close()
