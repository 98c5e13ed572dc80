"""``GET /api/v1/intake/health``: per repository, last webhook, last reconcile, last error."""

from __future__ import annotations

from fleet_common.db import utcnow
from fleet_common.forgejo.client import ForgejoClient
from fleet_common.forgejo.reconcile import reconcile
from fleet_common.settings import Settings
from tests.api_helpers import assert_error
from tests.forgejo_intake.conftest import Forge


def test_intake_health_shows_webhooks_reconciles_and_errors(
    forge: Forge, settings: Settings
) -> None:
    # Configured, nothing seen yet: listed all the same.
    assert forge.api.get("/intake/health").get_json() == [
        {
            "repo": "alice/widgets",
            "configured": True,
            "last_webhook_at": None,
            "last_reconcile_at": None,
            "last_error": None,
            "last_error_at": None,
        }
    ]
    before = utcnow().isoformat()
    forge.open_issue()
    forge.fake.add_repo("bob", "gadgets")  # not configured: webhooks work for any repository
    number = forge.fake.add_issue("bob/gadgets", "Elsewhere", labels=("fleet",))
    forge.repo = "bob/gadgets"
    forge.send("issues", "opened", number)
    rows = {r["repo"]: r for r in forge.api.get("/intake/health").get_json()}
    assert list(rows) == ["alice/widgets", "bob/gadgets"]  # configured first
    assert rows["alice/widgets"]["last_webhook_at"] >= before
    assert rows["bob/gadgets"]["configured"] is False

    with (
        ForgejoClient(forge.fake.url, forge.fake.token, timeout=5, retries=0) as client,
        forge.db.session() as session,
    ):
        reconcile(session, settings, client, "alice/widgets", utcnow())
    forge.fake.fail_mode = "503"
    with (
        ForgejoClient(forge.fake.url, forge.fake.token, timeout=5, retries=0) as client,
        forge.db.session() as session,
    ):
        reconcile(session, settings, client, "alice/widgets", utcnow())
    row = {r["repo"]: r for r in forge.api.get("/intake/health").get_json()}["alice/widgets"]
    assert row["last_reconcile_at"] >= before
    assert row["last_error_at"] >= row["last_reconcile_at"]
    assert "503" in row["last_error"]


def test_intake_health_is_for_admins(forge: Forge) -> None:
    assert_error(forge.api.get("/intake/health", token=""), 401)
    agent = forge.agent()
    assert_error(forge.api.get("/intake/health", token=agent), 403)
