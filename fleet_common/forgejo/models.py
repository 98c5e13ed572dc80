"""What Fleet stores about Forgejo: received deliveries (for deduplication) and intake health."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from fleet_common.db import Base, utcnow

#: The outcome stored for a label event that leaves an issue without a task unqualified: the
#: marker :func:`fleet_common.forgejo.issues.labelled_again` looks for (and the retention sweep
#: keeps).
UNQUALIFIED = "unqualified"


class WebhookDelivery(Base):
    """One accepted delivery. ``delivery_id`` dedupes redeliveries; ``digest`` (SHA-256 of the
    body) dedupes a manual replay, which carries a new id."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    delivery_id: Mapped[str] = mapped_column(String(100), unique=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    event: Mapped[str] = mapped_column(String(60))
    action: Mapped[str] = mapped_column(String(60), default="")
    repo: Mapped[str] = mapped_column(String(300), default="")
    number: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(200), default="")
    task_id: Mapped[str | None] = mapped_column(String(40))
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        Index("ix_webhook_deliveries_received", "received_at"),
        # The unqualified deliveries the retention sweep keeps, by issue: what
        # ``issues.labelled_again`` looks up on a label event.
        Index(
            "ix_webhook_deliveries_unqualified",
            "repo",
            "number",
            "received_at",
            postgresql_where=text(f"outcome = '{UNQUALIFIED}'"),
            sqlite_where=text(f"outcome = '{UNQUALIFIED}'"),
        ),
    )


class IntakeHealth(Base):
    """Per repository: when a webhook last arrived, when reconcile last ran, the last error."""

    __tablename__ = "intake_health"

    repo: Mapped[str] = mapped_column(String(300), primary_key=True)
    last_webhook_at: Mapped[dt.datetime | None]
    last_reconcile_at: Mapped[dt.datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[dt.datetime | None]
