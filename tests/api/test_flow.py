"""The core flow through the API on both backends: submit, register, dequeue, run, complete."""

from __future__ import annotations

from typing import Any

from tests.api_helpers import Api


def test_submit_dequeue_complete(client: Any, admin_token: str) -> None:
    api = Api(client, admin_token)
    created = api.post("/tasks", json={"title": "fix it", "labels": ["agent:code:python", "bug"]})
    assert created.status_code == 201, created.get_json()
    task = created.get_json()
    assert task["status"] == "queued"
    assert task["requirements"] == ["code:python"]
    assert task["warnings"] and task["warnings"][0].startswith("no_capable_agent")

    reg = api.register("a1", ["code:python", "tests"])
    agent_token = reg["agent_token"]
    assert agent_token.startswith("flt_")

    got = api.post("/tasks/dequeue", json={"wait_secs": 0}, token=agent_token)
    assert got.status_code == 200, got.get_json()
    body = got.get_json()
    assert body["task"]["id"] == task["id"]
    lease = body["lease"]["token"]
    assert api.post("/tasks/dequeue", json={}, token=agent_token).status_code == 204

    status = api.post(
        f"/tasks/{task['id']}/status",
        json={"lease_token": lease, "status": "running"},
        token=agent_token,
    )
    assert status.status_code == 200, status.get_json()
    assert status.get_json()["cancel_requested"] is False
    log = api.post(
        f"/tasks/{task['id']}/logs",
        json={"lease_token": lease, "seq": 0, "data": "hello\n"},
        token=agent_token,
    )
    assert log.status_code == 200
    done = api.post(
        f"/tasks/{task['id']}/complete",
        json={"lease_token": lease, "receipt": {"exit_code": 0, "summary": "ok"}},
        token=agent_token,
    )
    assert done.status_code == 200, done.get_json()
    assert done.get_json()["status"] == "completed"

    events = api.get(f"/tasks/{task['id']}/events").get_json()
    assert [e["type"] for e in events] == ["created", "dispatched", "started", "completed"]
    logs = api.get(f"/tasks/{task['id']}/logs?offset=0").get_json()
    assert logs == {"offset": 0, "next_offset": 6, "data": "hello\n", "complete": True}
    listing = api.get("/tasks?status=completed")
    assert listing.status_code == 200
    assert [t["id"] for t in listing.get_json()] == [task["id"]]
    assert '"total": 1' in listing.headers["X-Pagination"]


def test_capability_warning_only_when_no_live_agent_can_serve(
    client: Any, admin_token: str
) -> None:
    api = Api(client, admin_token)

    def warnings(labels: list[str], **extra: Any) -> list[str]:
        created = api.post("/tasks", json={"title": "t", "labels": labels, **extra})
        assert created.status_code == 201, created.get_json()
        return list(created.get_json()["warnings"])

    assert warnings([])  # no agent at all
    first = api.register("a1", ["code:python", "tests"])["agent"]["id"]
    api.register("a2", ["code:go"])
    assert warnings([]) == []
    assert warnings(["agent:code:python", "agent:tests"]) == []
    assert warnings(["agent:code:go"]) == []
    assert warnings(["agent:code:python", "agent:code:go"])  # no single agent has both
    assert warnings(["agent:code:go"], assigned_agent_id=first)  # not the assigned one
    assert api.patch(f"/agents/{first}", json={"desired_state": "disabled"}).status_code == 200
    assert warnings(["agent:code:python"])  # its only server is disabled
