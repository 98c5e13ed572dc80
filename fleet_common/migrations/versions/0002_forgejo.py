"""Forgejo: webhook deliveries, intake health, pull requests and write-back on tasks.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import fleet_common.db

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ACTIVE_ISSUE = (
    "issue_number IS NOT NULL AND status IN ('queued', 'dispatched', 'running', 'in_review')"
)
OUTBOX = "issue_number IS NOT NULL AND forgejo_synced_seq < event_seq"
UTC = fleet_common.db.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "webhook_deliveries",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("delivery_id", sa.String(length=100), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("event", sa.String(length=60), nullable=False),
        sa.Column("action", sa.String(length=60), nullable=False),
        sa.Column("repo", sa.String(length=300), nullable=False),
        sa.Column("number", sa.Integer(), nullable=True),
        sa.Column("outcome", sa.String(length=200), nullable=False),
        sa.Column("task_id", sa.String(length=40), nullable=True),
        sa.Column("received_at", UTC, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint("delivery_id", name=op.f("uq_webhook_deliveries_delivery_id")),
        sa.UniqueConstraint("digest", name=op.f("uq_webhook_deliveries_digest")),
    )
    op.create_index("ix_webhook_deliveries_received", "webhook_deliveries", ["received_at"])
    op.create_table(
        "intake_health",
        sa.Column("repo", sa.String(length=300), nullable=False),
        sa.Column("last_webhook_at", UTC, nullable=True),
        sa.Column("last_reconcile_at", UTC, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_error_at", UTC, nullable=True),
        sa.PrimaryKeyConstraint("repo", name=op.f("pk_intake_health")),
    )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pr_number", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("pr_url", sa.String(length=1000), nullable=True))
        batch_op.add_column(sa.Column("pr_head_sha", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("forgejo_comment_id", sa.BigInteger(), nullable=True))
        batch_op.add_column(
            sa.Column("forgejo_synced_seq", sa.Integer(), nullable=False, server_default="0")
        )
    op.create_index(
        "uq_tasks_active_issue",
        "tasks",
        ["repo", "issue_number"],
        unique=True,
        postgresql_where=sa.text(ACTIVE_ISSUE),
        sqlite_where=sa.text(ACTIVE_ISSUE),
    )
    op.create_index("ix_tasks_repo_pr", "tasks", ["repo", "pr_number"])
    op.create_index(
        "ix_tasks_forgejo_outbox",
        "tasks",
        ["updated_at"],
        postgresql_where=sa.text(OUTBOX),
        sqlite_where=sa.text(OUTBOX),
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_forgejo_outbox", table_name="tasks")
    op.drop_index("ix_tasks_repo_pr", table_name="tasks")
    op.drop_index("uq_tasks_active_issue", table_name="tasks")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        for column in (
            "forgejo_synced_seq",
            "forgejo_comment_id",
            "pr_head_sha",
            "pr_url",
            "pr_number",
        ):
            batch_op.drop_column(column)
    op.drop_table("intake_health")
    op.drop_index("ix_webhook_deliveries_received", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
