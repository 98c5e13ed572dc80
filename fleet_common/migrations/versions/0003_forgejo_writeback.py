"""Forgejo write-back: the per-task sync lease (``forgejo_sync_until``).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import fleet_common.db

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UTC = fleet_common.db.UTCDateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("forgejo_sync_until", UTC, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("forgejo_sync_until")
