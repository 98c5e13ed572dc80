"""``fleet_common.forgejo.writeback``: Forgejo converges to the task's current state, one
status comment edited in place, exactly one ``fleet/*`` label, a commit status on the PR head;
stale runs write nothing; an outage loses nothing."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import update

from fleet_common.db import utcnow
from fleet_common.forgejo import writeback
from fleet_common.forgejo.client import ForgejoClient, ForgejoUnavailable
from fleet_common.forgejo.status_view import LABELS, desired_view
from fleet_common.forgejo.writeback import Outcome, due_for_sync, sync
from fleet_common.tasks import logs
from fleet_common.tasks.models import Task, TaskStatus
from tests.fakes.forgejo import FakeForgejo
from tests.forgejo_story.conftest import Story

S = TaskStatus


def test_one_comment_edited_in_place_and_one_label_at_each_step(
    story: Story, forgejo: ForgejoClient
) -> None:
    story.create()
    agent = story.agent("builder-1")
    assert sync(story.db, forgejo, story.task_id) == Outcome.SYNCED
    assert story.labels() == ["fleet/queued"]
    assert len(story.comments()) == 1 and "Queued" in story.comments()[0]
    # The trigger and other labels are left alone.
    assert {"fleet", "kind/bug"} <= set(story.fake.labels_of(story.repo, story.issue))

    story.move(S.DISPATCHED, agent_id=agent)
    story.move(S.RUNNING)
    assert sync(story.db, forgejo, story.task_id) == Outcome.SYNCED
    assert story.labels() == ["fleet/running"]
    [body] = story.comments()
    assert "Running on agent **builder-1**" in body

    receipt = {"exit_code": 0, "pr_number": 7, "pr_url": "http://x/pulls/7", "summary": "did it"}
    story.move(S.IN_REVIEW, receipt=receipt)
    pr = story.fake.open_pr(story.repo, "fleet/x", "Closes #1")
    with story.db.session() as session:
        session.execute(update(Task).values(pr_number=pr, pr_head_sha=None))
    assert sync(story.db, forgejo, story.task_id) == Outcome.SYNCED
    assert story.labels() == ["fleet/in-review"]
    [body] = story.comments()
    assert f"pull request #{pr}" in body and "> did it" in body
    head = story.fake.pull(story.repo, pr).head_sha
    [status] = story.fake.statuses_of(story.repo, head)
    assert (status["status"], status["context"]) == ("success", "fleet")

    story.move(S.COMPLETED)
    assert sync(story.db, forgejo, story.task_id) == Outcome.SYNCED
    assert story.labels() == ["fleet/done"]
    [body] = story.comments()
    assert "Done" in body and f"#{pr} was merged" in body
    assert [s["description"] for s in story.fake.statuses_of(story.repo, head)] == [
        "Fleet: in review",
        "Fleet: done",
    ]
    # Labels were created once each, with their colours.
    repo_labels = story.fake.repo(story.repo).labels.values()
    fleet = sorted((lb.name, lb.color) for lb in repo_labels if lb.name.startswith("fleet/"))
    assert [name for name, _ in fleet] == sorted(
        ["fleet/queued", "fleet/running", "fleet/in-review", "fleet/done"]
    )
    assert all(color == LABELS[name][0].lstrip("#") for name, color in fleet)


def test_a_second_run_is_a_no_op_and_force_rewrites_the_same(
    story: Story, forgejo: ForgejoClient
) -> None:
    story.create()
    assert sync(story.db, forgejo, story.task_id) == Outcome.SYNCED
    calls = len(story.fake.calls)
    assert sync(story.db, forgejo, story.task_id) == Outcome.CURRENT
    assert len(story.fake.calls) == calls
    assert sync(story.db, forgejo, story.task_id, force=True) == Outcome.SYNCED
    assert story.labels() == ["fleet/queued"] and len(story.comments()) == 1
    # No label was added or removed the second time, and the comment was edited, not posted.
    writes = [c for c in story.fake.calls[calls:] if c.method != "GET"]
    assert [(c.method, c.route) for c in writes] == [
        ("PATCH", "/repos/{owner}/{repo}/issues/comments/{id}")
    ]


def test_failure_shows_reason_and_a_redacted_log_tail(story: Story, forgejo: ForgejoClient) -> None:
    story.create()
    with story.db.session() as session:
        task = session.get(Task, story.task_id)
        assert task is not None
        text = "".join(f"line {n}\n" for n in range(100)) + "token ghp_" + "a" * 36 + "\n"
        logs.append(session, task, 0, text, max_bytes=1 << 20, now=utcnow())
    story.move(S.FAILED, failure_reason="exit_code", last_error="agent exited with 3")
    redact = writeback_redactor()
    assert sync(story.db, forgejo, story.task_id, redact=redact) == Outcome.SYNCED
    [body] = story.comments()
    assert "Failed (`exit_code`)" in body and "agent exited with 3" in body
    assert "line 99" in body and "line 10\n" not in body  # a tail, not the whole log
    assert "ghp_" not in body and "[REDACTED]" in body
    assert story.labels() == ["fleet/failed"]


def writeback_redactor() -> Callable[[str], str]:
    from fleet_worker.redaction import Redactor

    return Redactor().redact_text


def test_cancelled_removes_every_fleet_label(story: Story, forgejo: ForgejoClient) -> None:
    story.create()
    sync(story.db, forgejo, story.task_id)
    # A person added another status label by hand (not exclusive): it goes too.
    story.fake.label_issue(story.repo, story.issue, "fleet/done")
    story.move(S.CANCELLED, failure_reason="cancelled_by_issue")
    assert sync(story.db, forgejo, story.task_id) == Outcome.SYNCED
    assert story.labels() == []
    assert "Cancelled (`cancelled_by_issue`)" in story.comments()[0]


def test_duplicate_label_names_and_a_deleted_comment(story: Story, forgejo: ForgejoClient) -> None:
    first = story.fake.add_label(story.repo, "fleet/queued", color="ffffff")
    forgejo.create_label(story.repo, "fleet/queued", "#000000")  # Forgejo allows a twin
    story.create()
    sync(story.db, forgejo, story.task_id)
    assert story.fake.issue(story.repo, story.issue).labels[-1] == first
    [comment] = story.fake.comments_of(story.repo, story.issue)
    forgejo.session.delete(
        f"{forgejo.api_url}/repos/{story.repo}/issues/comments/{comment.id}"
    ).raise_for_status()
    story.move(S.CANCELLED, failure_reason="cancelled_by_user")
    sync(story.db, forgejo, story.task_id)
    [again] = story.fake.comments_of(story.repo, story.issue)
    assert again.id != comment.id and "Cancelled" in again.body
    assert story.row().forgejo_comment_id == again.id


def test_a_comment_posted_but_not_recorded_is_adopted(story: Story, forgejo: ForgejoClient) -> None:
    story.create()
    sync(story.db, forgejo, story.task_id)
    with story.db.session() as session:
        session.execute(update(Task).values(forgejo_comment_id=None))
    story.move(S.CANCELLED, failure_reason="cancelled_by_user")
    sync(story.db, forgejo, story.task_id)
    assert len(story.comments()) == 1 and "Cancelled" in story.comments()[0]


@pytest.mark.parametrize("mode", ["refuse", "503"])
def test_an_outage_raises_frees_the_task_and_loses_nothing(
    story: Story, forgejo: ForgejoClient, fake: FakeForgejo, mode: str
) -> None:
    story.create()
    fake.fail_mode = mode
    with pytest.raises(ForgejoUnavailable):
        sync(story.db, forgejo, story.task_id)
    row = story.row()
    assert row.forgejo_synced_seq < row.event_seq  # still in the outbox
    assert row.forgejo_sync_until is not None and row.forgejo_sync_until <= utcnow()
    story.move(S.CANCELLED, failure_reason="cancelled_by_user")
    fake.fail_mode = None
    assert sync(story.db, forgejo, story.task_id) == Outcome.SYNCED
    assert story.labels() == [] and "Cancelled" in story.comments()[0]


def test_a_refusal_for_good_skips_that_part_only(story: Story, forgejo: ForgejoClient) -> None:
    story.create()
    story.fake.fail_next(1, status=422)  # the first call: listing the repo's labels
    assert sync(story.db, forgejo, story.task_id) == Outcome.GAVE_UP
    assert story.labels() == [] and len(story.comments()) == 1
    row = story.row()
    assert row.forgejo_synced_seq == row.event_seq


def test_a_run_that_finds_the_task_held_writes_nothing(
    story: Story, forgejo: ForgejoClient
) -> None:
    story.create()
    with story.db.session() as session:
        until = utcnow() + dt.timedelta(seconds=60)
        session.execute(update(Task).values(forgejo_sync_until=until))
    assert sync(story.db, forgejo, story.task_id) == Outcome.BUSY
    assert story.fake.calls == []


def test_a_state_change_during_the_write_is_rendered_before_release(
    story: Story, forgejo: ForgejoClient, fake: FakeForgejo
) -> None:
    """The run that wrote "queued" sees the task moved meanwhile and writes "cancelled" too,
    so no stale view can outlive a newer one."""
    story.create()
    moved = threading.Event()
    original = forgejo.create_issue_comment

    def slow_create(*args: Any, **kwargs: Any) -> Any:
        answer = original(*args, **kwargs)
        if not moved.is_set():
            story.move(S.CANCELLED, failure_reason="cancelled_by_user")
            # A run for the new state finds the task held and leaves it to this one.
            assert sync(story.db, forgejo, story.task_id) == Outcome.BUSY
            moved.set()
        return answer

    forgejo.create_issue_comment = slow_create  # type: ignore[method-assign]
    assert sync(story.db, forgejo, story.task_id) == Outcome.SYNCED
    row = story.row()
    assert row.forgejo_synced_seq == row.event_seq and row.status == S.CANCELLED
    assert len(story.comments()) == 1 and "Cancelled" in story.comments()[0]
    assert story.labels() == []


def test_due_for_sync_waits_and_marks(story: Story) -> None:
    story.create()
    now = utcnow()
    with story.db.session() as session:
        assert due_for_sync(session, now, limit=10) == []  # just changed: the hook's turn
    later = now + dt.timedelta(seconds=writeback.RESYNC_AFTER_SECS + 1)
    with story.db.session() as session:
        assert due_for_sync(session, later, limit=10) == [story.task_id]
    with story.db.session() as session:
        assert due_for_sync(session, later, limit=10) == []  # attempted just now
        again = later + dt.timedelta(seconds=writeback.RESYNC_AFTER_SECS + 1)
        assert due_for_sync(session, again, limit=10) == [story.task_id]
    with story.db.session() as session:  # a change older than the horizon is left alone
        assert due_for_sync(session, now + writeback.OUTBOX_HORIZON, limit=10) == []


def test_watch_reports_committed_state_changes_of_forgejo_tasks(story: Story) -> None:
    seen: list[list[str]] = []
    writeback.watch(story.db, seen.append)
    story.create()
    assert seen == [[story.task_id]]
    with story.db.session() as session:  # a write that is no state change
        session.execute(update(Task).values(forgejo_synced_seq=1))
        task = session.get(Task, story.task_id)
        assert task is not None
        task.forgejo_sync_until = utcnow()
    assert seen == [[story.task_id]]
    story.move(S.CANCELLED, failure_reason="cancelled_by_user")
    assert seen == [[story.task_id], [story.task_id]]
    with pytest.raises(RuntimeError), story.db.session() as session:
        task = session.get(Task, story.task_id)
        assert task is not None
        task.event_seq += 1
        session.flush()
        raise RuntimeError("rolled back")
    assert len(seen) == 2
    with story.db.session() as session:  # a savepoint rolled back: the outer change stands
        task = session.get(Task, story.task_id)
        assert task is not None
        task.event_seq += 1
        session.flush()
        with pytest.raises(RuntimeError), session.begin_nested():
            raise RuntimeError("savepoint only")
    assert seen[-1] == [story.task_id] and len(seen) == 3


def test_desired_view_is_pure() -> None:
    class Row:
        id, status, attempt, agent_id = "tsk_1", "running", 2, "agt_1"
        failure_reason = last_error = pr_number = pr_url = receipt = None
        updated_at = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)

    view = desired_view(Row(), "box`1")
    assert view == desired_view(Row(), "box`1")
    assert view.label == "fleet/running" and view.commit_state == "pending"
    assert "<!-- fleet:task:tsk_1 -->" in view.comment_body
    assert "**box1**" in view.comment_body and "2026-01-02 03:04:05 UTC" in view.comment_body
