"""Agent token rotation (a grace period for the old token) and agent deletion (tokens revoked,
tasks requeued, commands expired)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from fleet_common.auth import service as auth
from fleet_common.db import utcnow
from fleet_common.errors import Unauthorized
from tests.api_helpers import (
    Api,
    assert_error,
    assert_log_replays,
    dequeue,
    new_task,
    stack,
    task_row,
    wait_until,
)


def works(api: Api, token: str) -> bool:
    code = api.post("/agents/heartbeat", json={}, token=token).status_code
    assert code in (200, 401), code
    return code == 200


def test_rotation_keeps_the_old_token_for_the_grace_period(
    tmp_path: Path, database_url: str
) -> None:
    grace = dt.timedelta(seconds=2)
    with stack(tmp_path, database_url, token_rotation_grace_secs=2) as st:
        api = st.api
        reg = api.register("builder")
        agent_id, old = reg["agent"]["id"], reg["agent_token"]

        rotated = api.post(f"/agents/{agent_id}/rotate-token", token=old)
        assert rotated.status_code == 201, rotated.get_json()
        new = rotated.get_json()["agent_token"]
        assert new.startswith("flt_") and new != old
        assert works(api, new)
        assert works(api, old)  # within the grace period
        wait_until(lambda: not works(api, old), timeout=15, what="the old token to expire")
        assert_error(api.post("/agents/heartbeat", json={}, token=old), 401)
        assert works(api, new)

        # An operator can rotate too; the agent's current token then gets the grace period
        # (its end checked with the clock moved, through the service).
        by_admin = api.post(f"/agents/{agent_id}/rotate-token")
        assert by_admin.status_code == 201
        newest = by_admin.get_json()["agent_token"]
        assert works(api, newest) and works(api, new)
        after = utcnow() + grace + dt.timedelta(seconds=1)
        with st.db.session() as session:
            assert auth.authenticate(session, newest, now=after).agent_id == agent_id
            with pytest.raises(Unauthorized):
                auth.authenticate(session, new, now=after)
        assert_error(api.post("/agents/agt_nope/rotate-token"), 404)


def test_deleting_an_agent_revokes_its_tokens_and_requeues_its_tasks(
    tmp_path: Path, database_url: str
) -> None:
    with stack(tmp_path, database_url) as st:
        api = st.api
        reg = api.register("doomed")
        agent_id, first = reg["agent"]["id"], reg["agent_token"]
        second = api.post(f"/agents/{agent_id}/rotate-token", token=first).get_json()["agent_token"]
        assert works(api, first) and works(api, second)
        task = new_task(api)
        got = dequeue(api, second)
        assert got is not None and got["task"]["id"] == task["id"]
        cmd = api.post(f"/agents/{agent_id}/commands", json={"kind": "restart"}).get_json()
        commands_before = api.get(f"/agents/{agent_id}/commands").get_json()

        assert api.delete(f"/agents/{agent_id}").status_code == 204
        assert not works(api, first) and not works(api, second)
        assert_error(
            api.post(
                f"/tasks/{task['id']}/complete",
                json={"lease_token": got["lease"]["token"], "receipt": {"exit_code": 0}},
                token=second,
            ),
            401,
        )
        row = task_row(api, task["id"])
        assert (row["status"], row["attempt"], row["failure_reason"], row["agent_id"]) == (
            "queued",
            2,
            "agent_lost",
            None,
        )
        for path in (f"/agents/{agent_id}", f"/agents/{agent_id}/commands"):
            assert_error(api.get(path), 404)
        assert_error(api.delete(f"/agents/{agent_id}"), 404)
        assert_error(api.patch(f"/agents/{agent_id}", json={"name": "back"}), 404)
        assert_error(api.post(f"/agents/{agent_id}/rotate-token"), 404)
        assert agent_id not in [a["id"] for a in api.get("/agents").get_json()]
        assert [c["id"] for c in commands_before] == [cmd["id"]]

        # The same host registering again is a new agent.
        again = api.register("doomed")
        assert again["agent"]["id"] != agent_id
        assert_log_replays(st.db)
