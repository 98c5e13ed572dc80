"""The receiver's contract: signatures over the raw body, the reply, deduplication, no Forgejo
calls while Forgejo waits for the answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fleet_common.db import Database
from fleet_common.forgejo.signatures import sign
from tests.api_helpers import assert_error, snapshot
from tests.fakes.forgejo import load_payload, payload_names
from tests.forgejo_intake.conftest import HOOK, Forge, forgejo_settings

SIGNATURES = (
    "X-Forgejo-Signature",
    "X-Gitea-Signature",
    "X-Gogs-Signature",
    "X-Hub-Signature",
    "X-Hub-Signature-256",
)


def test_every_constructed_payload_is_accepted_with_its_own_headers(forge: Forge) -> None:
    names = payload_names()
    assert len(names) >= 14
    for count, name in enumerate(names, start=1):
        headers, body = load_payload(name)
        response = forge.post(headers, body)
        assert response.status_code == 202, (name, response.get_data(as_text=True))
        reply = response.get_json()
        assert isinstance(reply["outcome"], str) and reply["outcome"], name
        assert forge.deliveries() == count, name
    # Nothing in the story qualifies under the default trigger label: no task, no Forgejo call.
    assert forge.tasks() == []
    assert forge.fake.calls == []


def test_each_signature_header_alone_is_enough(forge: Forge) -> None:
    headers, body = load_payload("issues.opened")
    for spaces, keep in enumerate(
        ("X-Forgejo-Signature", "X-Gitea-Signature", "X-Hub-Signature-256")
    ):
        alone = {k: v for k, v in headers.items() if k not in SIGNATURES or k == keep}
        alone["X-Forgejo-Delivery"] = f"id-{keep}"
        # A distinct body each time (valid JSON: whitespace after a value), so no digest repeats.
        changed = body.replace(b'"opened"', b'"opened"' + b" " * spaces, 1)
        alone[keep] = sign(changed, "test-secret")[keep]
        response = forge.post(alone, changed)
        assert response.status_code == 202, (keep, response.get_data(as_text=True))
    assert forge.deliveries() == 3


def test_bad_or_missing_signature_is_401_and_stores_nothing(forge: Forge, db: Database) -> None:
    headers, body = load_payload("issues.label_updated")
    before = snapshot(db)
    wrong = {**headers, **sign(body, "not-the-secret")}
    missing = {k: v for k, v in headers.items() if k not in SIGNATURES}
    empty = {**missing, "X-Forgejo-Signature": "", "X-Hub-Signature-256": "sha256="}
    for case_headers, case_body in (
        (wrong, body),
        (missing, body),
        (empty, body),
        (headers, body + b" "),  # one byte more than was signed
        (headers, body.replace(b"widgets", b"gadgets")),
    ):
        assert_error(forge.post(case_headers, case_body), 401)
    assert snapshot(db) == before
    assert forge.fake.calls == []


def test_no_webhook_secret_refuses_everything(tmp_path: Path, database_url: str, fake: Any) -> None:
    from fleet_api.app import create_app

    settings = forgejo_settings(tmp_path, database_url, fake, webhook_secret="")
    database = Database(settings.database_url)
    try:
        client = create_app(settings, db=database, publisher=False).test_client()
        headers, body = load_payload("issues.opened")
        before = snapshot(database)
        assert_error(client.post(HOOK, data=body, headers=headers), 401)
        assert snapshot(database) == before
    finally:
        database.dispose()


def test_a_signed_body_that_is_not_json_is_400(forge: Forge, db: Database) -> None:
    headers, _ = load_payload("issues.opened")
    before = snapshot(db)
    for body in (b"not json", b"[1, 2]", b"\xff\xfe"):
        assert_error(forge.post({**headers, **sign(body, "test-secret")}, body), 400)
    assert snapshot(db) == before


def test_redelivery_and_replay_with_a_new_id_are_duplicates(forge: Forge) -> None:
    headers, body = load_payload("issues.opened")
    assert forge.post(headers, body).get_json()["outcome"] != "duplicate"
    # Forgejo's "Replay" button: a new delivery id, the same bytes.
    replay = {k: v for k, v in headers.items()}
    for key in ("X-Forgejo-Delivery", "X-Gitea-Delivery", "X-Gogs-Delivery", "X-GitHub-Delivery"):
        replay[key] = "4d9b5f0e-0000-4000-8000-000000000001"
    for again in (headers, replay):
        response = forge.post(again, body)
        assert response.status_code == 202
        assert response.get_json()["outcome"] == "duplicate"
    assert forge.deliveries() == 1


def test_replayed_qualifying_delivery_creates_nothing_new(forge: Forge) -> None:
    forge.worker([])
    number = forge.fake.add_issue(forge.repo, "Fix it", labels=("fleet",))
    headers, body = forge.fake.delivery(
        "issues", "opened", repo=forge.repo, number=number, sender="alice"
    )
    assert forge.post(headers, body).get_json()["outcome"] == "created"
    replay = {**headers, "X-Forgejo-Delivery": "replayed-id", "X-Gitea-Delivery": "replayed-id"}
    assert forge.post(replay, body).get_json()["outcome"] == "duplicate"
    assert len(forge.tasks()) == 1
    assert len(forge.recorder.sent) == 1


def test_unknown_events_are_accepted_and_ignored(forge: Forge) -> None:
    body = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 3}).encode()
    headers = {
        "Content-Type": "application/json",
        "X-Forgejo-Event": "ping",
        "X-Forgejo-Delivery": "p-1",
        **sign(body, "test-secret"),
    }
    response = forge.post(headers, body)
    assert response.status_code == 202
    assert response.get_json()["outcome"] == "ignored"
    headers, body = load_payload("push")
    assert forge.post(headers, body).get_json()["outcome"] == "ignored"
    assert forge.deliveries() == 2


def test_form_hooks_are_verified_over_the_json_payload(forge: Forge) -> None:
    headers, body = load_payload("issues.opened")
    form = urlencode({"payload": body.decode()}).encode()
    form_headers = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
    response = forge.post(form_headers, form)
    assert response.status_code == 202, response.get_data(as_text=True)
    assert forge.deliveries() == 1


def test_the_webhook_needs_no_bearer_token_and_is_documented(forge: Forge) -> None:
    spec = forge.client.get("/openapi.json").get_json()
    operation = spec["paths"]["/api/v1/webhooks/forgejo"]["post"]
    assert operation["security"] == []
    assert "202" in operation["responses"]
    assert "/api/v1/intake/health" in spec["paths"]
