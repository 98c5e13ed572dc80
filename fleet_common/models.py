"""Every model, imported so ``Base.metadata`` is complete (Alembic and tests use this)."""

from fleet_common.agents.models import Agent, Command
from fleet_common.auth.models import AuditEntry, Token
from fleet_common.db import Base
from fleet_common.forgejo.models import IntakeHealth, WebhookDelivery
from fleet_common.tasks.models import Task, TaskEvent, TaskLogChunk

__all__ = [
    "Agent",
    "AuditEntry",
    "Base",
    "Command",
    "IntakeHealth",
    "Task",
    "TaskEvent",
    "TaskLogChunk",
    "Token",
    "WebhookDelivery",
]
