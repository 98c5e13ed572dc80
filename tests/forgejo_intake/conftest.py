"""Fixtures for the Forgejo intake: a fake Forgejo, settings pointing at it, the API app with a
recording publisher, and a ``Forge`` helper that sends signed deliveries and drives agents."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from fleet_common.db import Database
from fleet_common.forgejo.models import WebhookDelivery
from fleet_common.settings import Settings, load_settings
from fleet_common.sweeps import Publish
from fleet_common.tasks.models import Task, TaskEvent
from tests.api_helpers import Api, worker_agent
from tests.fakes.forgejo import WEBHOOK_SECRET, FakeForgejo

HOOK = "/api/v1/webhooks/forgejo"
REPO = "alice/widgets"


class Recorder:
    """A publisher that remembers the wake-ups it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[Publish] = []

    def publish(self, items: list[Publish]) -> None:
        self.sent.extend(items)

    def check(self) -> str:
        return "ok"


def forgejo_settings(
    tmp_path: Path, database_url: str, fake: FakeForgejo, **forgejo: Any
) -> Settings:
    env = {
        "FLEET_DATABASE_URL": database_url,
        "FLEET_ORCHESTRATOR_STATE_DIR": str(tmp_path / "state"),
        "FLEET_FORGEJO_URL": fake.url,
        "FLEET_FORGEJO_TOKEN": fake.token,
        "FLEET_FORGEJO_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "FLEET_FORGEJO_BOT_LOGIN": fake.bot_login,
        "FLEET_FORGEJO_REPOS": REPO,
    }
    env.update({f"FLEET_FORGEJO_{k.upper()}": str(v) for k, v in forgejo.items()})
    return load_settings(env=env)


@pytest.fixture
def fake(fake: FakeForgejo) -> FakeForgejo:
    """The fake Forgejo (tests/conftest.py) with the repository the deliveries come from."""
    fake.add_repo("alice", "widgets")
    return fake


@pytest.fixture
def settings(tmp_path: Path, database_url: str, fake: FakeForgejo) -> Settings:
    return forgejo_settings(tmp_path, database_url, fake)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def app(settings: Settings, db: Database, recorder: Recorder) -> Any:
    from fleet_api.app import create_app

    application = create_app(settings, db=db, publisher=recorder)
    application.testing = True
    return application


@dataclass
class Forge:
    """Signed deliveries from the fake Forgejo into the app, and what they left behind."""

    fake: FakeForgejo
    client: Any
    api: Api
    db: Database
    recorder: Recorder
    changed: list[list[str]] = field(default_factory=list)
    repo: str = REPO

    def post(self, headers: dict[str, str], body: bytes) -> Any:
        return self.client.post(HOOK, data=body, headers=headers)

    def send(
        self, event: str, action: str, number: int, sender: str = "alice", **kw: Any
    ) -> dict[str, Any]:
        """Deliver ``event``/``action`` about ``number`` as it is now in the fake; 202 expected."""
        headers, body = self.fake.delivery(
            event, action, repo=self.repo, number=number, sender=sender, **kw
        )
        response = self.post(headers, body)
        assert response.status_code == 202, response.get_data(as_text=True)
        return dict(response.get_json())

    def open_issue(
        self,
        title: str = "Fix the uploader",
        body: str = "It drops bytes.",
        labels: tuple[str, ...] = ("fleet",),
    ) -> tuple[int, dict[str, Any]]:
        """An issue opened in the fake and its ``opened`` delivery; returns (number, reply)."""
        number = self.fake.add_issue(self.repo, title, body, labels=labels)
        return number, self.send("issues", "opened", number)

    def open_pr(
        self, head: str, title: str, body: str = "", sender: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        """A PR opened in the fake (by the bot unless ``sender``) and its delivery."""
        number = self.fake.open_pr(self.repo, head, title, body, user=sender)
        return number, self.send(
            "pull_request", "opened", number, sender=sender or self.fake.bot_login
        )

    def task(self, task_id: str) -> Task:
        with self.db.session() as session:
            task = session.get(Task, task_id)
            assert task is not None
            session.expunge(task)
            return task

    def worker(self, capabilities: list[str]) -> str:
        """A worker's agent (``ssh_cli``) with ``capabilities``: tasks it could claim are woken."""
        with self.db.session() as session:
            return worker_agent(session, capabilities)

    def tasks(self) -> list[Task]:
        with self.db.session() as session:
            rows = list(session.scalars(select(Task).order_by(Task.created_at, Task.id)))
            session.expunge_all()
            return rows

    def events(self, task_id: str) -> list[TaskEvent]:
        with self.db.session() as session:
            rows = list(
                session.scalars(
                    select(TaskEvent).where(TaskEvent.task_id == task_id).order_by(TaskEvent.seq)
                )
            )
            session.expunge_all()
            return rows

    def event_types(self, task_id: str) -> list[str]:
        return [e.type for e in self.events(task_id)]

    def deliveries(self) -> int:
        with self.db.session() as session:
            return int(session.scalar(select(func.count()).select_from(WebhookDelivery)) or 0)

    def agent(self, name: str = "a1", capabilities: list[str] | None = None) -> str:
        """A registered pull agent's token."""
        return str(self.api.register(name, capabilities or [])["agent_token"])

    def dequeue(self, agent_token: str) -> tuple[str, str]:
        """(task id, lease token) of what ``agent_token`` dequeues (it must get something)."""
        response = self.api.post("/tasks/dequeue", json={"wait_secs": 0}, token=agent_token)
        assert response.status_code == 200, response.get_data(as_text=True)
        body = response.get_json()
        return body["task"]["id"], body["lease"]["token"]

    def complete(
        self, task_id: str, lease: str, agent_token: str, **receipt: Any
    ) -> dict[str, Any]:
        response = self.api.post(
            f"/tasks/{task_id}/complete",
            json={"lease_token": lease, "receipt": {"exit_code": 0, **receipt}},
            token=agent_token,
        )
        assert response.status_code == 200, response.get_data(as_text=True)
        return dict(response.get_json())


@pytest.fixture
def forge(fake: FakeForgejo, app: Any, admin_token: str, db: Database, recorder: Recorder) -> Forge:
    client = app.test_client()
    helper = Forge(fake, client, Api(client, admin_token), db, recorder)
    app.extensions["fleet"].on_forgejo_change = helper.changed.append
    return helper
