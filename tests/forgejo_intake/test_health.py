"""``GET /api/v1/intake/health``: per repository, last webhook, last reconcile, last error."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select, text

from fleet_common.db import Database, utcnow
from fleet_common.forgejo import health, intake
from fleet_common.forgejo.client import ForgejoClient
from fleet_common.forgejo.events import parse_delivery
from fleet_common.forgejo.models import IntakeHealth
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


def test_last_webhook_is_written_at_most_once_per_resolution(
    forge: Forge, settings: Settings
) -> None:
    """Deliveries for one repository do not all update its health row (a row lock each, held to
    commit, would serialise them): the stored time is kept to within WEBHOOK_RESOLUTION."""
    start = utcnow()

    def deliver(at: dt.datetime) -> dt.datetime | None:
        number = forge.fake.add_issue(forge.repo, "Health", labels=("fleet",))
        headers, body = forge.fake.delivery("issues", "opened", repo=forge.repo, number=number)
        with forge.db.session() as session:
            assert intake.receive(session, settings, parse_delivery(headers, body), now=at)
        with forge.db.session() as session:
            return session.get(IntakeHealth, forge.repo).last_webhook_at  # type: ignore[union-attr]

    assert deliver(start) == start  # the first one creates the row
    half = health.WEBHOOK_RESOLUTION / 2
    assert deliver(start + half) == start  # within the resolution: not written
    later = start + 2 * health.WEBHOOK_RESOLUTION
    assert deliver(later) == later
    assert deliver(start + half) == later  # never moves back


def test_a_stale_last_webhook_held_by_another_transaction_is_not_waited_for(
    pg_url: str,
) -> None:
    """PostgreSQL: a delivery that finds the stored time stale while another transaction holds
    the row (a concurrent delivery writing it) skips the write instead of queueing behind it."""
    db = Database(pg_url)
    start = utcnow()
    later = start + 2 * health.WEBHOOK_RESOLUTION
    try:
        with db.session() as session:
            health.webhook_seen(session, "alice/widgets", start, None)  # creates the row
        with db.session() as holder:
            holder.execute(
                select(IntakeHealth).where(IntakeHealth.repo == "alice/widgets").with_for_update()
            )
            with db.session() as session:
                session.execute(text("SET LOCAL lock_timeout = '5s'"))
                health.webhook_seen(session, "alice/widgets", later, start)  # no wait, no write
        with db.session() as session:
            assert session.get(IntakeHealth, "alice/widgets").last_webhook_at == start  # type: ignore[union-attr]
            health.webhook_seen(session, "alice/widgets", later, start)  # free again: written
        with db.session() as session:
            assert session.get(IntakeHealth, "alice/widgets").last_webhook_at == later  # type: ignore[union-attr]
    finally:
        db.dispose()
