"""Registration: the agent token is kept in ``<state-dir>/agent.json`` (0600) and reused by a
restart, which needs no join token; a refused registration exits non-zero with a clear message
and does not use up the join token."""

from __future__ import annotations

import signal
import stat

import pytest

from tests.pull_agent.conftest import System


@pytest.mark.parametrize("system", ["sqlite"], indirect=True)
def test_the_token_is_kept_0600_and_a_restart_needs_no_join_token(system: System) -> None:
    join_id, join_token = system.api.join_token()
    first = system.daemon("keeper", join_token=join_token)
    agent_id = system.online(first)

    path = first.state_dir / "agent.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    saved = first.state()
    assert saved["agent_token"].startswith("flt_") and saved["server"] == system.url
    agent = system.api.agent(agent_id)
    assert (agent["name"], agent["mode"]) == ("keeper", "http_pull")

    first.signal(signal.SIGTERM)
    assert first.wait(30) == 0, system.logs()
    assert system.api.agent(agent_id)["status"] == "offline"  # it deregistered

    # The join token is revoked: a restart can only work with the saved agent token.
    system.api.call("DELETE", f"/join-tokens/{join_id}", expect=204)
    second = system.daemon("keeper", join_token=join_token)
    assert system.online(second) == agent_id
    system.wait_for(lambda: "resumed as agent" in second.log(), timeout=30, what="the resume")
    assert [a["id"] for a in system.api.agents()] == [agent_id]
    assert second.state()["agent_token"] == saved["agent_token"]

    task_id = system.api.submit({"sleep": 0})
    system.wait_for(lambda: system.api.status(task_id) == "completed", timeout=30, what="a task")
    assert system.api.task(task_id)["agent_id"] == agent_id


@pytest.mark.parametrize("system", ["sqlite"], indirect=True)
def test_a_refused_registration_exits_non_zero_and_keeps_the_join_token(system: System) -> None:
    _, join_token = system.api.join_token()
    refused = system.daemon("bad", join_token=join_token, capabilities=("code python",))
    stranger = system.daemon("stranger", join_token="flj_not-a-real-token")

    code = refused.wait(60)
    output = refused.log()
    assert code == 1, output  # the API refused the request: the CLI's exit code 1
    assert "error: registration refused" in output
    assert "'code python' is not a valid capability" in output
    assert "Traceback" not in output
    assert not (refused.state_dir / "agent.json").exists()

    # An unknown join token is an authentication failure: exit code 4, one clear line.
    assert stranger.wait(60) == 4, stranger.log()
    assert "error: registration refused: 401" in stranger.log()
    assert "Traceback" not in stranger.log()
    assert system.api.agents() == []

    # The join token the refused registration presented still registers an agent.
    good = system.daemon("good", join_token=join_token, capabilities=("code:python",))
    agent_id = system.online(good)
    assert system.api.agent(agent_id)["capabilities"] == ["code:python"]
