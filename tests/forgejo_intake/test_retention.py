"""Webhook deliveries are kept ``forgejo.delivery_retention_days`` for deduplication, then the
``fleet.sweep.deliveries`` sweep deletes them, a bounded batch per run."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from sqlalchemy import event, func, select, text

from fleet_common.db import Database, utcnow
from fleet_common.forgejo.models import UNQUALIFIED, WebhookDelivery
from fleet_common.settings import Settings
from fleet_common.sweeps import expired_deliveries
from tests.fakes.forgejo import load_payload
from tests.forgejo_intake.conftest import Forge

DAY = dt.timedelta(days=1)


def store(db: Database, ages_in_days: list[float], now: dt.datetime) -> None:
    with db.session() as session:
        for n, age in enumerate(ages_in_days):
            session.add(
                WebhookDelivery(
                    delivery_id=f"d{n}",
                    digest=f"{n:064x}",
                    event="issues",
                    received_at=now - age * DAY,
                )
            )


def kept(db: Database) -> list[str]:
    with db.session() as session:
        query = select(WebhookDelivery.delivery_id).order_by(WebhookDelivery.delivery_id)
        return list(session.scalars(query))


def sweep(db: Database, settings: Settings, now: dt.datetime) -> int:
    with db.session() as session:
        return expired_deliveries(session, settings, now)


def test_expired_deliveries_are_deleted_in_bounded_batches(
    db: Database, settings: Settings
) -> None:
    assert settings.forgejo.delivery_retention_days == 14  # the default
    settings = dataclasses.replace(
        settings, orchestrator=dataclasses.replace(settings.orchestrator, sweep_batch_size=2)
    )
    now = utcnow()
    store(db, [30, 15, 14.01, 13.99, 1, 0], now)
    assert sweep(db, settings, now) == 2  # one batch: the two oldest
    assert kept(db) == ["d2", "d3", "d4", "d5"]
    assert sweep(db, settings, now) == 1
    assert kept(db) == ["d3", "d4", "d5"]
    assert sweep(db, settings, now) == 0  # idempotent: nothing left to do
    assert kept(db) == ["d3", "d4", "d5"]
    later = dataclasses.replace(
        settings, forgejo=dataclasses.replace(settings.forgejo, delivery_retention_days=1)
    )
    assert sweep(db, later, now) == 1
    assert kept(db) == ["d4", "d5"]


def test_a_redelivery_is_a_duplicate_until_its_first_copy_expires(
    forge: Forge, db: Database, settings: Settings
) -> None:
    headers, body = load_payload("issues.opened")
    assert forge.post(headers, body).get_json()["outcome"] != "duplicate"
    assert forge.post(headers, body).get_json()["outcome"] == "duplicate"
    assert sweep(db, settings, utcnow()) == 0
    with db.session() as session:
        session.execute(
            text("UPDATE webhook_deliveries SET received_at = :at"), {"at": utcnow() - 15 * DAY}
        )
    assert sweep(db, settings, utcnow()) == 1
    assert forge.post(headers, body).get_json()["outcome"] != "duplicate"
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 1


def test_the_sweep_reads_the_received_at_index(db: Database, settings: Settings) -> None:
    """The batch is found through ``received_at``'s index, not by scanning the table: the
    plan of the sweep's own query, captured as it runs."""
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, parameters))

    store(db, [30], utcnow())
    event.listen(db.engine, "before_cursor_execute", capture)
    try:
        assert sweep(db, settings, utcnow()) == 1
    finally:
        event.remove(db.engine, "before_cursor_execute", capture)
    [(statement, parameters)] = statements
    postgres = db.engine.dialect.name == "postgresql"
    with db.engine.connect() as connection:
        cursor = connection.connection.cursor()
        if postgres:  # an empty table is cheapest to scan: ask whether the index can serve
            cursor.execute("SET enable_seqscan = off")
        cursor.execute(("EXPLAIN " if postgres else "EXPLAIN QUERY PLAN ") + statement, parameters)
        plan = " ".join(str(row) for row in cursor.fetchall())
        connection.rollback()
    assert "ix_webhook_deliveries_received" in plan, plan


def test_a_label_removal_is_remembered_past_the_retention(db: Database, settings: Settings) -> None:
    """The delivery that left an issue unqualified is what makes adding the label back start a
    new task (``issues.labelled_again``): the sweep keeps it whatever its age."""
    now = utcnow()
    store(db, [30, 30], now)
    with db.session() as session:
        session.execute(
            text("UPDATE webhook_deliveries SET outcome = :o WHERE delivery_id = 'd1'"),
            {"o": UNQUALIFIED},
        )
    assert sweep(db, settings, now) == 1
    assert kept(db) == ["d1"]
    assert sweep(db, settings, now) == 0
