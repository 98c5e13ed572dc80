"""Pull requests: attached to their task by ``Closes #N`` or by branch, and followed to the end."""

from __future__ import annotations

from tests.forgejo_intake.conftest import Forge


def _running(forge: Forge) -> tuple[int, str, str, str]:
    """An issue whose task an agent is running: (issue number, task id, lease, agent token)."""
    number, _ = forge.open_issue()
    agent = forge.agent()
    task_id, lease = forge.dequeue(agent)
    return number, task_id, lease, agent


def test_a_pr_that_closes_the_issue_is_attached_whoever_opened_it(forge: Forge) -> None:
    number, task_id, _, _ = _running(forge)
    pr, reply = forge.open_pr("agent/issue-fix", "Fix the uploader", f"Closes #{number}")
    assert reply["outcome"] == "pr_attached"
    task = forge.task(task_id)
    pull = forge.fake.pull(forge.repo, pr)
    assert task.pr_number == pr
    assert task.pr_url == f"{forge.fake.url}alice/widgets/pulls/{pr}"
    assert task.pr_head_sha == pull.head_sha
    [attached] = [e for e in forge.events(task_id) if e.type == "pr_attached"]
    assert attached.to_status == "dispatched"
    assert attached.data["pr_number"] == pr
    assert forge.changed[-1] == [task_id]


def test_a_pr_from_the_tasks_branch_is_attached_without_keywords(forge: Forge) -> None:
    _, task_id, _, _ = _running(forge)
    pr, reply = forge.open_pr(
        f"fleet/{task_id}", "Work in progress", "No keywords here", sender="carol"
    )
    assert reply["outcome"] == "pr_attached"
    assert forge.task(task_id).pr_number == pr


def test_a_pr_that_only_mentions_the_issue_is_not_attached(forge: Forge) -> None:
    number, task_id, _, _ = _running(forge)
    for body in (
        f"See #{number}",
        f"Closes  #{number}",
        f"Closes #{number + 100}",
        f"Closes other/repo#{number}",
    ):
        _, reply = forge.open_pr(f"topic-{len(body)}", "Unrelated", body)
        assert reply["outcome"] == "no_task", body
    assert forge.task(task_id).pr_number is None


def test_synchronized_records_the_new_head(forge: Forge) -> None:
    number, task_id, _, _ = _running(forge)
    pr, _ = forge.open_pr("agent/x", "Fix", f"Fixes #{number}")
    forge.fake.push_pr(forge.repo, pr, "c0ffee" * 6 + "abcd")
    assert (
        forge.send("pull_request", "synchronized", pr, sender="fleet-bot")["outcome"] == "recorded"
    )
    assert forge.task(task_id).pr_head_sha == "c0ffee" * 6 + "abcd"
    [event] = [e for e in forge.events(task_id) if e.type == "pr_synchronized"]
    assert event.data["head_sha"] == "c0ffee" * 6 + "abcd"
    # The same push delivered again (a new body would be a new sha) changes nothing.
    assert forge.send("pull_request", "synchronized", pr, sender="alice")["outcome"] == "unchanged"


def test_edited_rereads_the_references(forge: Forge) -> None:
    number, task_id, _, _ = _running(forge)
    pr, _ = forge.open_pr("agent/x", "Fix", "Work in progress")
    assert forge.task(task_id).pr_number is None
    forge.fake.issue(forge.repo, pr).body = f"Resolves: #{number}"
    assert forge.send("pull_request", "edited", pr)["outcome"] == "pr_attached"
    assert forge.task(task_id).pr_number == pr
    forge.fake.issue(forge.repo, pr).body = "Not this one after all"
    assert forge.send("pull_request", "edited", pr)["outcome"] == "pr_detached"
    task = forge.task(task_id)
    assert (task.pr_number, task.pr_url, task.pr_head_sha) == (None, None, None)


def test_the_story_receipt_to_review_to_merge_completes(forge: Forge) -> None:
    number, task_id, lease, agent = _running(forge)
    pr, _ = forge.open_pr(f"fleet/{task_id}", "Fix the uploader", f"Closes #{number}")
    done = forge.complete(task_id, lease, agent, pr_number=pr, branch=f"fleet/{task_id}")
    assert done["status"] == "in_review"
    forge.fake.merge_pr(forge.repo, pr, merged_by="alice")
    assert forge.send("pull_request", "closed", pr)["outcome"] == "completed"
    task = forge.task(task_id)
    assert task.status == "completed" and task.finished_at is not None
    assert forge.event_types(task_id)[-2:] == ["in_review", "pr_merged"]
    # The merge closed the issue: its delivery finds nothing left to do.
    assert forge.send("issues", "closed", number)["outcome"] == "no_task"


def test_the_issue_closed_by_the_merge_first_keeps_the_task_in_review(forge: Forge) -> None:
    number, task_id, lease, agent = _running(forge)
    pr, _ = forge.open_pr("agent/x", "Fix", f"Closes #{number}")
    forge.complete(task_id, lease, agent, pr_number=pr)
    forge.fake.merge_pr(forge.repo, pr)
    assert forge.send("issues", "closed", number)["outcome"] == "kept"
    assert forge.task(task_id).status == "in_review"
    assert forge.send("pull_request", "closed", pr)["outcome"] == "completed"
    assert forge.task(task_id).status == "completed"


def test_a_pr_closed_without_merge_fails_the_task_in_review(forge: Forge) -> None:
    number, task_id, lease, agent = _running(forge)
    pr, _ = forge.open_pr("agent/x", "Fix", f"Closes #{number}")
    forge.complete(task_id, lease, agent, pr_url=f"{forge.fake.url}alice/widgets/pulls/{pr}")
    forge.fake.set_issue_state(forge.repo, pr, "closed")
    assert forge.send("pull_request", "closed", pr)["outcome"] == "failed"
    task = forge.task(task_id)
    assert (task.status, task.failure_reason) == ("failed", "pr_closed")
    assert task.attempt == 1  # terminal: a person closed it, no automatic retry


def test_a_pr_merged_before_the_receipt_is_recorded_and_the_receipt_completes(forge: Forge) -> None:
    number, task_id, lease, agent = _running(forge)
    pr, _ = forge.open_pr(f"fleet/{task_id}", "Fix", f"Closes #{number}")
    forge.fake.merge_pr(forge.repo, pr)
    assert forge.send("pull_request", "closed", pr)["outcome"] == "recorded"
    assert forge.task(task_id).status == "dispatched"
    # The issue the merge closed does not cancel the task whose PR was merged.
    assert forge.send("issues", "closed", number)["outcome"] == "kept"
    done = forge.complete(task_id, lease, agent, pr_number=pr)
    assert done["status"] == "completed"
    assert forge.event_types(task_id) == [
        "created",
        "dispatched",
        "pr_attached",
        "pr_merged",
        "completed",
    ]


def test_closing_an_unrelated_pr_changes_nothing(forge: Forge) -> None:
    number, task_id, lease, agent = _running(forge)
    mine, _ = forge.open_pr("agent/x", "Fix", f"Closes #{number}")
    forge.complete(task_id, lease, agent, pr_number=mine)
    other = forge.fake.open_pr(forge.repo, "other", "Something else", "")
    forge.fake.set_issue_state(forge.repo, other, "closed")
    assert forge.send("pull_request", "closed", other)["outcome"] == "no_task"
    assert forge.task(task_id).status == "in_review"
