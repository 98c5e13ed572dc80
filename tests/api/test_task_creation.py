"""``POST /tasks`` runs on a lean unit of work (no ORM Session on PostgreSQL) with the capability
check inside the insert's statement: the same reply, rows and ``created`` event as
``service.create_task`` on a full Session (the path of every other caller), on both backends."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from sqlalchemy import select

from fleet_api.app import create_app
from fleet_api.resources.common import Extended
from fleet_api.resources.tasks import CreatedTaskSchema
from fleet_common.db import Database
from fleet_common.settings import Settings
from fleet_common.sweeps import Publish
from fleet_common.tasks import service
from fleet_common.tasks.models import Task, TaskEvent
from tests.api_helpers import Api, worker_agent

# Differ between any two tasks: the id and the times.
_OWN = {"id", "created_at", "updated_at", "last_published_at", "task_id", "at"}


def _row(obj: Any) -> dict[str, Any]:
    return {c.key: getattr(obj, c.key) for c in obj.__table__.columns if c.key not in _OWN}


def _stored(db: Database, task_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with db.session() as session:
        task = session.get(Task, task_id)
        events = session.scalars(select(TaskEvent).where(TaskEvent.task_id == task_id)).all()
        return _row(task), [{**_row(e), "id": None} for e in events]


def _without_own(reply: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in reply.items() if k not in _OWN}


BODIES: list[dict[str, Any]] = [
    {"title": "plain"},
    {"title": "served", "labels": ["agent:code:python", "x"], "max_retries": 0},
    {"title": "unserved", "labels": ["agent:gpu"], "priority": 7, "prompt": "p"},
    {
        "title": "everything",
        "prompt": "do it",
        "labels": ["agent:code:python", "agent:tests", "agent:code:python", "meta"],
        "priority": -3,
        "repo": "org/repo",
        "clone_url": "https://example.invalid/org/repo.git",
        "requires_pr": True,
        "max_retries": 5,
        "timeout_secs": 60,
    },
]


@pytest.mark.parametrize("assign", [False, True], ids=["unassigned", "assigned"])
@pytest.mark.parametrize("body", BODIES, ids=[b["title"] for b in BODIES])
def test_post_equals_create_task_on_a_full_session(
    client: Any,
    admin_token: str,
    db: Database,
    settings: Settings,
    body: dict[str, Any],
    assign: bool,
) -> None:
    api = Api(client, admin_token)
    agent = api.register("a1", ["code:python", "tests"])["agent"]["id"]
    api.register("a2", ["code:go"])
    data = {**body, "assigned_agent_id": agent} if assign else body

    reply = api.post("/tasks", json=data)
    assert reply.status_code == 201, reply.get_json()
    posted = reply.get_json()

    with db.session() as session:
        actor = session.scalars(select(TaskEvent.actor)).one()  # the POST's
        created = service.create_task(session, settings, data, actor=actor)
        expected = CreatedTaskSchema().dump(Extended(created.task, warnings=created.warnings))
    assert _without_own(posted) == _without_own(expected)
    assert _stored(db, posted["id"]) == _stored(db, created.task.id)


@contextmanager
def _counted() -> Iterator[list[str]]:
    """What psycopg sends: statements (their first word) and BEGIN/COMMIT (a BEGIN goes out
    inside the first statement's ``execute``, so it is listed after it)."""
    sent: list[str] = []
    execute, command = psycopg.Cursor.execute, psycopg.Connection._exec_command

    def counting_execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(str(query).split(None, 1)[0].upper())
        return execute(self, query, *args, **kwargs)

    def counting_command(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(bytes(query).decode().split(None, 1)[0].upper())
        return command(self, query, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(psycopg.Cursor, "execute", counting_execute)
        patch.setattr(psycopg.Connection, "_exec_command", counting_command)
        yield sent


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_post_is_two_round_trips_without_a_session_or_a_transaction(
    client: Any, admin_token: str, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = Api(client, admin_token)
    api.register("a1", ["gpu"])
    made: list[Any] = []

    def counting(factory: Any) -> Any:
        def make(*args: Any, **kwargs: Any) -> Any:
            made.append(kwargs)
            return factory(*args, **kwargs)

        return make

    # Both factories: the transaction's and the one for statements atomic on their own.
    monkeypatch.setattr(db, "sessions", counting(db.sessions))
    monkeypatch.setattr(db, "_autocommit", counting(db._autocommit))
    for labels in ([], ["agent:gpu"], ["agent:tpu"]):
        api.post("/tasks", json={"title": "warm", "labels": labels})  # statements prepared
        with _counted() as sent:
            reply = api.post("/tasks", json={"title": "t", "labels": labels})
        assert reply.status_code == 201
        assert bool(reply.get_json()["warnings"]) == (labels == ["agent:tpu"])
        # Authentication, then the task with its event and the capability check: each
        # statement atomic on its own, no BEGIN or COMMIT.
        assert sent == ["SELECT", "WITH"], sent
    assert made == []

    # A key needs the ORM (its lookup): the lean unit of work makes its Session then.
    with _counted() as sent:
        keyed = api.post("/tasks", json={"title": "k"}, headers={"Idempotency-Key": "k1"})
    assert keyed.status_code == 201 and len(made) == 1
    assert sent == ["SELECT", "SELECT", "WITH"], sent
    again = api.post("/tasks", json={"title": "k"}, headers={"Idempotency-Key": "k1"})
    assert again.status_code == 200 and again.get_json()["id"] == keyed.get_json()["id"]


class _Recorder:
    """The app's publisher: records the wake-ups it is given."""

    def __init__(self) -> None:
        self.published: list[Publish] = []

    def publish(self, items: list[Publish]) -> None:
        self.published.extend(items)


@pytest.fixture
def woken(settings: Settings, db: Database) -> Iterator[tuple[Any, _Recorder]]:
    recorder = _Recorder()
    app = create_app(settings, db=db, publisher=recorder)
    yield app.test_client(), recorder


def test_a_wake_up_goes_out_only_where_a_workers_agent_could_claim_the_task(
    woken: tuple[Any, _Recorder], admin_token: str, db: Database
) -> None:
    client, recorder = woken
    api = Api(client, admin_token)
    puller = api.register("puller", ["pulled", "both"])["agent"]["id"]
    with db.session() as session:
        worker = worker_agent(session, ["worked", "both"])

    def wakes(body: dict[str, Any]) -> tuple[list[str], list[Publish]]:
        recorder.published.clear()
        reply = api.post("/tasks", json=body)
        assert reply.status_code == 201, reply.get_json()
        return reply.get_json()["warnings"], list(recorder.published)

    # Pull agents poll the database: a wake-up would wait in a queue no worker reads.
    assert wakes({"title": "t", "labels": ["agent:pulled"]}) == ([], [])
    assert wakes({"title": "t", "assigned_agent_id": puller}) == ([], [])
    warnings, sent = wakes({"title": "t", "labels": ["agent:nobody"]})
    assert warnings and warnings[0].startswith("no_capable_agent") and sent == []
    # A worker's agent could claim it: woken, on the route a claim would take.
    for body, route in (
        ({"title": "t", "labels": ["agent:worked"]}, ("worked", None)),
        ({"title": "t", "labels": ["agent:both"]}, ("both", None)),
        ({"title": "t"}, ("_", None)),
        ({"title": "t", "assigned_agent_id": worker}, ("_", worker)),
    ):
        warnings, sent = wakes(body)
        assert warnings == [] and [(p.req_key, p.assigned_agent_id) for p in sent] == [route]


def test_a_changed_task_is_woken_only_where_a_workers_agent_could_claim_it(
    woken: tuple[Any, _Recorder], admin_token: str, db: Database
) -> None:
    client, recorder = woken
    api = Api(client, admin_token)
    puller = api.register("puller", ["pulled"])["agent"]["id"]
    with db.session() as session:
        worker = worker_agent(session, ["worked"])
    task = api.post("/tasks", json={"title": "t", "assigned_agent_id": puller}).get_json()
    assert recorder.published == []
    assert api.patch(f"/tasks/{task['id']}", json={"priority": 3}).status_code == 200
    assert recorder.published == []  # still the puller's: it polls
    moved = api.patch(f"/tasks/{task['id']}", json={"assigned_agent_id": worker})
    assert moved.status_code == 200
    assert [(p.task_id, p.assigned_agent_id) for p in recorder.published] == [(task["id"], worker)]
