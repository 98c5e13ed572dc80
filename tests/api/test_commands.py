"""Commands: enqueue (allowlist), delivery in heartbeat replies (once, again only after the
redelivery window), ack, complete with a success flag and a result, expiry."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from fleet_common import sweeps
from fleet_common.agents import commands
from fleet_common.db import utcnow
from tests.api_helpers import (
    Api,
    assert_error,
    row_counts,
    run_sweep,
    stack,
)


def beat(api: Api, token: str) -> list[dict[str, Any]]:
    response = api.post("/agents/heartbeat", json={}, token=token)
    assert response.status_code == 200, response.get_json()
    return list(response.get_json()["commands"])


def listed(api: Api, agent_id: str) -> dict[str, dict[str, Any]]:
    response = api.get(f"/agents/{agent_id}/commands")
    assert response.status_code == 200, response.get_json()
    return {c["id"]: c for c in response.get_json()}


def test_command_lifecycle(tmp_path: Path, database_url: str) -> None:
    with stack(tmp_path, database_url) as st:
        api = st.api
        reg = api.register("builder")
        agent_id, token = reg["agent"]["id"], reg["agent_token"]
        restart = api.post(f"/agents/{agent_id}/commands", json={"kind": "restart"})
        assert restart.status_code == 201, restart.get_json()
        cmd = restart.get_json()
        assert (cmd["kind"], cmd["status"], cmd["payload"]) == ("restart", "pending", {})
        upgrade = api.post(
            f"/agents/{agent_id}/commands", json={"kind": "upgrade", "payload": {"version": "2.0"}}
        ).get_json()

        delivered = beat(api, token)
        assert [(c["id"], c["kind"], c["payload"]) for c in delivered] == [
            (cmd["id"], "restart", {}),
            (upgrade["id"], "upgrade", {"version": "2.0"}),
        ]
        assert beat(api, token) == []  # not again within the redelivery window
        assert listed(api, agent_id)[cmd["id"]]["delivered_at"] is not None

        acked = api.post(f"/agents/commands/{cmd['id']}/ack", json={}, token=token)
        assert acked.status_code == 200, acked.get_json()
        assert acked.get_json()["status"] == "acknowledged"
        again = api.post(f"/agents/commands/{cmd['id']}/ack", json={}, token=token)
        assert again.status_code == 200 and again.get_json()["status"] == "acknowledged"

        done = api.post(
            f"/agents/commands/{cmd['id']}/complete",
            json={"success": True, "result": {"restarted_at": "now", "pid": 42}},
            token=token,
        )
        assert done.status_code == 200, done.get_json()
        assert done.get_json()["status"] == "completed"
        # A failure is reachable, straight from pending too, and keeps its result.
        failed = api.post(
            f"/agents/commands/{upgrade['id']}/complete",
            json={"success": False, "result": {"error": "no such version"}},
            token=token,
        )
        assert failed.status_code == 200, failed.get_json()
        assert failed.get_json()["status"] == "failed"

        history = listed(api, agent_id)
        assert history[cmd["id"]]["status"] == "completed"
        assert history[cmd["id"]]["success"] is True
        assert history[cmd["id"]]["result"] == {"restarted_at": "now", "pid": 42}
        assert history[cmd["id"]]["acknowledged_at"] is not None
        assert history[cmd["id"]]["completed_at"] is not None
        assert history[upgrade["id"]]["status"] == "failed"
        assert history[upgrade["id"]]["success"] is False
        assert history[upgrade["id"]]["result"] == {"error": "no such version"}
        only_failed = api.get(f"/agents/{agent_id}/commands?status=failed").get_json()
        assert [c["id"] for c in only_failed] == [upgrade["id"]]

        # Finished commands cannot be acknowledged or completed again.
        for finished in (cmd["id"], upgrade["id"]):
            ack = api.post(f"/agents/commands/{finished}/ack", json={}, token=token)
            assert_error(ack, 409, "illegal_transition")
            end = api.post(
                f"/agents/commands/{finished}/complete", json={"success": True}, token=token
            )
            assert_error(end, 409, "illegal_transition")
        assert listed(api, agent_id) == history
        assert beat(api, token) == []


def test_unacknowledged_commands_are_redelivered(client: Any, admin_token: str, db: Any) -> None:
    """Handed out once; one not acknowledged within the redelivery window (a lease period) is
    handed out again, an acknowledged one never. The clock is moved through the service."""
    api = Api(client, admin_token)
    reg = api.register("builder")
    agent_id, token = reg["agent"]["id"], reg["agent_token"]
    first = api.post(f"/agents/{agent_id}/commands", json={"kind": "restart"}).get_json()
    second = api.post(
        f"/agents/{agent_id}/commands", json={"kind": "cancel_task", "payload": {"task_id": "x"}}
    ).get_json()
    assert [c["id"] for c in beat(api, token)] == [first["id"], second["id"]]
    assert beat(api, token) == []
    ack = api.post(f"/agents/commands/{second['id']}/ack", json={}, token=token)
    assert ack.status_code == 200

    delivered_at = dt.datetime.fromisoformat(listed(api, agent_id)[first["id"]]["delivered_at"])
    orch = client.application.extensions["fleet"].settings.orchestrator
    window = dt.timedelta(seconds=orch.lease_secs)
    with db.session() as session:
        assert commands.deliver(session, orch, agent_id, now=delivered_at + window / 2) == []
    with db.session() as session:
        again = commands.deliver(session, orch, agent_id, now=delivered_at + window * 1.5)
        assert [c.id for c in again] == [first["id"]]
    assert listed(api, agent_id)[first["id"]]["status"] == "pending"


def test_pending_commands_expire(tmp_path: Path, database_url: str) -> None:
    with stack(tmp_path, database_url) as st:
        api = st.api
        reg = api.register("builder")
        agent_id, token = reg["agent"]["id"], reg["agent_token"]
        stale = api.post(f"/agents/{agent_id}/commands", json={"kind": "restart"}).get_json()
        taken = api.post(f"/agents/{agent_id}/commands", json={"kind": "restart"}).get_json()
        assert len(beat(api, token)) == 2
        assert (
            api.post(f"/agents/commands/{taken['id']}/ack", json={}, token=token).status_code == 200
        )

        expires = dt.datetime.fromisoformat(stale["expires_at"])
        assert expires - utcnow() <= dt.timedelta(seconds=st.orch.command_ttl_secs)
        second = dt.timedelta(seconds=1)
        assert run_sweep(st.db, st.settings, sweeps.expired_commands, expires - second) == 0
        assert run_sweep(st.db, st.settings, sweeps.expired_commands, expires + second) == 1
        history = listed(api, agent_id)
        assert history[stale["id"]]["status"] == "expired"
        assert history[taken["id"]]["status"] == "acknowledged"  # acknowledged: not expired
        assert_error(
            api.post(f"/agents/commands/{stale['id']}/ack", json={}, token=token),
            409,
            "illegal_transition",
        )
        done = api.post(
            f"/agents/commands/{taken['id']}/complete", json={"success": True}, token=token
        )
        assert done.status_code == 200 and done.get_json()["status"] == "completed"


def test_commands_outside_the_allowlist_are_refused(client: Any, admin_token: str, db: Any) -> None:
    api = Api(client, admin_token)
    reg = api.register("builder")
    agent_id = reg["agent"]["id"]
    before = row_counts(db)
    bodies: list[dict[str, Any]] = [
        {"kind": "shell", "payload": {"cmd": "rm -rf /"}},
        {"kind": "DRAIN"},
        {"kind": "upgrade"},  # needs payload.version
        {"kind": "upgrade", "payload": {"version": 2}},
        {"kind": "cancel_task", "payload": {}},
        {"kind": ""},
        {"kind": 5},
        {"payload": {}},
        {"kind": "restart", "payload": "now"},
    ]
    for body in bodies:
        assert_error(api.post(f"/agents/{agent_id}/commands", json=body), 422)
    assert row_counts(db) == before
    assert api.get(f"/agents/{agent_id}").get_json()["desired_state"] == "active"
    assert_error(api.post("/agents/agt_nope/commands", json={"kind": "restart"}), 404)
    assert_error(api.get("/agents/agt_nope/commands"), 404)
