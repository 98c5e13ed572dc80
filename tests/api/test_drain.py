"""Drain sticks: an operator's drain holds however often the agent heartbeats, re-registers or
says otherwise; only an operator (resume, PATCH) makes it active again."""

from __future__ import annotations

from typing import Any

from tests.api_helpers import Api, assert_log_replays, dequeue, new_task, task_row


def heartbeat(api: Api, token: str, **body: Any) -> dict[str, Any]:
    response = api.post("/agents/heartbeat", json=body, token=token)
    assert response.status_code == 200, response.get_json()
    return dict(response.get_json())


def desired(api: Api, agent_id: str) -> str:
    return str(api.get(f"/agents/{agent_id}").get_json()["desired_state"])


def test_drain_command_sticks_until_resume(client: Any, admin_token: str, db: Any) -> None:
    api = Api(client, admin_token)
    reg = api.register("builder", host_uid="host-1")
    agent_id, token = reg["agent"]["id"], reg["agent_token"]
    task = new_task(api)

    drain = api.post(f"/agents/{agent_id}/commands", json={"kind": "drain"})
    assert drain.status_code == 201, drain.get_json()
    assert desired(api, agent_id) == "draining"

    first = heartbeat(api, token)
    assert first["desired_state"] == "draining"
    assert first["agent"]["desired_state"] == "draining"
    assert [(c["id"], c["kind"]) for c in first["commands"]] == [(drain.get_json()["id"], "drain")]
    for _ in range(5):
        # The agent claims to be active every way it can; none of it counts.
        reply = heartbeat(api, token, desired_state="active", metadata={"desired_state": "active"})
        assert reply["desired_state"] == "draining"
        assert reply["commands"] == []  # delivered once
        assert dequeue(api, token) is None
    assert desired(api, agent_id) == "draining"

    # Re-registering the same host does not undo the drain either.
    again = api.register("builder", host_uid="host-1")
    assert again["agent"]["id"] == agent_id
    assert again["agent"]["desired_state"] == "draining"
    token = again["agent_token"]
    assert dequeue(api, token) is None
    assert task_row(api, task["id"])["status"] == "queued"

    resume = api.post(f"/agents/{agent_id}/commands", json={"kind": "resume"})
    assert resume.status_code == 201
    reply = heartbeat(api, token)
    assert reply["desired_state"] == "active"
    assert [c["kind"] for c in reply["commands"]] == ["resume"]
    got = dequeue(api, token)
    assert got is not None and got["task"]["id"] == task["id"]
    assert_log_replays(db)


def test_draining_agent_finishes_what_it_holds(client: Any, admin_token: str, db: Any) -> None:
    api = Api(client, admin_token)
    reg = api.register("builder")
    agent_id, token = reg["agent"]["id"], reg["agent_token"]
    task = new_task(api)
    new_task(api, title="next")
    got = dequeue(api, token)
    assert got is not None
    lease = got["lease"]["token"]
    assert api.post(f"/agents/{agent_id}/commands", json={"kind": "drain"}).status_code == 201

    reply = heartbeat(api, token, leases=[{"task_id": task["id"], "lease_token": lease}])
    assert reply["stale_task_ids"] == []  # its lease is still renewed
    assert dequeue(api, token) is None
    done = api.post(
        f"/tasks/{task['id']}/complete",
        json={"lease_token": lease, "receipt": {"exit_code": 0}},
        token=token,
    )
    assert done.status_code == 200 and done.get_json()["status"] == "completed"
    assert dequeue(api, token) is None  # idle now, still draining
    assert_log_replays(db)


def test_patch_desired_state(client: Any, admin_token: str, db: Any) -> None:
    api = Api(client, admin_token)
    reg = api.register("builder")
    agent_id, token = reg["agent"]["id"], reg["agent_token"]
    new_task(api)
    for state in ("draining", "disabled"):
        patched = api.patch(f"/agents/{agent_id}", json={"desired_state": state})
        assert patched.status_code == 200, patched.get_json()
        assert patched.get_json()["desired_state"] == state
        for _ in range(3):
            assert heartbeat(api, token, desired_state="active")["desired_state"] == state
            assert dequeue(api, token) is None
        assert desired(api, agent_id) == state
    patched = api.patch(f"/agents/{agent_id}", json={"desired_state": "active"})
    assert patched.status_code == 200
    assert heartbeat(api, token)["desired_state"] == "active"
    assert dequeue(api, token) is not None
    assert_log_replays(db)
