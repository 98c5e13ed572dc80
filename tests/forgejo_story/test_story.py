"""Acceptance (issue #4, write-back): the whole story with real processes and a fake Forgejo.

Label an issue → a task → a real ``fleet worker`` runs the demo agent, which commits, pushes
to the repository's git remote (a local bare repository) and opens a PR through Forgejo's API
→ ``in_review`` → the PR is merged → ``completed``. At each step the issue shows one status
comment (edited in place), exactly one ``fleet/*`` label, and the PR head a commit status.
Then the same with Forgejo refusing connections or answering 503 in the middle: Fleet's state
changes still happen, and Forgejo converges to the final state once it answers again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_common.tasks.models import Task
from tests.api_helpers import assert_log_replays
from tests.e2e.conftest import POSTGRES, SQLITE
from tests.fakes.forgejo import FakeForgejo
from tests.forgejo_story.gitrepo import branches
from tests.forgejo_story.system import AGENT_TYPE, HOST, ForgejoSystem, forgejo_system

BACKENDS = [
    pytest.param(SQLITE, id=SQLITE),
    pytest.param(POSTGRES, id=POSTGRES, marks=[pytest.mark.postgres, pytest.mark.redis]),
]
#: Bounds, not expectations: a busy 2-core machine starts each Python process in seconds.
STEP_TIMEOUT = 60.0
#: After an outage: the next retry of a sync (backoff with jitter) or the outbox sweep.
CONVERGE_TIMEOUT = 60.0


def open_labelled_issue(system: ForgejoSystem) -> tuple[int, str]:
    """An issue, then the trigger label added: the ``label_updated`` delivery makes the task."""
    number = system.fake.add_issue(system.repo, "Add upload retries", "Retry failed uploads.")
    assert system.deliver("issues", "opened", number)["task_ids"] == []
    system.fake.label_issue(system.repo, number, "fleet")
    [task_id] = system.deliver("issues", "label_updated", number)["task_ids"]
    return number, task_id


def merge(system: ForgejoSystem, pr: int, issue: int) -> None:
    """Merge in the fake, then deliver what Forgejo sends: the PR closed as merged, and the
    issue closed by the merge."""
    system.fake.merge_pr(system.repo, pr, merged_by="alice")
    system.deliver("pull_request", "closed", pr)
    system.deliver("issues", "closed", issue)


def fleet_statuses(system: ForgejoSystem, pr: int) -> list[tuple[str, str]]:
    head = system.fake.pull(system.repo, pr).head_sha
    statuses = system.fake.statuses_of(system.repo, head)
    return [(s["status"], s["description"]) for s in statuses if s["context"] == "fleet"]


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_the_whole_story(tmp_path: Path, fake: FakeForgejo, backend_name: str) -> None:
    with forgejo_system(tmp_path, backend_name, fake, agent_sleep=3) as system:
        system.start_beat()
        issue, task_id = open_labelled_issue(system)
        # No worker yet: the task waits, and the issue says so.
        system.wait_shows(
            issue, "fleet/queued", "Queued", f"Task `{task_id}`", timeout=STEP_TIMEOUT
        )
        [comment] = fake.comments_of(system.repo, issue)
        assert comment.login == fake.bot_login

        system.start_worker(HOST)
        agent = f"{HOST}/{AGENT_TYPE}#0"
        system.wait_shows(
            issue, "fleet/running", f"Running on agent **{agent}**", timeout=STEP_TIMEOUT
        )

        task = system.wait_status(task_id, "in_review", "failed", "completed", timeout=STEP_TIMEOUT)
        assert task["status"] == "in_review", (task, system.logs())
        receipt = task["receipt"]
        pr = receipt["pr_number"]
        pull = fake.pull(system.repo, pr)
        assert (pull.head, pull.base) == (f"fleet/{task_id}", "main")
        assert f"Closes #{issue}" in fake.issue(system.repo, pr).body
        assert branches(system.bare)[f"fleet/{task_id}"] == receipt["commit_sha"]
        system.wait_shows(issue, "fleet/in-review", f"pull request #{pr}", timeout=STEP_TIMEOUT)
        system.wait_for(
            lambda: fleet_statuses(system, pr) == [("success", "Fleet: in review")],
            timeout=STEP_TIMEOUT,
            what="the commit status of the PR head",
        )

        merge(system, pr, issue)
        assert system.wait_status(task_id, "completed", timeout=STEP_TIMEOUT)["status"]
        system.wait_shows(issue, "fleet/done", "Done", f"#{pr} was merged", timeout=STEP_TIMEOUT)
        system.wait_for(
            lambda: fleet_statuses(system, pr)[-1:] == [("success", "Fleet: done")],
            timeout=STEP_TIMEOUT,
            what="the final commit status",
        )
        # One comment, edited in place all along; it was never replaced.
        [last] = fake.comments_of(system.repo, issue)
        assert last.id == comment.id
        assert fleet_statuses(system, pr) == [
            ("success", "Fleet: in review"),
            ("success", "Fleet: done"),
        ]
        # The PR itself got no status comment and no fleet/* label.
        assert system.comments(pr) == [] and system.fleet_labels(pr) == []
        statuses = [e["to_status"] for e in system.events(task_id)]
        assert statuses[0] == "queued" and statuses[-1] == "completed"
        assert "in_review" in statuses and "running" in statuses
        # The row is the projection of its log, the PR columns included.
        with system.db.session() as session:
            row = session.get_one(Task, task_id)
            assert (row.pr_number, row.pr_head_sha) == (pr, pull.head_sha)
        assert_log_replays(system.db)


@pytest.mark.parametrize("mode", ["refuse", "503"])
def test_forgejo_down_mid_story_loses_nothing_and_converges(
    tmp_path: Path, fake: FakeForgejo, mode: str
) -> None:
    backend_name = POSTGRES if mode == "503" else SQLITE
    with forgejo_system(tmp_path, backend_name, fake) as system:
        system.start_beat()
        system.start_worker(HOST)
        number = fake.add_issue(system.repo, "Add upload retries", "Retry failed uploads.")

        # Down while the issue is labelled: the task is created all the same.
        fake.fail_mode = mode
        fake.label_issue(system.repo, number, "fleet")
        [task_id] = system.deliver("issues", "label_updated", number)["task_ids"]
        # The agent cannot open its PR while Forgejo is down: its attempt fails and is retried.
        system.wait_for(
            lambda: any(e["type"] == "dispatched" for e in system.events(task_id)),
            timeout=STEP_TIMEOUT,
            what="the task to be dispatched during the outage",
        )
        assert system.comments(number) == [] and system.fleet_labels(number) == []

        fake.fail_mode = None
        task = system.wait_status(task_id, "in_review", timeout=STEP_TIMEOUT * 2)
        pr = task["receipt"]["pr_number"]
        system.wait_shows(number, "fleet/in-review", f"#{pr}", timeout=CONVERGE_TIMEOUT)

        # Down again: the merge still completes the task in Fleet.
        fake.fail_mode = mode
        merge(system, pr, number)
        system.wait_status(task_id, "completed", timeout=STEP_TIMEOUT)
        assert system.shows(number, "fleet/in-review")  # Forgejo could not be told yet

        fake.fail_mode = None
        system.wait_shows(
            number, "fleet/done", "Done", f"#{pr} was merged", timeout=CONVERGE_TIMEOUT
        )
        system.wait_for(  # the status is the sync's last write
            lambda: fleet_statuses(system, pr)[-1:] == [("success", "Fleet: done")],
            timeout=STEP_TIMEOUT,
            what="the final commit status",
        )
        system.wait_for(  # and the task is out of the outbox (marked after the last write)
            lambda: synced(system, task_id), timeout=STEP_TIMEOUT, what="the outbox to empty"
        )
        assert_log_replays(system.db)


def synced(system: ForgejoSystem, task_id: str) -> bool:
    with system.db.session() as session:
        row = session.get(Task, task_id)
        return row is not None and row.forgejo_synced_seq == row.event_seq
