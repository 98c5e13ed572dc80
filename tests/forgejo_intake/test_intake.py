"""Intake: which issues become tasks, one active task per issue, and what stops it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from fleet_api.app import create_app
from fleet_common.db import Database
from fleet_common.forgejo.issues import render_prompt
from tests.api_helpers import worker_agent
from tests.fakes.forgejo import FakeForgejo
from tests.forgejo_intake.conftest import HOOK, Forge, Recorder, forgejo_settings


def test_an_opened_issue_with_the_trigger_label_becomes_one_task(forge: Forge) -> None:
    forge.worker([])
    number, reply = forge.open_issue(
        "Fix the uploader", "It drops bytes.", labels=("fleet", "kind/bug")
    )
    assert reply["outcome"] == "created"
    [task] = forge.tasks()
    assert reply["task_ids"] == [task.id]
    assert (task.repo, task.issue_number, task.source) == ("alice/widgets", number, "forgejo")
    assert task.clone_url == forge.fake.repo("alice/widgets").clone_url
    assert task.title == "Fix the uploader"
    assert task.prompt == "Fix the uploader\n\nIt drops bytes."
    assert task.labels == ["fleet", "kind/bug"]
    assert task.requirements == []
    assert task.requires_pr is True
    assert [(e.type, e.actor) for e in forge.events(task.id)] == [("created", "forgejo:alice")]
    # Woken after commit, and the write-back hook heard of it.
    assert [p.task_id for p in forge.recorder.sent] == [task.id]
    assert forge.changed == [[task.id]]


def test_a_task_only_pull_agents_serve_gets_no_wake_up(forge: Forge) -> None:
    # Pull agents poll; a message on a queue no worker reads would stay in the broker.
    forge.agent("puller", ["code:go"])
    forge.worker(["code:python"])  # a worker, but not for this task
    number, reply = forge.open_issue(labels=("agent:code:go",))
    assert reply["outcome"] == "created"
    assert forge.recorder.sent == []
    # Relabelled to what the worker serves: woken now.
    forge.fake.label_issue(forge.repo, number, "agent:code:python", replace=True)
    assert forge.send("issues", "label_updated", number)["outcome"] == "updated"
    assert [p.req_key for p in forge.recorder.sent] == ["code:python"]


def test_agent_labels_qualify_and_become_requirements(forge: Forge) -> None:
    forge.worker(["code:python", "tests", "docs"])
    _number, reply = forge.open_issue(labels=("agent:code:python", "agent:tests", "docs"))
    assert reply["outcome"] == "created"
    [task] = forge.tasks()
    assert task.requirements == ["code:python", "tests"]
    assert task.req_key == "code:python+tests"
    assert forge.recorder.sent[0].req_key == "code:python+tests"


def test_an_issue_without_a_qualifying_label_waits_for_one(forge: Forge) -> None:
    number, reply = forge.open_issue(labels=("kind/bug",))
    assert reply["outcome"] == "no_task"
    assert forge.tasks() == []
    forge.fake.label_issue(forge.repo, number, "fleet")
    assert forge.send("issues", "label_updated", number)["outcome"] == "created"
    # Another label event, a reopen: still the one task.
    forge.fake.label_issue(forge.repo, number, "priority/high")
    assert forge.send("issues", "label_updated", number)["outcome"] == "exists"
    assert forge.send("issues", "reopened", number)["outcome"] == "exists"
    assert len(forge.tasks()) == 1


def test_a_queued_task_follows_its_labels_and_its_edits(forge: Forge) -> None:
    forge.worker(["code:rust"])
    number, _ = forge.open_issue("Old title", labels=("fleet",))
    [task] = forge.tasks()
    forge.fake.label_issue(forge.repo, number, "agent:code:rust")
    assert forge.send("issues", "label_updated", number)["outcome"] == "updated"
    relabelled = forge.task(task.id)
    assert relabelled.requirements == ["code:rust"]
    assert relabelled.req_key == "code:rust"
    assert [p.req_key for p in forge.recorder.sent] == ["_", "code:rust"]  # re-routed

    issue = forge.fake.issue(forge.repo, number)
    issue.title, issue.body = "New title", "More detail."
    assert forge.send("issues", "edited", number)["outcome"] == "updated"
    edited = forge.task(task.id)
    assert (edited.title, edited.prompt) == ("New title", "New title\n\nMore detail.")
    assert forge.event_types(task.id) == ["created", "relabelled", "issue_edited"]


def test_the_echoes_of_fleets_own_write_back_are_ignored(forge: Forge) -> None:
    number = forge.fake.add_issue(forge.repo, "Fix it", labels=("fleet",))
    # The bot labelled it (write-back) and commented: echoes, nothing happens.
    assert forge.send("issues", "label_updated", number, sender="fleet-bot")["outcome"] == "echo"
    comment = forge.fake.add_comment(forge.repo, number, "Fleet: queued")
    reply = forge.send("issue_comment", "created", number, sender="fleet-bot", comment_id=comment)
    assert reply["outcome"] == "echo"
    assert forge.tasks() == []
    # A person's comment is not an echo (and not an instruction either).
    other = forge.fake.add_comment(forge.repo, number, "any news?", user="alice")
    assert forge.send("issue_comment", "created", number, comment_id=other)["outcome"] == "ignored"
    # The bot opening the issue itself is not a label or comment event: it is taken.
    assert forge.send("issues", "opened", number, sender="fleet-bot")["outcome"] == "created"


@pytest.mark.parametrize("how", ["unlabel", "clear", "close"])
def test_an_issue_that_stops_qualifying_cancels_its_task(forge: Forge, how: str) -> None:
    number, _ = forge.open_issue(labels=("fleet", "kind/bug"))
    [task] = forge.tasks()
    if how == "unlabel":
        forge.fake.unlabel_issue(forge.repo, number, "fleet")
        reply = forge.send("issues", "label_updated", number)
    elif how == "clear":
        forge.fake.label_issue(forge.repo, number, replace=True)
        reply = forge.send("issues", "label_cleared", number)
    else:
        forge.fake.set_issue_state(forge.repo, number, "closed")
        reply = forge.send("issues", "closed", number)
    assert reply["outcome"] == "cancelled"
    cancelled = forge.task(task.id)
    assert (cancelled.status, cancelled.failure_reason) == ("cancelled", "cancelled_by_issue")
    assert forge.changed[-1] == [task.id]
    # A later event about the closed or unlabelled issue finds no task.
    assert forge.send("issues", "edited", number)["outcome"] == "no_task"


def test_a_label_change_that_keeps_it_qualifying_does_not_cancel(forge: Forge) -> None:
    number, _ = forge.open_issue(labels=("fleet", "agent:code:python"))
    forge.fake.unlabel_issue(forge.repo, number, "fleet")  # agent:code:python still qualifies
    assert forge.send("issues", "label_updated", number)["outcome"] in ("exists", "updated")
    assert forge.tasks()[0].status == "queued"


def test_reopening_a_closed_issue_opens_a_new_task(forge: Forge) -> None:
    number, _ = forge.open_issue()
    forge.fake.set_issue_state(forge.repo, number, "closed")
    forge.send("issues", "closed", number)
    forge.fake.set_issue_state(forge.repo, number, "open")
    assert forge.send("issues", "reopened", number)["outcome"] == "created"
    first, second = forge.tasks()
    assert (first.status, second.status) == ("cancelled", "queued")


def test_a_bad_prompt_template_falls_back_to_the_default() -> None:
    values = {"title": "T", "body": "B", "number": 3, "repo": "o/r"}
    assert render_prompt("#{number} in {repo}: {title}", **values) == "#3 in o/r: T"  # type: ignore[arg-type]
    for bad in ("{nope}", "{0}", "{title", "{title:d}"):
        assert render_prompt(bad, **values) == "T\n\nB"  # type: ignore[arg-type]


def test_an_issue_needing_too_many_capabilities_is_rejected_and_reported(forge: Forge) -> None:
    labels = ("agent:a", "agent:b", "agent:c", "agent:d")
    _number, reply = forge.open_issue(labels=labels)
    assert reply["outcome"] == "rejected"
    assert forge.tasks() == []
    health = forge.api.get("/intake/health").get_json()
    [row] = [r for r in health if r["repo"] == forge.repo]
    assert "at most 3 capabilities" in row["last_error"]


def test_pull_requests_never_open_tasks(forge: Forge) -> None:
    number, _reply = forge.open_pr("feature", "Add a thing", "Some PR with labels")
    forge.fake.label_issue(forge.repo, number, "fleet")
    assert forge.send("pull_request", "opened", number)["outcome"] == "no_task"
    assert forge.tasks() == []


def test_sequential_deliveries_on_both_backends_make_one_task(forge: Forge) -> None:
    number = forge.fake.add_issue(forge.repo, "Fix it", labels=("fleet", "agent:x"))
    outcomes = [
        forge.send("issues", action, number)["outcome"]
        for action in ("opened", "label_updated", "reopened")
    ]
    assert outcomes == ["created", "exists", "exists"]
    assert len(forge.tasks()) == 1


def test_racing_deliveries_make_exactly_one_task(
    tmp_path: Path, pg_url: str, fake: FakeForgejo
) -> None:
    """Four different deliveries about one issue, each in its own request and transaction on
    PostgreSQL, released together: the unique index lets exactly one create the task."""
    settings = forgejo_settings(tmp_path, pg_url, fake)
    database = Database(settings.database_url)
    recorder = Recorder()
    try:
        app = create_app(settings, db=database, publisher=recorder)
        with database.session() as session:
            worker_agent(session, [])
        number = fake.add_issue("alice/widgets", "Race me", labels=("fleet",))
        bodies = [
            fake.delivery("issues", action, repo="alice/widgets", number=number, sender=sender)
            for action, sender in (
                ("opened", "alice"),
                ("label_updated", "alice"),
                ("reopened", "bob"),
                ("label_updated", "carol"),
            )
        ]
        barrier = threading.Barrier(len(bodies))
        outcomes: list[str] = []

        def deliver(headers: dict[str, str], body: bytes) -> None:
            client = app.test_client()
            barrier.wait()
            response = client.post(HOOK, data=body, headers=headers)
            outcomes.append(f"{response.status_code} {response.get_json().get('outcome')}")

        threads = [threading.Thread(target=deliver, args=pair) for pair in bodies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert sorted(outcomes) == ["202 created", "202 exists", "202 exists", "202 exists"]
        with database.session() as session:
            from sqlalchemy import text

            rows = session.execute(text("SELECT status FROM tasks")).scalars().all()
        assert rows == ["queued"]
        assert len(recorder.sent) == 1
    finally:
        database.dispose()


def test_intake_does_not_call_forgejo(forge: Forge) -> Any:
    number, _ = forge.open_issue()
    forge.fake.set_issue_state(forge.repo, number, "closed")
    forge.send("issues", "closed", number)
    assert forge.fake.calls == []


def test_label_changes_on_a_finished_issue_start_nothing_unless_it_is_labelled_again(
    forge: Forge,
) -> None:
    number, _ = forge.open_issue(labels=("fleet",))
    [first] = forge.tasks()
    forge.api.post(f"/tasks/{first.id}/cancel")  # an operator stopped it; the issue stays open
    forge.fake.label_issue(forge.repo, number, "priority/high")
    assert forge.send("issues", "label_updated", number)["outcome"] == "unchanged"
    # Removing the trigger label and adding it back asks for a new run.
    forge.fake.unlabel_issue(forge.repo, number, "fleet")
    assert forge.send("issues", "label_updated", number)["outcome"] == "unqualified"
    forge.fake.label_issue(forge.repo, number, "fleet")
    assert forge.send("issues", "label_updated", number)["outcome"] == "created"
    second = forge.tasks()[-1]
    forge.api.post(f"/tasks/{second.id}/cancel")
    # So does a qualifying label the last task did not have.
    forge.fake.label_issue(forge.repo, number, "agent:code:go")
    assert forge.send("issues", "label_updated", number)["outcome"] == "created"
    assert [t.status for t in forge.tasks()] == ["cancelled", "cancelled", "queued"]
    assert forge.tasks()[-1].requirements == ["code:go"]
