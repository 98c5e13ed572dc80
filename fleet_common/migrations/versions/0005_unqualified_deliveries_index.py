"""A partial index on the ``unqualified`` webhook deliveries by issue: a label event on an
issue whose last task ended looks one up (``issues.labelled_again``), and the retention
sweep keeps these rows for ever, so the lookup must not scan the delivery history.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

WHERE = "outcome = 'unqualified'"


def upgrade() -> None:
    op.create_index(
        "ix_webhook_deliveries_unqualified",
        "webhook_deliveries",
        ["repo", "number", "received_at"],
        postgresql_where=sa.text(WHERE),
        sqlite_where=sa.text(WHERE),
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_unqualified", table_name="webhook_deliveries")
