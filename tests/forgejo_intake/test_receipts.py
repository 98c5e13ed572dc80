"""Receipt validation: the PR a receipt names is checked through Forgejo's API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleet_common.db import Database, utcnow
from fleet_common.forgejo.receipts import InvalidPr, make_pr_check, receipt_pr_number
from fleet_common.settings import load_settings
from fleet_common.tasks.models import Task
from fleet_worker.attempt import Attempt
from fleet_worker.db_reporter import DbReporter
from fleet_worker.outcome import Outcome
from tests.forgejo_intake.conftest import Forge


def _running(forge: Forge) -> tuple[int, str, str, str]:
    number, _ = forge.open_issue()
    agent = forge.agent()
    task_id, lease = forge.dequeue(agent)
    return number, task_id, lease, agent


def test_a_good_pr_sends_the_task_to_review_and_is_attached(forge: Forge) -> None:
    number, task_id, lease, agent = _running(forge)
    pr = forge.fake.open_pr(forge.repo, "agent/fix", "Fix", f"Fixes #{number}")  # no webhook
    done = forge.complete(task_id, lease, agent, pr_number=pr)
    assert done["status"] == "in_review"
    task = forge.task(task_id)
    assert task.pr_number == pr
    assert task.pr_head_sha == forge.fake.pull(forge.repo, pr).head_sha
    assert forge.event_types(task_id)[-2:] == ["pr_attached", "in_review"]
    assert [c.route for c in forge.fake.calls] == ["/repos/{owner}/{repo}/pulls/{index}"]


def test_a_pr_from_the_tasks_branch_is_good_without_keywords(forge: Forge) -> None:
    _, task_id, lease, agent = _running(forge)
    pr = forge.fake.open_pr(forge.repo, f"fleet/{task_id}", "WIP", "")
    url = f"{forge.fake.url}alice/widgets/pulls/{pr}"
    assert forge.complete(task_id, lease, agent, pr_url=url)["status"] == "in_review"


@pytest.mark.parametrize("case", ["other_repo", "not_referencing", "missing", "closed", "mismatch"])
def test_a_pr_that_does_not_qualify_fails_the_attempt_receipt_invalid(
    forge: Forge, case: str
) -> None:
    number, task_id, lease, agent = _running(forge)
    forge.fake.add_repo("bob", "gadgets")
    receipt: dict[str, Any]
    if case == "other_repo":
        pr = forge.fake.open_pr("bob/gadgets", "agent/fix", "Fix", f"Closes alice/widgets#{number}")
        receipt = {"pr_url": f"{forge.fake.url}bob/gadgets/pulls/{pr}", "pr_number": pr}
        expected = "not in the task's repository"
    elif case == "not_referencing":
        pr = forge.fake.open_pr(forge.repo, "agent/fix", "Fix", f"Related to #{number}")
        receipt, expected = {"pr_number": pr}, f"does not close issue #{number}"
    elif case == "missing":
        receipt, expected = {"pr_number": 999}, "does not exist in alice/widgets"
    elif case == "closed":
        pr = forge.fake.open_pr(forge.repo, "agent/fix", "Fix", f"Closes #{number}")
        forge.fake.set_issue_state(forge.repo, pr, "closed")
        receipt, expected = {"pr_number": pr}, "closed without being merged"
    else:
        pr = forge.fake.open_pr(forge.repo, "agent/fix", "Fix", f"Closes #{number}")
        receipt = {"pr_number": pr, "pr_url": f"{forge.fake.url}alice/widgets/pulls/{pr + 1}"}
        expected = "name different pull requests"
    done = forge.complete(task_id, lease, agent, **receipt)
    assert done["status"] == "queued"  # the attempt failed; retries remain
    assert done["failure_reason"] == "receipt_invalid"
    assert expected in done["last_error"]
    assert done["attempt"] == 2
    assert forge.task(task_id).pr_number is None


def test_a_merged_pr_completes_the_task_at_once(forge: Forge) -> None:
    number, task_id, lease, agent = _running(forge)
    pr = forge.fake.open_pr(forge.repo, "agent/fix", "Fix", f"Closes #{number}")
    forge.fake.merge_pr(forge.repo, pr)
    assert forge.complete(task_id, lease, agent, pr_number=pr)["status"] == "completed"


def test_forgejo_down_accepts_the_pr_provisionally(forge: Forge) -> None:
    number, task_id, lease, agent = _running(forge)
    pr = forge.fake.open_pr(forge.repo, "agent/fix", "Fix", f"Closes #{number}")
    forge.fake.fail_mode = "503"
    done = forge.complete(task_id, lease, agent, pr_number=pr)
    assert done["status"] == "in_review"  # no attempt burnt on Forgejo's outage
    task = forge.task(task_id)
    assert (task.pr_number, task.pr_head_sha) == (pr, None)  # no head yet: unverified


def test_no_forgejo_or_no_repo_means_no_review(tmp_path: Path, fake: Any) -> None:
    task = Task(id="tsk_x", repo="alice/widgets", issue_number=1, agent_id="a")
    bare = load_settings(env={"FLEET_ORCHESTRATOR_STATE_DIR": str(tmp_path)})
    assert make_pr_check(bare)(task, {"pr_number": 1}) == (False, None)
    from tests.forgejo_intake.conftest import forgejo_settings

    connected = forgejo_settings(tmp_path, f"sqlite:///{tmp_path / 'x.db'}", fake)
    assert make_pr_check(connected)(Task(id="tsk_y", repo=None), {"pr_number": 1}) == (False, None)
    assert fake.calls == []


def test_receipt_pr_numbers() -> None:
    repo = "alice/widgets"
    assert receipt_pr_number({"pr_number": 7}, repo) == 7
    assert receipt_pr_number({"pr_url": "https://git.example.com/alice/widgets/pulls/8"}, repo) == 8
    assert (
        receipt_pr_number({"pr_url": "https://git.example.com/Alice/Widgets/pulls/9/files"}, repo)
        == 9
    )
    api = "https://git.example.com/api/v1/repos/alice/widgets/pulls/10"
    assert receipt_pr_number({"pr_url": api, "pr_number": 10}, repo) == 10
    for bad in (
        {},
        {"pr_number": True},
        {"pr_url": "https://github.com/alice/widgets/pull/3"},
        {"pr_url": "https://git.example.com/bob/widgets/pulls/3"},
    ):
        with pytest.raises(InvalidPr):
            receipt_pr_number(bad, repo)


def test_the_worker_checks_the_receipt_too(forge: Forge, db: Database) -> None:
    number, task_id, lease, _ = _running(forge)
    pr = forge.fake.open_pr(
        forge.repo, "agent/fix", "Fix", f"Some text, not a reference to {number}"
    )
    with db.session() as session:
        row = session.get(Task, task_id)
        assert row is not None
        attempt = Attempt.of(row, lease)
    settings = forge.client.application.extensions["fleet"].settings
    reporter = DbReporter(db, settings.orchestrator, attempt, pr_check=make_pr_check(settings))
    reporter.finish(Outcome("complete", receipt={"exit_code": 0, "pr_number": pr}))
    task = forge.task(task_id)
    assert (task.status, task.failure_reason) == ("queued", "receipt_invalid")
    assert task.not_before is not None and task.not_before > utcnow()
