"""The write-back's Celery and API plumbing: the sync task's queue and retry policy, the outbox
sweep on beat, and the API queueing one sync per changed Forgejo task after commit."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import Retry
from sqlalchemy import update

from fleet_common.db import Database, utcnow
from fleet_common.forgejo.writeback import RESYNC_AFTER_SECS
from fleet_common.settings import Settings, load_settings
from fleet_common.tasks.models import Task
from fleet_worker.celery_app import make_celery
from fleet_worker.publisher import Message, wake_queue
from fleet_worker.schedule import FORGEJO_OUTBOX_TASK, FORGEJO_QUEUE, SWEEPS_QUEUE
from fleet_worker.tasks.forgejo import SYNC_TASK
from tests.api_helpers import Api
from tests.fakes.forgejo import WEBHOOK_SECRET, FakeForgejo
from tests.forgejo_story.conftest import Story


def forgejo_settings(tmp_path: Path, database_url: str, fake: FakeForgejo) -> Settings:
    return load_settings(
        env={
            "FLEET_DATABASE_URL": database_url,
            "FLEET_ORCHESTRATOR_STATE_DIR": str(tmp_path / "state"),
            "FLEET_FORGEJO_URL": fake.url,
            "FLEET_FORGEJO_TOKEN": fake.token,
            "FLEET_FORGEJO_WEBHOOK_SECRET": WEBHOOK_SECRET,
        }
    )


class Recorder:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def publish(self, items: list[Any]) -> None:
        self.sent.extend(items)


def test_the_sync_task_retries_with_backoff_on_its_own_queue(tmp_path: Path) -> None:
    app = make_celery(load_settings(env={"FLEET_ORCHESTRATOR_STATE_DIR": str(tmp_path)}))
    task = app.tasks[SYNC_TASK]
    assert app.amqp.router.route({}, SYNC_TASK)["queue"].name == FORGEJO_QUEUE
    assert task.acks_late
    assert task.max_retries >= 50 and task.retry_backoff and task.retry_jitter
    assert task.retry_backoff_max == 300
    assert app.amqp.router.route({}, FORGEJO_OUTBOX_TASK)["queue"].name == SWEEPS_QUEUE
    entries = {e["task"] for e in app.conf.beat_schedule.values()}
    assert FORGEJO_OUTBOX_TASK not in entries  # no Forgejo configured


def test_sync_and_outbox_tasks_in_process(
    tmp_path: Path, database_url: str, fake: FakeForgejo, story: Story
) -> None:
    settings = forgejo_settings(tmp_path, database_url, fake)
    app = make_celery(settings)
    try:
        entries = {e["task"] for e in app.conf.beat_schedule.values()}
        assert FORGEJO_OUTBOX_TASK in entries
        story.create()
        fake.fail_mode = "503"
        # An outage: the task asks Celery for a retry (apply() runs it eagerly, so Retry shows).
        with pytest.raises(Retry):
            app.tasks[SYNC_TASK].apply(args=[story.task_id], throw=True)
        # The sweep's one-shot try does not retry: the sweep is its retry.
        app.tasks[SYNC_TASK].apply(args=[story.task_id], kwargs={"retry": False}, throw=True)
        assert story.comments() == []
        fake.fail_mode = None
        with story.db.session() as session:  # as if the outage was long ago
            long_ago = _ago(RESYNC_AFTER_SECS + 5)
            session.execute(update(Task).values(updated_at=long_ago, forgejo_sync_until=long_ago))
        app.tasks[FORGEJO_OUTBOX_TASK].apply(throw=True)
        with app.connection_for_read() as connection:
            message = wake_queue(FORGEJO_QUEUE)(connection.default_channel).get(no_ack=True)
        assert message is not None
        args, kwargs, _ = message.decode()
        assert (args, kwargs) == ([story.task_id], {"retry": False})
        assert message.headers["task"] == SYNC_TASK and message.headers["expires"]
        app.tasks[SYNC_TASK].apply(args=args, kwargs=kwargs, throw=True)
        assert story.labels() == ["fleet/queued"] and len(story.comments()) == 1
    finally:
        app.runtime.close()


def _ago(seconds: float) -> dt.datetime:
    return utcnow() - dt.timedelta(seconds=seconds)


def test_the_worker_side_queues_a_sync_after_each_state_change(
    tmp_path: Path, database_url: str, fake: FakeForgejo, story: Story
) -> None:
    """A process of a Celery app (worker, beat) watches its own database's commits."""
    app = make_celery(forgejo_settings(tmp_path, database_url, fake))
    recorder = Recorder()
    app.runtime._publisher = recorder  # type: ignore[assignment]
    try:
        story.db = app.runtime.database
        story.create()
        story.move("cancelled", failure_reason="cancelled_by_user")
        assert [(m.task, m.args) for m in recorder.sent] == [(SYNC_TASK, (story.task_id,))] * 2
    finally:
        app.runtime._publisher = None
        app.runtime.close()


def test_the_api_queues_one_sync_per_changed_task(
    tmp_path: Path, database_url: str, fake: FakeForgejo, db: Database, admin_token: str
) -> None:
    from fleet_api.app import create_app

    settings = forgejo_settings(tmp_path, database_url, fake)
    wakeups, syncs = Recorder(), Recorder()
    app = create_app(settings, db=db, publisher=wakeups, sync_publisher=syncs)
    client = app.test_client()
    repo = fake.add_repo("alice", "widgets")
    number = fake.add_issue(repo, "Add retries", labels=("fleet",))
    headers, body = fake.delivery("issues", "opened", repo=repo, number=number, sender="alice")
    reply = client.post("/api/v1/webhooks/forgejo", data=body, headers=headers)
    assert reply.status_code == 202, reply.get_data(as_text=True)
    [task_id] = reply.get_json()["task_ids"]
    # Once, although both the commit watcher and the receiver's hook name the task.
    assert syncs.sent == [Message(SYNC_TASK, FORGEJO_QUEUE, (task_id,), {}, None)]
    assert all(not isinstance(m, Message) for m in wakeups.sent)
    # Any endpoint's state change of a Forgejo task queues its sync too.
    assert Api(client, admin_token).post(f"/tasks/{task_id}/cancel").status_code == 200
    assert [m.args for m in syncs.sent] == [(task_id,), (task_id,)]
    # The hook alone (a change that is no state change) forces a sync.
    app.extensions["fleet"].on_forgejo_change([task_id])
    assert syncs.sent[-1].kwargs == {"force": True}
