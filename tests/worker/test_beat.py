"""End to end: real ``fleet beat`` processes (two at once) sweep a real database and publish
wake-ups to a real broker, on PostgreSQL + Redis and on SQLite + the filesystem broker."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

from sqlalchemy import select

from fleet_common.agents.models import Agent, AgentStatus
from fleet_common.db import utcnow
from fleet_common.dispatch.claim import claim_next
from fleet_common.dispatch.routing import agent_queue, queue_for_key
from fleet_common.tasks import service as tasks
from fleet_common.tasks.models import Task, TaskEvent, TaskStatus
from fleet_worker.publisher import DISPATCH_TASK, wake_queue
from tests.api_helpers import pull_agent, worker_agent
from tests.worker.conftest import Stack

SWEEP_WAIT = 30  # seconds; a sweep runs every second, the bound only guards against a hang


def register_agent(session: Any, capability: str, *, heartbeat_at: dt.datetime) -> str:
    return pull_agent(session, [capability], name=f"agent-{capability}", now=heartbeat_at)


def new_task(session: Any, stack: Stack, **data: Any) -> str:
    created = tasks.create_task(session, stack.settings, {"title": "work", **data}, actor="test")
    return created.task.id


def task_state(stack: Stack, task_id: str) -> tuple[Task, list[TaskEvent]]:
    with stack.db.session() as session:
        task = session.get(Task, task_id)
        assert task is not None
        events = list(
            session.scalars(
                select(TaskEvent).where(TaskEvent.task_id == task_id).order_by(TaskEvent.seq)
            )
        )
        return task, events


def requeued(stack: Stack, task_id: str) -> Any:
    task, events = task_state(stack, task_id)
    return (task, events) if task.status == TaskStatus.QUEUED and task.attempt == 2 else None


def test_a_silent_agent_goes_offline_and_its_task_is_requeued(stack: Stack) -> None:
    capability = f"lost-{uuid.uuid4().hex[:8]}"
    orch = stack.settings.orchestrator
    with stack.db.session() as session:
        # Last heard from a minute ago: past the 2 s threshold from the first sweep on.
        agent_id = register_agent(session, capability, heartbeat_at=utcnow() - dt.timedelta(60))
        task_id = new_task(session, stack, labels=[f"agent:{capability}"])
        # A long lease, so only the agent's silence can end this attempt.
        claim = claim_next(session, dataclasses.replace(orch, lease_secs=600), agent_id)
        assert claim is not None and claim.task.id == task_id

    task, events = stack.wait_for(
        lambda: requeued(stack, task_id), timeout=SWEEP_WAIT, what="the task to be requeued"
    )
    assert task.failure_reason == "agent_lost"
    assert task.agent_id is None and task.lease_digest is None
    failed = [e for e in events if e.type == "attempt_failed"]
    # Two sweepers ran, and the attempt failed exactly once.
    assert len(failed) == 1
    assert failed[0].data["reason"] == "agent_lost" and failed[0].data["attempt"] == 1
    assert (failed[0].from_status, failed[0].to_status) == ("dispatched", "queued")
    with stack.db.session() as session:
        agent = session.get(Agent, agent_id)
        assert agent is not None and agent.status == AgentStatus.OFFLINE


def test_an_expired_lease_fails_the_attempt(stack: Stack) -> None:
    capability = f"lease-{uuid.uuid4().hex[:8]}"
    with stack.db.session() as session:
        # Heard from "in an hour": this agent stays online for the whole test.
        agent_id = register_agent(session, capability, heartbeat_at=utcnow() + dt.timedelta(1 / 24))
        task_id = new_task(session, stack, labels=[f"agent:{capability}"])
        claim = claim_next(session, stack.settings.orchestrator, agent_id)  # a 2 s lease
        assert claim is not None and claim.task.id == task_id

    task, events = stack.wait_for(
        lambda: requeued(stack, task_id), timeout=SWEEP_WAIT, what="the lease to expire"
    )
    assert task.failure_reason == "lease_expired"
    failed = [e for e in events if e.type == "attempt_failed"]
    assert [e.data["reason"] for e in failed] == ["lease_expired"]
    with stack.db.session() as session:
        agent = session.get(Agent, agent_id)
        assert agent is not None and agent.status == AgentStatus.ONLINE


def receive(stack: Stack, queue_name: str) -> Any:
    """Take one message from ``queue_name`` on the stack's broker, or wait for one."""
    with stack.app.connection_for_read() as connection:
        bound = wake_queue(queue_name)(connection.default_channel)
        return stack.wait_for(
            lambda: bound.get(no_ack=True),
            timeout=SWEEP_WAIT,
            what=f"a wake-up on {queue_name}",
        )


def test_the_relay_publishes_wake_ups_for_queued_tasks(stack: Stack) -> None:
    capability = f"relay-{uuid.uuid4().hex[:8]}"
    with stack.db.session() as session:
        agent_id = worker_agent(session, [capability], max_concurrency=2)
        by_capability = new_task(session, stack, labels=[f"agent:{capability}"])
        assigned = new_task(session, stack, assigned_agent_id=agent_id)

    for task_id, queue_name in (
        (by_capability, queue_for_key(capability)),
        (assigned, agent_queue(agent_id)),
    ):
        message = receive(stack, queue_name)
        assert message.headers["task"] == DISPATCH_TASK
        args, kwargs, _embed = message.decode()
        assert (args, kwargs) == ([task_id], {})
        assert message.delivery_info["routing_key"] == queue_name
        task, _ = task_state(stack, task_id)
        assert task.status == TaskStatus.QUEUED and task.last_published_at is not None
