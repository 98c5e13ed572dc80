"""Fixtures for the write-back: a fake Forgejo with a repository and issue, a client for it,
and helpers that move a Forgejo task through its states with the real services."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from fleet_common.agents.models import Agent
from fleet_common.db import Database, utcnow
from fleet_common.forgejo.client import ForgejoClient
from fleet_common.settings import Settings
from fleet_common.tasks import service as tasks
from fleet_common.tasks import state
from fleet_common.tasks.models import Task, TaskStatus
from tests.fakes.forgejo import FakeForgejo


@pytest.fixture
def forgejo(fake: FakeForgejo) -> Iterator[ForgejoClient]:
    with ForgejoClient(fake.url, fake.token, timeout=5, retries=0) as api:
        yield api


@dataclass
class Story:
    """One Forgejo task in the database and its issue in the fake."""

    db: Database
    settings: Settings
    fake: FakeForgejo
    repo: str
    issue: int
    task_id: str = ""

    def create(self) -> str:
        with self.db.session() as session:
            data = {
                "title": "Add retries",
                "repo": self.repo,
                "issue_number": self.issue,
                "source": "forgejo",
                "requires_pr": True,
            }
            self.task_id = tasks.create_task(session, self.settings, data, actor="test").task.id
        return self.task_id

    def agent(self, name: str = "builder-1") -> str:
        with self.db.session() as session:
            agent = Agent(
                id=f"agt_{name}",
                name=name,
                mode="ssh_cli",
                host_uid=f"host:{name}",
                last_heartbeat_at=utcnow(),
            )
            session.add(agent)
        return agent.id

    def move(self, to: str, **changes: Any) -> None:
        with self.db.session() as session:
            task = tasks.get_task(session, self.task_id, for_update=True)
            state.transition(session, task, to, event=f"to_{to}", actor="test", changes=changes)

    def row(self) -> Task:
        with self.db.session() as session:
            return tasks.get_task(session, self.task_id)

    def labels(self) -> list[str]:
        return [n for n in self.fake.labels_of(self.repo, self.issue) if n.startswith("fleet/")]

    def comments(self) -> list[str]:
        return [c.body for c in self.fake.comments_of(self.repo, self.issue)]


@pytest.fixture
def story(db: Database, settings: Settings, fake: FakeForgejo) -> Story:
    repo = fake.add_repo("alice", "widgets")
    issue = fake.add_issue(repo, "Add retries", "Please.", labels=("fleet", "kind/bug"))
    return Story(db, settings, fake, repo, issue)


__all__ = ["Story", "TaskStatus"]
