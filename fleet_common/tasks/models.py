"""Task rows (a projection of the event log), their events and their log chunks."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from fleet_common.db import Base, JSONType, utcnow

BigIntId = BigInteger().with_variant(Integer(), "sqlite")


class TaskStatus(StrEnum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    IN_REVIEW = "in_review"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (TaskStatus.DISPATCHED, TaskStatus.RUNNING)
TERMINAL = (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)


ACTIVE_ISSUE = (
    "issue_number IS NOT NULL AND status IN ('queued', 'dispatched', 'running', 'in_review')"
)
# Forgejo tasks whose latest state Forgejo does not show yet.
OUTBOX = "issue_number IS NOT NULL AND forgejo_synced_seq < event_seq"


class Task(Base):
    __tablename__ = "tasks"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    title: Mapped[str] = mapped_column(String(500))
    prompt: Mapped[str] = mapped_column(Text, default="")
    labels: Mapped[list[str]] = mapped_column(JSONType, default=list)
    requirements: Mapped[list[str]] = mapped_column(JSONType, default=list)
    # The routing key: sorted requirements joined with "+", "_" for none (the queue suffix).
    req_key: Mapped[str] = mapped_column(String(400))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    repo: Mapped[str | None] = mapped_column(String(300))
    clone_url: Mapped[str | None] = mapped_column(String(1000))
    issue_number: Mapped[int | None] = mapped_column(Integer)
    requires_pr: Mapped[bool] = mapped_column(default=False)
    source: Mapped[str] = mapped_column(String(20), default="api")
    max_retries: Mapped[int] = mapped_column(Integer)
    timeout_secs: Mapped[int] = mapped_column(Integer)
    assigned_agent_id: Mapped[str | None] = mapped_column(ForeignKey("agents.id"))
    status: Mapped[str] = mapped_column(String(16), default=TaskStatus.QUEUED)
    # The current (or next) attempt, from 1; ``retry_base`` is where an admin retry restarted
    # the budget, so retries left = max_retries - (attempt - 1 - retry_base).
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    retry_base: Mapped[int] = mapped_column(Integer, default=0)
    # The agent holding the current lease, its token's digest and expiry.
    agent_id: Mapped[str | None] = mapped_column(ForeignKey("agents.id"))
    lease_digest: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[dt.datetime | None]
    # When the current attempt times out (set at dispatch from timeout_secs).
    deadline_at: Mapped[dt.datetime | None]
    not_before: Mapped[dt.datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    failure_reason: Mapped[str | None] = mapped_column(String(40))
    last_error: Mapped[str | None] = mapped_column(Text)
    receipt: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    artifacts: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    # Forgejo: the pull request attached to the task, and the write-back's progress (the status
    # comment it edits in place, and the last event seq Forgejo was brought up to).
    pr_number: Mapped[int | None] = mapped_column(Integer)
    pr_url: Mapped[str | None] = mapped_column(String(1000))
    pr_head_sha: Mapped[str | None] = mapped_column(String(64))
    forgejo_comment_id: Mapped[int | None] = mapped_column(BigInteger)
    forgejo_synced_seq: Mapped[int] = mapped_column(Integer, default=0)
    # A running write-back holds the task until this time (so two never write at once); once
    # it ends, when it ended. The outbox sweep re-sends only when this is old enough.
    forgejo_sync_until: Mapped[dt.datetime | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    request_digest: Mapped[str | None] = mapped_column(String(64))
    event_seq: Mapped[int] = mapped_column(Integer, default=0)
    log_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    dispatched_at: Mapped[dt.datetime | None]
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    last_published_at: Mapped[dt.datetime | None]

    __table_args__ = (
        # The claim walks one of these per requirement key, already in claim order.
        Index(
            "ix_tasks_claim",
            "req_key",
            text("priority DESC"),
            "created_at",
            "id",
            postgresql_where=text("status = 'queued' AND assigned_agent_id IS NULL"),
            sqlite_where=text("status = 'queued' AND assigned_agent_id IS NULL"),
        ),
        Index(
            "ix_tasks_assigned",
            "assigned_agent_id",
            text("priority DESC"),
            "created_at",
            "id",
            postgresql_where=text("status = 'queued' AND assigned_agent_id IS NOT NULL"),
            sqlite_where=text("status = 'queued' AND assigned_agent_id IS NOT NULL"),
        ),
        Index(
            "ix_tasks_active_agent",
            "agent_id",
            postgresql_where=text("status IN ('dispatched', 'running')"),
            sqlite_where=text("status IN ('dispatched', 'running')"),
        ),
        Index(
            "ix_tasks_active_lease",
            "lease_expires_at",
            postgresql_where=text("status IN ('dispatched', 'running')"),
            sqlite_where=text("status IN ('dispatched', 'running')"),
        ),
        Index(
            "ix_tasks_active_deadline",
            "deadline_at",
            postgresql_where=text("status IN ('dispatched', 'running')"),
            sqlite_where=text("status IN ('dispatched', 'running')"),
        ),
        Index(
            "ix_tasks_queued_publish",
            "last_published_at",
            postgresql_where=text("status = 'queued'"),
            sqlite_where=text("status = 'queued'"),
        ),
        Index("ix_tasks_status_created", "status", "created_at"),
        Index("ix_tasks_repo_issue", "repo", "issue_number"),
        # At most one active task per repository issue, whatever the races between deliveries.
        Index(
            "uq_tasks_active_issue",
            "repo",
            "issue_number",
            unique=True,
            postgresql_where=text(ACTIVE_ISSUE),
            sqlite_where=text(ACTIVE_ISSUE),
        ),
        Index("ix_tasks_repo_pr", "repo", "pr_number"),
        Index(
            "ix_tasks_forgejo_outbox",
            "updated_at",
            postgresql_where=text(OUTBOX),
            sqlite_where=text(OUTBOX),
        ),
        Index("ix_tasks_finished", "finished_at"),
    )


class TaskEvent(Base):
    """One state change of one task; ``seq`` counts from 1 per task."""

    __tablename__ = "task_events"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(40))
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str | None] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(120))
    data: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("task_id", "seq", name="uq_task_events_task_seq"),)


class TaskLogChunk(Base):
    """A piece of a task's output; ``offset`` is its first byte in the task's whole log."""

    __tablename__ = "task_log_chunks"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(Integer)
    offset: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("task_id", "attempt", "seq", name="uq_task_log_chunks_seq"),
        Index("ix_task_log_chunks_task_offset", "task_id", "offset"),
    )
