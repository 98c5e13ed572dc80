"""Bad input gets a 4xx in the one error shape and stores nothing; unknown fields are ignored;
illegal transitions are 409 ``illegal_transition`` without an event; Idempotency-Key replays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.api_helpers import (
    Api,
    assert_error,
    assert_log_replays,
    dequeue,
    events,
    new_task,
    snapshot,
    stack,
    task_row,
)

LEASE = "fll_not-checked-before-validation"


def admin_cases(task_id: str, agent_id: str) -> list[tuple[str, str, dict[str, Any], int]]:
    """(method, path, request kwargs, expected status) for admin endpoints."""
    json_type = {"Content-Type": "application/json"}
    return [
        ("post", "/tasks", {"json": {}}, 422),
        ("post", "/tasks", {"json": {"title": 5}}, 422),
        ("post", "/tasks", {"json": {"title": ""}}, 422),
        ("post", "/tasks", {"json": {"title": None}}, 422),
        ("post", "/tasks", {"json": {"title": "t", "labels": "bug"}}, 422),
        ("post", "/tasks", {"json": {"title": "t", "labels": [1]}}, 422),
        ("post", "/tasks", {"json": {"title": "t", "priority": "high"}}, 422),
        ("post", "/tasks", {"json": {"title": "t", "priority": 1.5}}, 422),
        ("post", "/tasks", {"json": {"title": "t", "max_retries": -1}}, 422),
        ("post", "/tasks", {"json": {"title": "t", "timeout_secs": 0}}, 422),
        ("post", "/tasks", {"json": {"title": "t", "repo": "no-slash"}}, 422),
        ("post", "/tasks", {"json": {"title": "t", "requires_pr": "maybe"}}, 422),
        ("post", "/tasks", {"json": {"title": "t", "labels": ["agent:bad cap"]}}, 422),
        ("post", "/tasks", {"json": {"title": "t", "labels": ["agent:a+b"]}}, 422),
        (
            "post",
            "/tasks",
            {"json": {"title": "t", "labels": [f"agent:c{i}" for i in range(4)]}},
            422,
        ),
        ("post", "/tasks", {"json": {"title": "t", "assigned_agent_id": "agt_nope"}}, 422),
        ("post", "/tasks", {"json": {"title": "t\x00"}}, 422),
        ("post", "/tasks", {"json": ["title"]}, 422),
        ("post", "/tasks", {"json": "title"}, 422),
        ("post", "/tasks", {"data": "null", "headers": json_type}, 422),
        ("post", "/tasks", {"data": '{"title": "t"', "headers": json_type}, 400),
        ("post", "/tasks", {"data": b"\xff\xfe{}", "headers": json_type}, 400),
        (
            "post",
            "/tasks",
            {"json": {"title": "t"}, "headers": {"Idempotency-Key": "k" * 201}},
            422,
        ),
        ("post", "/tasks", {"json": {"title": "t"}, "headers": {"Idempotency-Key": ""}}, 422),
        ("get", "/tasks?status=bogus", {}, 422),
        ("get", "/tasks?page=0", {}, 422),
        ("get", "/tasks?page=abc", {}, 422),
        ("get", "/tasks?page_size=100000", {}, 422),
        ("get", f"/tasks/{task_id}/logs?offset=-1", {}, 422),
        ("get", f"/tasks/{task_id}/logs?offset=x", {}, 422),
        ("patch", f"/tasks/{task_id}", {"json": {"priority": "x"}}, 422),
        ("patch", f"/tasks/{task_id}", {"json": {"assigned_agent_id": "agt_nope"}}, 422),
        ("patch", f"/tasks/{task_id}", {"data": "{", "headers": json_type}, 400),
        ("patch", f"/agents/{agent_id}", {"json": {"desired_state": "sleeping"}}, 422),
        ("patch", f"/agents/{agent_id}", {"json": {"capabilities": ["bad cap"]}}, 422),
        ("patch", f"/agents/{agent_id}", {"json": {"capabilities": "code"}}, 422),
        ("patch", f"/agents/{agent_id}", {"json": {"name": ""}}, 422),
        ("get", "/agents?status=bogus", {}, 422),
        ("get", "/agents?mode=bogus", {}, 422),
        ("get", f"/agents/{agent_id}/commands?status=bogus", {}, 422),
        ("post", f"/agents/{agent_id}/commands", {"json": {"kind": "format-disk"}}, 422),
        ("post", f"/agents/{agent_id}/commands", {"json": {"kind": "drain", "payload": []}}, 422),
        ("post", "/join-tokens", {"json": {"ttl_secs": 0}}, 422),
        ("post", "/join-tokens", {"json": {"ttl_secs": "1h"}}, 422),
        ("post", "/join-tokens", {"data": "[", "headers": json_type}, 400),
        ("post", "/admin-tokens", {"json": {}}, 422),
        ("post", "/admin-tokens", {"json": {"name": ["x"]}}, 422),
    ]


def agent_cases(task_id: str, command_id: str) -> list[tuple[str, str, dict[str, Any], int]]:
    json_type = {"Content-Type": "application/json"}
    receipt = {"exit_code": 0}
    return [
        ("post", "/tasks/dequeue", {"json": {"wait_secs": 31}}, 422),
        ("post", "/tasks/dequeue", {"json": {"wait_secs": -1}}, 422),
        ("post", "/tasks/dequeue", {"json": {"wait_secs": "soon"}}, 422),
        ("post", "/tasks/dequeue", {"data": "{]", "headers": json_type}, 400),
        ("post", f"/tasks/{task_id}/status", {"json": {"status": "running"}}, 422),
        (
            "post",
            f"/tasks/{task_id}/status",
            {"json": {"lease_token": LEASE, "status": "completed"}},
            422,
        ),
        (
            "post",
            f"/tasks/{task_id}/status",
            {"json": {"lease_token": 5, "status": "running"}},
            422,
        ),
        ("post", f"/tasks/{task_id}/logs", {"json": {"lease_token": LEASE, "seq": 0}}, 422),
        (
            "post",
            f"/tasks/{task_id}/logs",
            {"json": {"lease_token": LEASE, "seq": -1, "data": "x"}},
            422,
        ),
        (
            "post",
            f"/tasks/{task_id}/logs",
            {"json": {"lease_token": LEASE, "seq": "first", "data": "x"}},
            422,
        ),
        ("post", f"/tasks/{task_id}/complete", {"json": {"lease_token": LEASE}}, 422),
        (
            "post",
            f"/tasks/{task_id}/complete",
            {"json": {"lease_token": LEASE, "receipt": {}}},
            422,
        ),
        *[
            (
                "post",
                f"/tasks/{task_id}/complete",
                {"json": {"lease_token": LEASE, "receipt": {**receipt, **bad}}},
                422,
            )
            for bad in (
                {"exit_code": "zero"},
                {"tests": {"passed": -1}},
                {"tests": [1, 2]},
                {"tokens": {"input": "many"}},
                {"commit_sha": "not-a-sha"},
                {"pr_url": "not a url"},
                {"pr_number": 0},
                {"cost_usd": -1},
            )
        ],
        ("post", f"/tasks/{task_id}/fail", {"json": {"lease_token": LEASE}}, 422),
        (
            "post",
            f"/tasks/{task_id}/fail",
            {"json": {"lease_token": LEASE, "error": "e", "reason": "pr_closed"}},
            422,
        ),
        (
            "post",
            f"/tasks/{task_id}/fail",
            {"json": {"lease_token": LEASE, "error": "e", "retryable": "perhaps"}},
            422,
        ),
        ("post", "/receipts", {"json": {"lease_token": LEASE, "receipt": receipt}}, 422),
        ("post", "/agents/heartbeat", {"json": {"leases": "all"}}, 422),
        ("post", "/agents/heartbeat", {"json": {"leases": [{"task_id": 1}]}}, 422),
        ("post", "/agents/heartbeat", {"json": {"metadata": [1]}}, 422),
        ("post", "/agents/heartbeat", {"json": {"metadata": {"x": "y" * 20_000}}}, 422),
        ("post", "/agents/heartbeat", {"data": "{", "headers": json_type}, 400),
        ("post", f"/agents/commands/{command_id}/complete", {"json": {}}, 422),
        ("post", f"/agents/commands/{command_id}/complete", {"json": {"success": "perhaps"}}, 422),
        (
            "post",
            f"/agents/commands/{command_id}/complete",
            {"json": {"success": True, "result": "fine"}},
            422,
        ),
    ]


def test_bad_input_is_refused_in_one_shape_and_stores_nothing(
    client: Any, admin_token: str, db: Any
) -> None:
    api = Api(client, admin_token)
    agent = api.register("builder")
    token = agent["agent_token"]
    task = new_task(api)
    held = dequeue(api, token)
    assert held is not None
    queued = new_task(api, title="queued")
    command = api.post(f"/agents/{agent['agent']['id']}/commands", json={"kind": "restart"})
    assert command.status_code == 201
    before = snapshot(db)
    for method, path, kwargs, status in admin_cases(queued["id"], agent["agent"]["id"]):
        response = api.call(method, path, **kwargs)
        assert response.status_code == status, (method, path, kwargs, response.get_json())
        body = assert_error(response, status)
        if status == 422:
            assert "errors" in body or body["message"], body
    for method, path, kwargs, status in agent_cases(task["id"], command.get_json()["id"]):
        response = api.call(method, path, token=token, **kwargs)
        assert response.status_code == status, (method, path, kwargs, response.get_json())
        assert_error(response, status)
    assert snapshot(db) == before


def test_a_body_too_large_is_413(tmp_path: Path, database_url: str) -> None:
    with stack(tmp_path, database_url, server={"max_body_bytes": 4096}) as st:
        api = st.api
        agent = api.register("builder")
        task = new_task(api)
        held = dequeue(api, agent["agent_token"])
        assert held is not None
        before = snapshot(st.db)
        big = "x" * 5000
        assert_error(api.post("/tasks", json={"title": "t", "prompt": big}), 413)
        assert_error(
            api.post("/agents/register", json={"join_token": big, "name": "n"}, token=""), 413
        )
        log = {"lease_token": held["lease"]["token"], "seq": 0, "data": big}
        assert_error(
            api.post(f"/tasks/{task['id']}/logs", json=log, token=agent["agent_token"]), 413
        )
        assert snapshot(st.db) == before
        # Just under the limit is fine.
        ok = api.post("/tasks", json={"title": "t", "prompt": "x" * 3000})
        assert ok.status_code == 201, ok.get_json()


def test_unknown_fields_are_ignored(client: Any, admin_token: str) -> None:
    api = Api(client, admin_token)
    created = api.post("/tasks", json={"title": "t", "colour": "blue", "v2": {"x": 1}})
    assert created.status_code == 201, created.get_json()
    assert "colour" not in created.get_json()
    agent = api.register("builder", future_field=[1, 2])
    token = agent["agent_token"]
    beat = api.post("/agents/heartbeat", json={"leases": [], "gpu": "a100"}, token=token)
    assert beat.status_code == 200, beat.get_json()
    got = api.post("/tasks/dequeue", json={"wait_secs": 0, "batch": 3}, token=token)
    assert got.status_code == 200, got.get_json()
    lease = got.get_json()["lease"]["token"]
    task_id = got.get_json()["task"]["id"]
    status = api.post(
        f"/tasks/{task_id}/status",
        json={"lease_token": lease, "status": "running", "progress": 0.5},
        token=token,
    )
    assert status.status_code == 200, status.get_json()
    done = api.post(
        f"/tasks/{task_id}/complete",
        json={"lease_token": lease, "receipt": {"exit_code": 0, "duration_ms": 5}, "extra": 1},
        token=token,
    )
    assert done.status_code == 200, done.get_json()
    assert "duration_ms" not in done.get_json()["receipt"]


def test_illegal_transitions_are_409_and_write_no_event(
    client: Any, admin_token: str, db: Any
) -> None:
    api = Api(client, admin_token)
    agent = api.register("builder")
    token = agent["agent_token"]
    done = new_task(api, title="done")
    got = dequeue(api, token)
    assert got is not None
    finish = api.post(
        f"/tasks/{done['id']}/complete",
        json={"lease_token": got["lease"]["token"], "receipt": {"exit_code": 0}},
        token=token,
    )
    assert finish.status_code == 200
    running = new_task(api, title="running")
    got = dequeue(api, token)
    assert got is not None and got["task"]["id"] == running["id"]
    start = api.post(
        f"/tasks/{running['id']}/status",
        json={"lease_token": got["lease"]["token"], "status": "running"},
        token=token,
    )
    assert start.status_code == 200
    queued = new_task(api, title="queued")
    cancelled = new_task(api, title="cancelled")
    assert api.post(f"/tasks/{cancelled['id']}/cancel").status_code == 200

    attempts: list[tuple[str, str, dict[str, Any]]] = [
        ("post", f"/tasks/{done['id']}/cancel", {}),
        ("post", f"/tasks/{done['id']}/retry", {}),
        ("patch", f"/tasks/{done['id']}", {"json": {"priority": 5}}),
        ("post", f"/tasks/{queued['id']}/retry", {}),
        ("post", f"/tasks/{running['id']}/retry", {}),
        ("patch", f"/tasks/{running['id']}", {"json": {"priority": 5}}),
        ("patch", f"/tasks/{running['id']}", {"json": {"assigned_agent_id": None}}),
        ("post", f"/tasks/{cancelled['id']}/cancel", {}),
        ("post", f"/tasks/{cancelled['id']}/retry", {}),
        ("patch", f"/tasks/{cancelled['id']}", {"json": {"priority": 5}}),
    ]
    before = snapshot(db)
    for method, path, kwargs in attempts:
        assert_error(api.call(method, path, **kwargs), 409, "illegal_transition")
    assert snapshot(db) == before
    assert [e["type"] for e in events(api, done["id"])] == ["created", "dispatched", "completed"]
    assert task_row(api, running["id"])["status"] == "running"
    for path in ("/tasks/tsk_nope/cancel", "/tasks/tsk_nope/retry"):
        assert_error(api.post(path), 404)
    assert_error(api.patch("/tasks/tsk_nope", json={"priority": 1}), 404)
    assert_log_replays(db)


@pytest.mark.parametrize("body_change", [{"title": "other"}, {"priority": 3}, {"labels": ["x"]}])
def test_idempotency_key(
    client: Any, admin_token: str, db: Any, body_change: dict[str, Any]
) -> None:
    api = Api(client, admin_token)
    body = {"title": "once", "labels": ["agent:code:python"]}
    key = {"Idempotency-Key": "issue-42"}
    first = api.post("/tasks", json=body, headers=key)
    assert first.status_code == 201, first.get_json()
    before = snapshot(db)
    replay = api.post("/tasks", json=body, headers=key)
    assert replay.status_code == 200, replay.get_json()
    assert replay.get_json()["id"] == first.get_json()["id"]
    assert snapshot(db) == before
    conflict = api.post("/tasks", json={**body, **body_change}, headers=key)
    assert_error(conflict, 409, "idempotency_conflict")
    assert snapshot(db) == before
    # Another key is another task.
    other = api.post("/tasks", json=body, headers={"Idempotency-Key": "issue-43"})
    assert other.status_code == 201
    assert other.get_json()["id"] != first.get_json()["id"]


def test_malformed_json_says_so(client: Any, admin_token: str) -> None:
    api = Api(client, admin_token)
    response = api.post("/tasks", data="{oops", headers={"Content-Type": "application/json"})
    body = assert_error(response, 400)
    assert body["message"] == "the request body is not valid JSON"


def test_values_no_database_can_take_are_4xx_not_500(
    client: Any, admin_token: str, db: Any
) -> None:
    """NUL characters (PostgreSQL refuses them in text and JSON) and numbers beyond any
    database integer, wherever a request can carry them."""
    api = Api(client, admin_token)
    agent = api.register("builder")
    new_task(api)
    before = snapshot(db)
    for path in ("/tasks/a%00b", "/tasks/a%00b/events", "/agents/a%00b", "/agents/a%00/commands"):
        response = api.get(path)
        assert response.status_code in (404, 422), (path, response.status_code)
        assert_error(response, response.status_code)
    for path in ("/tasks?repo=a%00b", "/tasks?label=%00", "/agents?capability=%00"):
        assert_error(api.get(path), 422)
    bodies = [
        {"title": "t", "prompt": "a\x00b"},
        {"title": "t", "labels": ["ok", "b\x00"]},
    ]
    for body in bodies:
        assert_error(api.post("/tasks", json=body), 422)
    nul_meta = {"metadata": {"k\x00": "v"}}
    assert_error(api.post("/agents/heartbeat", json=nul_meta, token=agent["agent_token"]), 422)
    assert snapshot(db) == before
    for page in ("2", "9223372036854775807", "99999999999999999999999"):
        for path in ("/tasks", "/agents", "/join-tokens", "/admin-tokens"):
            response = api.get(f"{path}?page={page}")
            assert response.status_code == 200, (path, page, response.get_json())
            assert response.get_json() == []
    keyed = api.post("/tasks", json={"title": "t"}, headers={"Idempotency-Key": "a\x00b"})
    assert keyed.status_code in (201, 422), keyed.get_json()
