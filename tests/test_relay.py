"""The relay's wake-ups (``sweeps.due_for_publish``): as many per route as the workers' agents
that could claim the tasks have free places, every task looked at marked, on SQLite and
PostgreSQL."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from fleet_common.agents import service as agents
from fleet_common.agents.models import Agent, DesiredState
from fleet_common.auth import service as auth
from fleet_common.auth.models import TokenKind
from fleet_common.db import Database, utcnow
from fleet_common.dispatch.claim import claim_next
from fleet_common.settings import Settings
from fleet_common.sweeps import Publish, due_for_publish
from fleet_common.tasks import service as tasks
from fleet_common.tasks.models import Task
from tests.api_helpers import worker_agent


def lost_wake_up(session: Any, settings: Settings, **data: Any) -> str:
    """A queued task whose wake-up after creation never arrived (the relay's to send)."""
    task = tasks.create_task(session, settings, {"title": "t", **data}, actor="test").task
    task.last_published_at = None
    return task.id


def relay(db: Database, settings: Settings, now: dt.datetime | None = None) -> list[Publish]:
    with db.session() as session:
        return due_for_publish(session, settings.orchestrator, now or utcnow())


def published_at(db: Database, task_ids: list[str]) -> list[dt.datetime | None]:
    with db.session() as session:
        return [session.get(Task, task_id).last_published_at for task_id in task_ids]  # type: ignore[union-attr]


def test_a_backlog_wakes_as_many_as_there_are_free_places(db: Database, settings: Settings) -> None:
    with db.session() as session:
        worker_agent(session, ["relay"], max_concurrency=2)
        worker_agent(session, ["relay", "other"], max_concurrency=1)
        worker_agent(session, ["other"], max_concurrency=5)  # cannot serve "relay"
        backlog = [lost_wake_up(session, settings, labels=["agent:relay"]) for _ in range(6)]

    sent = relay(db, settings)
    # Three free places: the three oldest tasks (the relay's order), not six wake-ups.
    assert [p.task_id for p in sent] == backlog[:3]
    assert {(p.req_key, p.assigned_agent_id) for p in sent} == {("relay", None)}
    # Every task looked at is marked: the next ones get their turn, none is looked at again
    # before relay_after_secs.
    assert all(at is not None for at in published_at(db, backlog))
    assert relay(db, settings) == []
    later = utcnow() + dt.timedelta(seconds=settings.orchestrator.relay_after_secs + 1)
    assert len(relay(db, settings, later)) == 3


def test_no_wake_up_while_every_place_is_held(db: Database, settings: Settings) -> None:
    with db.session() as session:
        agent_id = worker_agent(session, ["busy"], max_concurrency=1)
        running = lost_wake_up(session, settings, labels=["agent:busy"])
        claim = claim_next(session, settings.orchestrator, agent_id)
        assert claim is not None and claim.task.id == running
        waiting = lost_wake_up(session, settings, labels=["agent:busy"])

    assert relay(db, settings) == []
    assert published_at(db, [waiting]) != [None]


def test_a_task_only_pull_agents_serve_gets_no_wake_up(db: Database, settings: Settings) -> None:
    """Pull agents poll the database: a Celery wake-up would wait in a queue nobody reads."""
    with db.session() as session:
        _, join = auth.mint(session, TokenKind.JOIN, actor="test", ttl_secs=3600)
        agents.register(
            session,
            {"join_token": join, "name": "puller", "host_uid": uuid.uuid4().hex,
             "capabilities": ["pulled"]},
        )  # fmt: skip
        task_id = lost_wake_up(session, settings, labels=["agent:pulled"])

    assert relay(db, settings) == []
    assert published_at(db, [task_id]) != [None]


def test_an_assigned_task_counts_its_own_agents_places(db: Database, settings: Settings) -> None:
    with db.session() as session:
        free = worker_agent(session, [], max_concurrency=1)
        draining = worker_agent(session, [], max_concurrency=1)
        session.get(Agent, draining).desired_state = DesiredState.DRAINING  # type: ignore[union-attr]
        to_free = lost_wake_up(session, settings, assigned_agent_id=free)
        lost_wake_up(session, settings, assigned_agent_id=draining)

    assert relay(db, settings) == [Publish(to_free, "_", free)]


def test_a_task_without_requirements_counts_every_workers_places(
    db: Database, settings: Settings
) -> None:
    with db.session() as session:
        worker_agent(session, ["a"], max_concurrency=1)
        worker_agent(session, ["b"], max_concurrency=1)
        backlog = [lost_wake_up(session, settings) for _ in range(3)]

    assert [p.task_id for p in relay(db, settings)] == backlog[:2]
