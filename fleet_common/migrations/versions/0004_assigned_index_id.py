"""``ix_tasks_assigned`` ends with ``id``, like ``ix_tasks_claim``: the claim's assigned branch
reads it in claim order (priority, created_at, id) without a sort.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

WHERE = "status = 'queued' AND assigned_agent_id IS NOT NULL"


def _create(columns: list[str | sa.TextClause]) -> None:
    op.create_index(
        "ix_tasks_assigned",
        "tasks",
        columns,
        postgresql_where=sa.text(WHERE),
        sqlite_where=sa.text(WHERE),
    )


def upgrade() -> None:
    op.drop_index("ix_tasks_assigned", table_name="tasks")
    _create(["assigned_agent_id", sa.text("priority DESC"), "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_tasks_assigned", table_name="tasks")
    _create(["assigned_agent_id", sa.text("priority DESC"), "created_at"])
