"""The audit log of agent, command and token actions."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_common.auth.models import AuditEntry


def record(
    session: Session,
    actor: str,
    action: str,
    object_type: str,
    object_id: str,
    **data: Any,
) -> None:
    """Append one audit entry in the caller's transaction."""
    session.add(
        AuditEntry(
            actor=actor, action=action, object_type=object_type, object_id=object_id, data=data
        )
    )


def entries(session: Session, object_type: str, object_id: str) -> list[AuditEntry]:
    query = (
        select(AuditEntry)
        .where(AuditEntry.object_type == object_type, AuditEntry.object_id == object_id)
        .order_by(AuditEntry.id)
    )
    return list(session.scalars(query))
