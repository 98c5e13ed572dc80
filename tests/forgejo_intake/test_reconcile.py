"""Reconcile: one call repairs what lost webhooks missed, and running it again changes nothing."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet_common.db import Database, utcnow
from fleet_common.forgejo.client import ForgejoClient
from fleet_common.forgejo.reconcile import ReconcileResult, reconcile
from fleet_common.settings import Settings
from tests.fakes.forgejo import FakeForgejo
from tests.forgejo_intake.conftest import Forge, forgejo_settings


@pytest.fixture
def forgejo(fake: FakeForgejo) -> Iterator[ForgejoClient]:
    with ForgejoClient(fake.url, fake.token, timeout=5, retries=0) as client:
        yield client


def run(
    db: Database, settings: Settings, client: ForgejoClient, now: dt.datetime | None = None
) -> ReconcileResult:
    with db.session() as session:
        return reconcile(session, settings, client, "alice/widgets", now or utcnow())


def test_a_qualifying_issue_whose_webhook_was_lost_gets_its_task(
    forge: Forge, settings: Settings, forgejo: ForgejoClient
) -> None:
    forge.worker(["code:go"])
    number = forge.fake.add_issue(forge.repo, "Lost", "No webhook came.", labels=("agent:code:go",))
    forge.fake.add_issue(forge.repo, "Not for us", labels=("kind/bug",))
    result = run(forge.db, settings, forgejo)
    assert result.error is None
    [task] = forge.tasks()
    assert result.created == [task.id]
    assert [p.task_id for p in result.publish] == [task.id]
    assert (task.issue_number, task.requirements, task.source) == (number, ["code:go"], "forgejo")
    assert task.clone_url == forge.fake.repo(forge.repo).clone_url
    assert forge.events(task.id)[0].actor == "forgejo:reconcile"
    again = run(forge.db, settings, forgejo)
    assert again.task_ids == []
    assert len(forge.tasks()) == 1


def test_a_closed_issue_cancels_its_task_in_one_call(
    forge: Forge, settings: Settings, forgejo: ForgejoClient
) -> None:
    closed, _ = forge.open_issue("Closed quietly")
    unlabelled, _ = forge.open_issue("Unlabelled quietly")
    kept, _ = forge.open_issue("Still wanted")
    forge.fake.set_issue_state(forge.repo, closed, "closed")
    forge.fake.unlabel_issue(forge.repo, unlabelled, "fleet")
    result = run(forge.db, settings, forgejo)
    by_issue = {t.issue_number: t for t in forge.tasks()}
    assert sorted(result.cancelled) == sorted([by_issue[closed].id, by_issue[unlabelled].id])
    assert by_issue[closed].failure_reason == "cancelled_by_issue"
    assert by_issue[kept].status == "queued"
    assert run(forge.db, settings, forgejo).task_ids == []


def test_tasks_newer_than_the_sweep_are_left_alone(
    forge: Forge, settings: Settings, forgejo: ForgejoClient
) -> None:
    number, _ = forge.open_issue()
    forge.fake.set_issue_state(forge.repo, number, "closed")
    # A sweep that started before the task existed must not judge it by its older issue list.
    result = run(forge.db, settings, forgejo, now=utcnow() - dt.timedelta(minutes=5))
    assert result.cancelled == []
    assert forge.tasks()[0].status == "queued"


def test_a_finished_task_is_not_redone_but_a_requalified_issue_is(
    forge: Forge, settings: Settings, forgejo: ForgejoClient
) -> None:
    done_issue, _ = forge.open_issue("Done")
    agent = forge.agent()
    task_id, lease = forge.dequeue(agent)
    forge.complete(task_id, lease, agent)  # no PR, but requires_pr: the attempt fails no_pr
    forge.api.post(f"/tasks/{task_id}/cancel")  # an operator gave up on it
    again, _ = forge.open_issue("Unlabelled, then labelled again, the last webhook lost")
    forge.fake.unlabel_issue(forge.repo, again, "fleet")
    forge.send("issues", "label_updated", again)  # cancelled_by_issue
    forge.fake.label_issue(forge.repo, again, "fleet")  # ... and this webhook was lost
    result = run(forge.db, settings, forgejo)
    [created] = result.created
    assert forge.task(created).issue_number == again
    assert [t.status for t in forge.tasks() if t.issue_number == done_issue] == ["cancelled"]
    # Its label removed (seen) and added back (webhook lost): that is a request for a new run.
    forge.fake.unlabel_issue(forge.repo, done_issue, "fleet")
    assert forge.send("issues", "label_updated", done_issue)["outcome"] == "unqualified"
    forge.fake.label_issue(forge.repo, done_issue, "fleet")
    [rerun] = run(forge.db, settings, forgejo).created
    assert forge.task(rerun).issue_number == done_issue


def test_review_follows_prs_whose_webhooks_were_lost(
    forge: Forge, settings: Settings, forgejo: ForgejoClient
) -> None:
    outcomes = {}
    for name in ("merged", "closed", "open"):
        number, _ = forge.open_issue(name)
        agent = forge.agent(name)
        task_id, lease = forge.dequeue(agent)
        pr = forge.fake.open_pr(forge.repo, f"fleet/{task_id}", name, f"Closes #{number}")
        forge.complete(task_id, lease, agent, pr_number=pr)
        outcomes[name] = (task_id, pr, number)
    forge.fake.merge_pr(forge.repo, outcomes["merged"][1])  # closes its issue too
    forge.fake.set_issue_state(forge.repo, outcomes["closed"][1], "closed")
    result = run(forge.db, settings, forgejo)
    assert result.completed == [outcomes["merged"][0]]
    assert result.failed == [outcomes["closed"][0]]
    assert result.cancelled == []  # the merged PR's closed issue does not cancel anything
    assert forge.task(outcomes["closed"][0]).failure_reason == "pr_closed"
    assert forge.task(outcomes["open"][0]).status == "in_review"


def test_a_provisionally_accepted_pr_is_verified_later(
    forge: Forge, settings: Settings, forgejo: ForgejoClient
) -> None:
    good_issue, _ = forge.open_issue("good")
    bad_issue, _ = forge.open_issue("bad")
    agent, other = forge.agent("a1"), forge.agent("a2")
    good, good_lease = forge.dequeue(agent)
    bad, bad_lease = forge.dequeue(other)
    good_pr = forge.fake.open_pr(forge.repo, "x", "Fix", f"Closes #{forge.task(good).issue_number}")
    bad_pr = forge.fake.open_pr(forge.repo, "y", "Fix", "mentions nothing")
    forge.fake.fail_mode = "503"
    assert forge.complete(good, good_lease, agent, pr_number=good_pr)["status"] == "in_review"
    assert forge.complete(bad, bad_lease, other, pr_number=bad_pr)["status"] == "in_review"
    forge.fake.fail_mode = None
    result = run(forge.db, settings, forgejo)
    assert result.failed == [bad]
    assert forge.task(bad).failure_reason == "receipt_invalid"
    assert forge.task(good).pr_head_sha == forge.fake.pull(forge.repo, good_pr).head_sha
    assert {good_issue, bad_issue} == {forge.task(good).issue_number, forge.task(bad).issue_number}


def test_forgejo_down_is_recorded_and_changes_nothing(
    forge: Forge, settings: Settings, forgejo: ForgejoClient
) -> None:
    forge.fake.add_issue(forge.repo, "Lost", labels=("fleet",))
    forge.fake.fail_mode = "refuse"
    result = run(forge.db, settings, forgejo)
    assert result.error is not None and result.task_ids == []
    assert forge.tasks() == []
    [row] = forge.api.get("/intake/health").get_json()
    assert row["last_reconcile_at"] is None
    assert row["last_error"].startswith("reconcile: ")
    forge.fake.fail_mode = None
    assert len(run(forge.db, settings, forgejo).created) == 1
    [row] = forge.api.get("/intake/health").get_json()
    assert row["last_reconcile_at"] is not None


def test_the_beat_task_reconciles_every_configured_repo(tmp_path: Path, fake: FakeForgejo) -> None:
    from fleet_common.migrate import upgrade
    from fleet_worker.celery_app import make_celery
    from fleet_worker.schedule import RECONCILE_TASK, beat_schedule

    url = f"sqlite:///{tmp_path / 'beat.db'}"
    upgrade(url)
    settings = forgejo_settings(tmp_path, url, fake, reconcile_interval_secs=120)
    entry = beat_schedule(settings)["sweep-reconcile"]
    assert (entry["task"], entry["schedule"], entry["options"]["queue"]) == (
        RECONCILE_TASK,
        120.0,
        "fleet.sweeps",
    )
    bare = forgejo_settings(tmp_path, url, fake, url="")
    assert "sweep-reconcile" not in beat_schedule(bare)

    fake.add_issue("alice/widgets", "Lost", labels=("fleet",))
    app: Any = make_celery(settings)
    try:
        app.tasks[RECONCILE_TASK].apply().get()
    finally:
        app.runtime.close()
    database = Database(url)
    try:
        with database.session() as session:
            from sqlalchemy import text

            assert session.execute(text("SELECT source, status FROM tasks")).all() == [
                ("forgejo", "queued")
            ]
    finally:
        database.dispose()
