"""Webhook signatures, checked against every constructed payload (secret ``test-secret``)."""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.parse

import pytest

from fleet_common.forgejo.signatures import compute, fed, sign, verify
from tests.fakes.forgejo import WEBHOOK_SECRET, load_payload, payload_names

SIGNATURE_HEADERS = ("X-Forgejo-Signature", "X-Gitea-Signature", "X-Hub-Signature-256")


@pytest.mark.parametrize("name", payload_names())
def test_every_payload_verifies_with_its_own_headers(name: str) -> None:
    headers, body = load_payload(name)
    assert verify(body, headers, WEBHOOK_SECRET)


@pytest.mark.parametrize("name", payload_names())
def test_sign_reproduces_forgejos_headers(name: str) -> None:
    headers, body = load_payload(name)
    for key, value in sign(body, WEBHOOK_SECRET).items():
        assert headers[key] == value


@pytest.mark.parametrize("kept", SIGNATURE_HEADERS)
def test_each_signature_header_alone_is_enough(kept: str) -> None:
    headers, body = load_payload("issues.label_updated")
    only = {k: v for k, v in headers.items() if k not in SIGNATURE_HEADERS or k == kept}
    assert verify(body, only, WEBHOOK_SECRET)


def test_header_names_are_case_insensitive() -> None:
    headers, body = load_payload("issues.opened")
    lowered = {k.lower(): v.upper() for k, v in headers.items() if k in SIGNATURE_HEADERS}
    assert verify(body, lowered, WEBHOOK_SECRET)


def test_wrong_secret_is_refused() -> None:
    headers, body = load_payload("issues.opened")
    assert not verify(body, headers, "other-secret")


def test_tampered_body_is_refused() -> None:
    headers, body = load_payload("issues.opened")
    assert not verify(body.replace(b'"opened"', b'"closed"'), headers, WEBHOOK_SECRET)


def test_reserialised_body_is_refused() -> None:
    # Forgejo escapes < > & as \u003c…; re-encoding the JSON changes the bytes.
    headers, body = load_payload("issues.opened")
    assert b"\\u0026" in body
    assert not verify(json.dumps(json.loads(body), indent=2).encode(), headers, WEBHOOK_SECRET)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Forgejo-Signature": ""},
        {"X-Hub-Signature-256": "sha256="},  # what Forgejo sends for a hook without secret
        {"X-Hub-Signature-256": "not-prefixed"},
        {"X-Hub-Signature": "sha1=0000"},  # SHA-1 is never accepted
        {"X-Forgejo-Signature": "zz" * 32},
        {"X-Forgejo-Signature": "é" * 64},
    ],
)
def test_missing_or_malformed_signature_is_refused(headers: dict[str, str]) -> None:
    _, body = load_payload("issues.opened")
    assert not verify(body, headers, WEBHOOK_SECRET)


def test_empty_secret_refuses_everything() -> None:
    body = b"{}"
    assert not verify(body, sign(body, ""), "")


def test_first_present_header_decides() -> None:
    headers, body = load_payload("issues.opened")
    wrong = {**headers, "X-Forgejo-Signature": "0" * 64}
    assert not verify(body, wrong, WEBHOOK_SECRET)


def test_form_hook_is_verified_over_the_payload_field() -> None:
    headers, body = load_payload("push")
    form = urllib.parse.urlencode({"payload": body.decode()}).encode()
    form_headers = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
    assert verify(form, form_headers, WEBHOOK_SECRET)
    assert not verify(form, headers, WEBHOOK_SECRET)


@pytest.mark.parametrize("size", [0, 1, 2046, 2047, 2048, 4094, 4095, 6000, 65536])
def test_hashes_fed_in_slices_equal_the_whole(size: int) -> None:
    # fed() hashes in slices below hashlib's GIL-release threshold: same digests, any size.
    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert compute(body, "s3cret") == hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert fed(hashlib.sha256(), body).hexdigest() == hashlib.sha256(body).hexdigest()
