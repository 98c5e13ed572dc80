"""Lost agents: a silent agent goes offline, its task fails ``agent_lost`` and another agent
finishes it. Offline, draining, disabled and deleted agents receive nothing new."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from fleet_common import sweeps
from fleet_common.db import utcnow
from tests.api_helpers import (
    assert_error,
    assert_log_replays,
    claim_at,
    dequeue,
    events,
    new_task,
    run_sweep,
    stack,
    task_row,
)

SECOND = dt.timedelta(seconds=1)


def test_silent_agent_goes_offline_and_its_task_is_finished_elsewhere(
    tmp_path: Path, database_url: str
) -> None:
    with stack(tmp_path, database_url) as st:
        api = st.api
        window = dt.timedelta(seconds=st.orch.offline_after_secs)
        task = new_task(api)
        lost = api.register("lost")
        other = api.register("other")
        got = dequeue(api, lost["agent_token"])
        assert got is not None and got["task"]["id"] == task["id"]
        heartbeat_at = dt.datetime.fromisoformat(
            api.get(f"/agents/{lost['agent']['id']}").get_json()["last_heartbeat_at"]
        )

        # Inside the window nothing happens; past it the silent agent goes offline.
        assert run_sweep(st.db, st.settings, sweeps.offline_agents, heartbeat_at + window) == 0
        later = utcnow() + window + SECOND
        assert run_sweep(st.db, st.settings, sweeps.offline_agents, later) == 2
        assert api.get(f"/agents/{lost['agent']['id']}").get_json()["status"] == "offline"

        row = task_row(api, task["id"])
        assert row["status"] == "queued"
        assert row["attempt"] == 2
        assert row["failure_reason"] == "agent_lost"
        assert row["agent_id"] is None
        last = events(api, task["id"])[-1]
        assert last["type"] == "attempt_failed" and last["data"]["reason"] == "agent_lost"

        # The other agent was silent too; its heartbeat brings it back online (and only it).
        beat = api.post("/agents/heartbeat", json={}, token=other["agent_token"])
        assert beat.status_code == 200
        assert beat.get_json()["agent"]["status"] == "online"
        assert api.get(f"/agents/{lost['agent']['id']}").get_json()["status"] == "offline"

        claimed = claim_at(
            st.db, st.settings, other["agent"]["id"], dt.datetime.fromisoformat(row["not_before"])
        )
        assert claimed is not None and claimed[0] == task["id"]
        done = api.post(
            f"/tasks/{task['id']}/complete",
            json={"lease_token": claimed[1], "receipt": {"exit_code": 0}},
            token=other["agent_token"],
        )
        assert done.status_code == 200, done.get_json()
        assert done.get_json()["status"] == "completed"
        assert done.get_json()["agent_id"] == other["agent"]["id"]
        # The lost agent's late report is fenced.
        late = api.post(
            f"/tasks/{task['id']}/complete",
            json={"lease_token": got["lease"]["token"], "receipt": {"exit_code": 0}},
            token=lost["agent_token"],
        )
        assert_error(late, 409, "stale_lease")
        assert_log_replays(st.db)


def test_ineligible_agents_get_nothing(tmp_path: Path, database_url: str) -> None:
    with stack(tmp_path, database_url) as st:
        api = st.api
        offline = api.register("offline")
        # Silence everyone registered so far, then register the rest.
        later = utcnow() + dt.timedelta(seconds=st.orch.offline_after_secs + 1)
        assert run_sweep(st.db, st.settings, sweeps.offline_agents, later) == 1
        draining = api.register("draining")
        disabled = api.register("disabled")
        deleted = api.register("deleted")
        active = api.register("active")
        drain = api.post(f"/agents/{draining['agent']['id']}/commands", json={"kind": "drain"})
        assert drain.status_code == 201, drain.get_json()
        patch = api.patch(f"/agents/{disabled['agent']['id']}", json={"desired_state": "disabled"})
        assert patch.status_code == 200 and patch.get_json()["desired_state"] == "disabled"
        assert api.delete(f"/agents/{deleted['agent']['id']}").status_code == 204

        task = new_task(api)
        for agent in (offline, draining, disabled):
            assert dequeue(api, agent["agent_token"]) is None, agent["agent"]
        assert dequeue(api, draining["agent_token"], wait_secs=1) is None  # long-polls too
        # A deleted agent's tokens are revoked, so it cannot even ask; the claim itself
        # refuses it too.
        assert_error(api.post("/tasks/dequeue", json={}, token=deleted["agent_token"]), 401)
        assert claim_at(st.db, st.settings, deleted["agent"]["id"], utcnow()) is None
        assert task_row(api, task["id"])["status"] == "queued"

        # The task was eligible all along: an active agent gets it.
        got = dequeue(api, active["agent_token"])
        assert got is not None and got["task"]["id"] == task["id"]
        assert_log_replays(st.db)


def test_deregister_requeues_held_tasks(tmp_path: Path, database_url: str) -> None:
    with stack(tmp_path, database_url) as st:
        api = st.api
        task = new_task(api)
        leaving = api.register("leaving")
        got = dequeue(api, leaving["agent_token"])
        assert got is not None
        bye = api.post("/agents/deregister", token=leaving["agent_token"])
        assert bye.status_code == 200, bye.get_json()
        assert bye.get_json()["status"] == "offline"
        row = task_row(api, task["id"])
        assert (row["status"], row["attempt"], row["failure_reason"]) == ("queued", 2, "agent_lost")
        # Offline now: nothing new until it heartbeats again.
        new_task(api, title="another")
        assert dequeue(api, leaving["agent_token"]) is None
        assert_log_replays(st.db)
