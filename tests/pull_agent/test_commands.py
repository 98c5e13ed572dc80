"""``upgrade`` and ``restart``: the upgrade command runs beside the work (the daemon keeps
heartbeating, so the task it runs is not declared lost), its output is the command's result,
and once idle the daemon restarts in place (same process, same agent) and serves again."""

from __future__ import annotations

from tests.pull_agent.conftest import System


def test_upgrade_runs_beside_the_work_then_restarts_as_the_same_agent(system: System) -> None:
    daemon = system.daemon("upgradable")
    agent_id = system.online(daemon)
    running = system.api.submit({"sleep": 9})
    system.wait_for(lambda: system.runs(running), timeout=30, what="the task to start")

    upgrade = system.api.command(agent_id, "upgrade", version="2.0")
    system.wait_for(
        lambda: (system.probe_dir / "upgraded-2.0").exists(), timeout=30, what="the upgrade"
    )
    system.wait_for(
        lambda: system.api.command_row(agent_id, upgrade)["status"] == "completed",
        timeout=60,
        what="the upgrade command to complete",
    )
    command = system.api.command_row(agent_id, upgrade)
    assert command["success"] is True
    assert command["result"]["restarting"] is True
    assert command["result"]["version"] == "2.0" and command["result"]["exit_code"] == 0
    assert "upgraded to 2.0" in command["result"]["output"]

    # The task it was running finished there, in its first attempt: the agent was never lost.
    task = system.api.task(running)
    assert (task["status"], task["attempt"], task["agent_id"]) == ("completed", 1, agent_id)

    # Restarted in place: the same process (exec), resumed with its saved token.
    system.wait_for(
        lambda: daemon.log().count("resumed as agent") == 1, timeout=60, what="the restart"
    )
    assert daemon.alive and "restarting" in daemon.log()
    after = system.api.submit({"sleep": 0})
    system.wait_for(lambda: system.api.status(after) == "completed", timeout=30, what="a task")
    assert system.api.task(after)["agent_id"] == agent_id
    assert [r.ppid for r in system.runs(after)] == [daemon.pid]
    assert [a["id"] for a in system.api.agents()] == [agent_id]
