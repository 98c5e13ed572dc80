"""Queue thousands of rows in a few round trips.

The services create one task (or command) per call with a flush each, which is right for an
API request but means thousands of round trips here; on a busy 2-core machine those dominate a
test. These helpers build the same rows the services build (a task and its ``created`` event,
through ``state.record_creation``) and flush them together; ``replay.verify`` in the tests
checks that the rows and their events agree.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from fleet_common.agents.models import Command, CommandKind, CommandStatus
from fleet_common.db import Database, utcnow
from fleet_common.dispatch.routing import req_key, requirements_from_labels
from fleet_common.ids import new_id
from fleet_common.settings import OrchestratorSettings
from fleet_common.tasks import state
from fleet_common.tasks.models import Task, TaskStatus


@dataclass(frozen=True)
class TaskSpec:
    title: str
    labels: Sequence[str] = ()
    priority: int = 0
    assigned_agent_id: str | None = None


def queue_tasks(
    db: Database, settings: OrchestratorSettings, specs: Sequence[TaskSpec]
) -> list[str]:
    """Queue one task per spec, as ``tasks.service.create_task`` would; returns their ids."""
    now = utcnow()
    ids = []
    with db.session() as session:
        for n, spec in enumerate(specs):
            requirements = requirements_from_labels(spec.labels)
            created = now + dt.timedelta(microseconds=n)  # a distinct, ordered creation time
            task = Task(
                id=new_id("tsk"),
                title=spec.title,
                prompt="",
                labels=list(spec.labels),
                requirements=requirements,
                req_key=req_key(requirements),
                priority=spec.priority,
                requires_pr=False,
                source="api",
                max_retries=settings.default_max_retries,
                timeout_secs=settings.task_timeout_secs,
                assigned_agent_id=spec.assigned_agent_id,
                status=TaskStatus.QUEUED,
                attempt=1,
                retry_base=0,
                artifacts=[],
                created_at=created,
                updated_at=created,
            )
            session.add(task)
            state.record_creation(session, task, "test")
            ids.append(task.id)
    return ids


def enqueue_commands(
    db: Database, settings: OrchestratorSettings, agent_id: str, count: int
) -> list[str]:
    """``count`` pending commands for one agent (restart and upgrade, alternately)."""
    now = utcnow()
    ids = []
    with db.session() as session:
        for n in range(count):
            kind, payload = (
                (CommandKind.UPGRADE, {"version": f"1.{n}"}) if n % 2 else (CommandKind.RESTART, {})
            )
            command = Command(
                id=new_id("cmd"),
                agent_id=agent_id,
                kind=kind,
                payload=payload,
                status=CommandStatus.PENDING,
                created_by="test",
                created_at=now + dt.timedelta(microseconds=n),
                expires_at=now + dt.timedelta(seconds=settings.command_ttl_secs),
                delivery_count=0,
            )
            session.add(command)
            ids.append(command.id)
    return ids
