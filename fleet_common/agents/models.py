"""Agent rows and the commands queued for them."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column

from fleet_common.db import Base, JSONType, utcnow


class AgentMode(StrEnum):
    SSH_CLI = "ssh_cli"
    HTTP_PULL = "http_pull"


class AgentStatus(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class DesiredState(StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"
    DISABLED = "disabled"


class CommandKind(StrEnum):
    DRAIN = "drain"
    RESUME = "resume"
    RESTART = "restart"
    UPGRADE = "upgrade"
    CANCEL_TASK = "cancel_task"


class CommandStatus(StrEnum):
    PENDING = "pending"
    ACKNOWLEDGED = "acknowledged"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"


class Agent(Base):
    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    mode: Mapped[str] = mapped_column(String(16))
    agent_type: Mapped[str | None] = mapped_column(String(100))
    capabilities: Mapped[list[str]] = mapped_column(JSONType, default=list)
    max_concurrency: Mapped[int] = mapped_column(Integer, default=1)
    # A stable identity of the machine (or configured slot): the same host_uid re-registering
    # is the same agent.
    host_uid: Mapped[str] = mapped_column(String(200))
    host_id: Mapped[str | None] = mapped_column(String(200))
    hostname: Mapped[str | None] = mapped_column(String(255))
    platform: Mapped[str | None] = mapped_column(String(100))
    version: Mapped[str | None] = mapped_column(String(100))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=AgentStatus.ONLINE)
    desired_state: Mapped[str] = mapped_column(String(16), default=DesiredState.ACTIVE)
    last_heartbeat_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[dt.datetime | None]

    __table_args__ = (
        Index(
            "uq_agents_host_uid_live",
            "host_uid",
            unique=True,
            postgresql_where=text("deleted_at IS NULL"),
            sqlite_where=text("deleted_at IS NULL"),
        ),
        Index(
            "ix_agents_online_heartbeat",
            "last_heartbeat_at",
            postgresql_where=text("status = 'online' AND deleted_at IS NULL"),
            sqlite_where=text("status = 'online' AND deleted_at IS NULL"),
        ),
    )


class Command(Base):
    __tablename__ = "commands"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.id"))
    kind: Mapped[str] = mapped_column(String(20))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=CommandStatus.PENDING)
    success: Mapped[bool | None]
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_by: Mapped[str] = mapped_column(String(120))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]
    delivered_at: Mapped[dt.datetime | None]
    delivery_count: Mapped[int] = mapped_column(Integer, default=0)
    acknowledged_at: Mapped[dt.datetime | None]
    completed_at: Mapped[dt.datetime | None]

    __table_args__ = (
        Index(
            "ix_commands_pending",
            "agent_id",
            "created_at",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        Index("ix_commands_agent_created", "agent_id", "created_at"),
    )
