"""Retries and backoff: failed attempts go back to the queue after ``base × 2^(attempt−1)``
(capped) until the budget is spent; then the task is failed for good, until an operator's
retry gives it a fresh budget. Non-retryable failures and terminal reasons end it at once."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from tests.api_helpers import (
    Api,
    Stack,
    assert_log_replays,
    claim_at,
    dequeue,
    events,
    new_task,
    stack,
)


def wait_secs(row: dict[str, Any]) -> float:
    """How long the backoff of a requeued task is (``not_before`` from the moment it failed)."""
    not_before = dt.datetime.fromisoformat(row["not_before"])
    failed_at = dt.datetime.fromisoformat(row["updated_at"])
    return (not_before - failed_at).total_seconds()


def take(st: Stack, agent: dict[str, Any], row: dict[str, Any]) -> str:
    """Claim the task as ``agent`` once its backoff is over; returns the lease token."""
    not_before = dt.datetime.fromisoformat(row["not_before"])
    claimed = claim_at(st.db, st.settings, agent["agent"]["id"], not_before)
    assert claimed is not None and claimed[0] == row["id"]
    return claimed[1]


def fail_by_exit_code(api: Api, agent: dict[str, Any], task_id: str, lease: str) -> Any:
    response = api.post(
        f"/tasks/{task_id}/complete",
        json={"lease_token": lease, "receipt": {"exit_code": 3, "summary": "tests failed"}},
        token=agent["agent_token"],
    )
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_backoff_doubles_up_to_the_cap_then_fails(tmp_path: Path, database_url: str) -> None:
    with stack(tmp_path, database_url, retry_backoff_base_secs=10, retry_backoff_max_secs=25) as st:
        api = st.api
        agent = api.register("builder")
        task = new_task(api, max_retries=3)
        got = dequeue(api, agent["agent_token"])
        assert got is not None and got["lease"]["attempt"] == 1
        lease = got["lease"]["token"]

        for attempt, delay in ((1, 10), (2, 20), (3, 25)):  # 40 is capped at 25
            row = fail_by_exit_code(api, agent, task["id"], lease)
            assert row["status"] == "queued", row
            assert row["attempt"] == attempt + 1
            assert row["failure_reason"] == "exit_code"
            assert row["last_error"] == "agent exited with 3"
            assert row["receipt"]["exit_code"] == 3
            assert wait_secs(row) == delay
            assert dequeue(api, agent["agent_token"]) is None  # not before the backoff
            last = events(api, task["id"])[-1]
            assert last["type"] == "attempt_failed"
            assert last["data"]["retry_in_secs"] == delay
            lease = take(st, agent, row)

        row = fail_by_exit_code(api, agent, task["id"], lease)  # attempt 4 of 1 + 3 retries
        assert row["status"] == "failed"
        assert row["failure_reason"] == "exit_code"
        assert row["not_before"] is None
        assert row["finished_at"] is not None
        assert events(api, task["id"])[-1]["type"] == "failed"
        assert dequeue(api, agent["agent_token"]) is None

        # An operator's retry: queued at once, with the whole budget again.
        retried = api.post(f"/tasks/{task['id']}/retry")
        assert retried.status_code == 200, retried.get_json()
        row = retried.get_json()
        assert (row["status"], row["attempt"], row["not_before"], row["failure_reason"]) == (
            "queued",
            5,
            None,
            None,
        )
        got = dequeue(api, agent["agent_token"])
        assert got is not None and got["lease"]["attempt"] == 5
        lease = got["lease"]["token"]
        for attempt, delay in ((5, 10), (6, 20), (7, 25)):
            row = fail_by_exit_code(api, agent, task["id"], lease)
            assert (row["status"], row["attempt"]) == ("queued", attempt + 1)
            assert wait_secs(row) == delay
            lease = take(st, agent, row)
        assert fail_by_exit_code(api, agent, task["id"], lease)["status"] == "failed"
        assert_log_replays(st.db)


def test_fail_endpoint_retries_unless_not_retryable(client: Any, admin_token: str, db: Any) -> None:
    api = Api(client, admin_token)
    agent = api.register("builder")
    task = new_task(api, max_retries=5)
    got = dequeue(api, agent["agent_token"])
    assert got is not None
    failed = api.post(
        f"/tasks/{task['id']}/fail",
        json={"lease_token": got["lease"]["token"], "error": "boom"},
        token=agent["agent_token"],
    )
    assert failed.status_code == 200, failed.get_json()
    row = failed.get_json()
    assert (row["status"], row["attempt"], row["last_error"]) == ("queued", 2, "boom")

    other = new_task(api, title="other", max_retries=5)
    got = dequeue(api, agent["agent_token"])
    assert got is not None and got["task"]["id"] == other["id"]
    final = api.post(
        f"/tasks/{other['id']}/fail",
        json={"lease_token": got["lease"]["token"], "error": "bad config", "retryable": False},
        token=agent["agent_token"],
    )
    assert final.status_code == 200, final.get_json()
    row = final.get_json()
    assert (row["status"], row["attempt"], row["failure_reason"], row["last_error"]) == (
        "failed",
        1,
        "exit_code",
        "bad config",
    )
    assert events(api, other["id"])[-1]["type"] == "failed"
    assert_log_replays(db)


def test_receipt_without_pr_on_a_requires_pr_task(client: Any, admin_token: str, db: Any) -> None:
    api = Api(client, admin_token)
    agent = api.register("builder")
    task = new_task(api, requires_pr=True, max_retries=0)
    got = dequeue(api, agent["agent_token"])
    assert got is not None
    done = api.post(
        f"/tasks/{task['id']}/complete",
        json={"lease_token": got["lease"]["token"], "receipt": {"exit_code": 0, "branch": "b"}},
        token=agent["agent_token"],
    )
    assert done.status_code == 200, done.get_json()
    row = done.get_json()
    assert (row["status"], row["failure_reason"]) == ("failed", "no_pr")
    assert row["receipt"]["branch"] == "b"

    retrying = new_task(api, title="retrying", requires_pr=True, max_retries=1)
    got = dequeue(api, agent["agent_token"])
    assert got is not None and got["task"]["id"] == retrying["id"]
    again = api.post(
        f"/tasks/{retrying['id']}/complete",
        json={"lease_token": got["lease"]["token"], "receipt": {"exit_code": 0}},
        token=agent["agent_token"],
    ).get_json()
    assert (again["status"], again["attempt"], again["failure_reason"]) == ("queued", 2, "no_pr")
    assert events(api, retrying["id"])[-1]["data"]["reason"] == "no_pr"

    # With a PR (and no Forgejo), the task completes and keeps the PR as an artifact.
    with_pr = new_task(api, title="with pr", requires_pr=True)
    got = dequeue(api, agent["agent_token"])
    assert got is not None and got["task"]["id"] == with_pr["id"]
    receipt = {"exit_code": 0, "pr_url": "https://git.example.com/o/r/pulls/7", "pr_number": 7}
    ok = api.post(
        f"/tasks/{with_pr['id']}/complete",
        json={"lease_token": got["lease"]["token"], "receipt": receipt},
        token=agent["agent_token"],
    ).get_json()
    assert ok["status"] == "completed"
    assert ok["artifacts"] == [
        {"kind": "pull_request", "url": receipt["pr_url"], "number": 7},
    ]
    assert_log_replays(db)
