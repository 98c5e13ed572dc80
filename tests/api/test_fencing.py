"""Lease fencing: once an attempt's lease has expired and the task has moved on, every write
the old holder makes with its old lease is refused with 409 ``stale_lease`` and changes nothing,
while the new holder's writes are accepted."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from fleet_common import sweeps
from fleet_common.db import utcnow
from tests.api_helpers import (
    Api,
    assert_error,
    assert_log_replays,
    claim_at,
    dequeue,
    events,
    new_task,
    run_sweep,
    snapshot,
    stack,
    task_row,
    wait_until,
)

SECOND = dt.timedelta(seconds=1)


def when(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def zombie_writes(task_id: str, lease: str) -> list[tuple[str, dict[str, Any]]]:
    """Every write a lease holder can make about a task, with ``lease``."""
    receipt = {"exit_code": 0, "summary": "done by a zombie"}
    return [
        (f"/tasks/{task_id}/status", {"lease_token": lease, "status": "running"}),
        (f"/tasks/{task_id}/logs", {"lease_token": lease, "seq": 7, "data": "zombie\n"}),
        (f"/tasks/{task_id}/complete", {"lease_token": lease, "receipt": receipt}),
        (f"/tasks/{task_id}/fail", {"lease_token": lease, "error": "zombie failure"}),
        ("/receipts", {"task_id": task_id, "lease_token": lease, "receipt": receipt}),
    ]


def assert_fenced(api: Api, db: Any, agent_token: str, task_id: str, lease: str) -> None:
    """Each zombie write → 409 stale_lease, and the database is left exactly as it was."""
    before = snapshot(db)
    for path, body in zombie_writes(task_id, lease):
        assert_error(api.post(path, json=body, token=agent_token), 409, "stale_lease")
    assert snapshot(db) == before


def test_expired_lease_is_requeued_and_the_zombie_is_fenced(
    tmp_path: Path, database_url: str
) -> None:
    with stack(tmp_path, database_url) as st:
        api = st.api
        task = new_task(api, labels=["agent:code:python"])
        a = api.register("zombie", ["code:python"])
        b = api.register("successor", ["code:python"])
        got = dequeue(api, a["agent_token"])
        assert got is not None and got["task"]["id"] == task["id"]
        lease_a = got["lease"]["token"]
        ok = api.post(
            f"/tasks/{task['id']}/status",
            json={"lease_token": lease_a, "status": "running"},
            token=a["agent_token"],
        )
        assert ok.status_code == 200, ok.get_json()
        expires = when(ok.get_json()["lease_expires_at"])

        # Nothing is due before the expiry; just after it the sweep fails the attempt.
        assert run_sweep(st.db, st.settings, sweeps.expired_leases, expires - SECOND) == 0
        assert run_sweep(st.db, st.settings, sweeps.expired_leases, expires + SECOND) == 1
        row = task_row(api, task["id"])
        assert row["status"] == "queued"
        assert row["attempt"] == 2
        assert row["failure_reason"] == "lease_expired"
        assert row["agent_id"] is None
        last = events(api, task["id"])[-1]
        assert (last["type"], last["from_status"], last["to_status"]) == (
            "attempt_failed",
            "running",
            "queued",
        )
        assert last["data"]["reason"] == "lease_expired"
        assert last["actor"] == "fleet"

        # Its lease ended: A is fenced already, before anyone else took the task.
        assert_fenced(api, st.db, a["agent_token"], task["id"], lease_a)

        # B takes attempt 2 once the backoff is over (the clock moved with the sweep).
        not_before = when(row["not_before"])
        assert dequeue(api, b["agent_token"]) is None  # the backoff is honoured
        claimed = claim_at(st.db, st.settings, b["agent"]["id"], not_before + SECOND)
        assert claimed is not None and claimed[0] == task["id"]
        lease_b = claimed[1]
        assert lease_b != lease_a

        # A, still alive, writes with its old lease while B holds the task: all refused, and
        # its heartbeat is told the lease is stale instead of renewing it.
        assert_fenced(api, st.db, a["agent_token"], task["id"], lease_a)
        held_by_b = task_row(api, task["id"])
        beat = api.post(
            "/agents/heartbeat",
            json={"leases": [{"task_id": task["id"], "lease_token": lease_a}]},
            token=a["agent_token"],
        )
        assert beat.status_code == 200, beat.get_json()
        assert beat.get_json()["stale_task_ids"] == [task["id"]]
        assert task_row(api, task["id"]) == held_by_b
        # A's lease does not work for B either: a lease belongs to one attempt of one agent.
        assert_fenced(api, st.db, b["agent_token"], task["id"], lease_a)

        done = api.post(
            f"/tasks/{task['id']}/complete",
            json={"lease_token": lease_b, "receipt": {"exit_code": 0, "summary": "ok"}},
            token=b["agent_token"],
        )
        assert done.status_code == 200, done.get_json()
        assert done.get_json()["status"] == "completed"
        assert done.get_json()["agent_id"] == b["agent"]["id"]
        assert done.get_json()["receipt"]["summary"] == "ok"

        # After the end, the zombie is still refused as stale (not 404: it did hold the task).
        assert_fenced(api, st.db, a["agent_token"], task["id"], lease_a)
        types = [e["type"] for e in events(api, task["id"])]
        assert types == [
            "created",
            "dispatched",
            "started",
            "attempt_failed",
            "dispatched",
            "completed",
        ]
        assert_log_replays(st.db)


def test_fencing_in_real_time_through_dequeue(tmp_path: Path, database_url: str) -> None:
    """The same story on the wall clock: a 2 s lease runs out, the sweep (run at the real time)
    requeues the task, and B long-polls dequeue until the 1 s backoff is over."""
    with stack(tmp_path, database_url, lease_secs=2, retry_backoff_base_secs=1) as st:
        api = st.api
        task = new_task(api)
        a = api.register("zombie")
        b = api.register("successor")
        got = dequeue(api, a["agent_token"])
        assert got is not None
        lease_a = got["lease"]["token"]
        expires = when(got["lease"]["expires_at"])

        # Expired but not yet swept: the task is still A's, yet A's lease no longer works.
        wait_until(lambda: utcnow() > expires, timeout=5, what="the lease to expire")
        assert_fenced(api, st.db, a["agent_token"], task["id"], lease_a)

        assert run_sweep(st.db, st.settings, sweeps.expired_leases, utcnow()) == 1
        got_b = dequeue(api, b["agent_token"], wait_secs=10)
        assert got_b is not None and got_b["task"]["id"] == task["id"]
        assert got_b["lease"]["attempt"] == 2
        lease_b = got_b["lease"]["token"]
        done = api.post(
            f"/tasks/{task['id']}/complete",
            json={"lease_token": lease_b, "receipt": {"exit_code": 0}},
            token=b["agent_token"],
        )
        assert done.status_code == 200, done.get_json()
        assert done.get_json()["status"] == "completed"
        assert_fenced(api, st.db, a["agent_token"], task["id"], lease_a)
        assert_log_replays(st.db)
