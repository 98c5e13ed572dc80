"""CLI commands against a real API server over HTTP."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import pytest

from fleet_api.cli.errors import ExitCode
from tests.cli.conftest import Server, invoke


class PullAgent:
    """Just enough of the pull protocol to move tasks along from a test."""

    def __init__(self, server: Server, capabilities: list[str]) -> None:
        self.server = server
        join = server.cli("join-token", "create").stdout.strip()
        reply = server.api(
            "POST",
            "/agents/register",
            json={
                "join_token": join,
                "name": f"agent-{uuid.uuid4().hex[:6]}",
                "host_uid": uuid.uuid4().hex,
                "capabilities": capabilities,
            },
        ).json()
        self.id = reply["agent"]["id"]
        self.token = reply["agent_token"]

    def call(self, path: str, body: dict[str, Any]) -> Any:
        return self.server.api("POST", path, token=self.token, json=body)

    def take(self, title: str) -> tuple[str, str]:
        """Submit a task for this agent alone and claim it: its id and lease token."""
        task_id = submit(self.server, title, "--assign", self.id, "--priority", "1000000")
        reply = self.call("/tasks/dequeue", {"wait_secs": 0}).json()
        assert reply["task"]["id"] == task_id
        return task_id, reply["lease"]["token"]


def submit(server: Server, title: str, *args: str) -> str:
    result = server.cli("task", "submit", title, *args)
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip()


def test_submit_prints_the_id_and_warnings_on_stderr(server: Server) -> None:
    result = server.cli(
        "task", "submit", "Fix the bug", "--prompt", "details", "--label", "agent:cobol",
        "--priority", "5", "--repo", "acme/rocket",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    task_id = result.stdout.strip()
    assert result.stdout == f"{task_id}\n" and task_id.startswith("tsk_")
    assert "warning:" in result.stderr and "cobol" in result.stderr
    task = server.api("GET", f"/tasks/{task_id}").json()
    assert (task["title"], task["prompt"], task["priority"]) == ("Fix the bug", "details", 5)
    assert task["requirements"] == ["cobol"] and task["repo"] == "acme/rocket"


def test_submit_prompt_from_stdin_and_idempotency_key(server: Server) -> None:
    key = uuid.uuid4().hex
    args = ("task", "submit", "From stdin", "--prompt-file", "-", "--idempotency-key", key)
    first = server.cli(*args, stdin="long prompt\n")
    second = server.cli(*args, stdin="long prompt\n")
    assert first.exit_code == second.exit_code == 0
    assert first.stdout == second.stdout
    task = server.api("GET", f"/tasks/{first.stdout.strip()}").json()
    assert task["prompt"] == "long prompt\n"

    other = server.cli(*args, stdin="another prompt\n")
    assert other.exit_code == ExitCode.GENERAL
    assert other.stderr.startswith("error: ")


def test_submit_with_invalid_input_shows_the_api_message(server: Server) -> None:
    result = server.cli("task", "submit", "x", "--label", "agent:" + "y" * 300)
    assert result.exit_code == ExitCode.GENERAL
    assert result.stderr.startswith("error: ")
    assert result.stdout == ""


def test_list_filters_and_json_is_the_api_body(server: Server) -> None:
    repo = f"acme/{uuid.uuid4().hex[:8]}"
    keep = submit(server, "stays queued", "--repo", repo)
    gone = submit(server, "gets cancelled", "--repo", repo)
    assert server.cli("task", "cancel", gone).stdout == f"{gone}: cancelled\n"

    table = server.cli("task", "list", "--repo", repo)
    assert table.exit_code == 0
    header, *rows = table.stdout.splitlines()
    assert header.split()[:3] == ["ID", "STATUS", "PRI"]
    assert [row.split()[:2] for row in rows] == [[gone, "cancelled"], [keep, "queued"]]

    only = server.cli("task", "list", "--repo", repo, "--status", "cancelled", "--json")
    assert [task["id"] for task in json.loads(only.stdout)] == [gone]

    as_json = server.cli("task", "list", "--repo", repo, "--json")
    api_body = server.api("GET", "/tasks", params={"repo": repo}).json()
    assert json.loads(as_json.stdout) == api_body

    paged = server.cli("task", "list", "--repo", repo, "--page-size", "1")
    assert len(paged.stdout.splitlines()) == 2
    assert "page 1 of 2 (2 tasks)" in paged.stderr


def test_show_prints_fields_and_events(server: Server) -> None:
    task_id = submit(server, "Show me", "--label", "docs")
    server.cli("task", "cancel", task_id)
    result = server.cli("task", "show", task_id)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "title:" in out and "Show me" in out and "cancelled" in out
    events = [line.split()[:3] for line in out.split("\n\n", 1)[1].splitlines()[1:]]
    assert [event[0] for event in events] == ["1", "2"]
    assert "created" in out and "cancelled_by_user" in out

    as_json = server.cli("task", "show", task_id, "--json")
    assert json.loads(as_json.stdout) == server.api("GET", f"/tasks/{task_id}").json()


def test_cancel_twice_is_refused(server: Server) -> None:
    task_id = submit(server, "Cancel me")
    assert server.cli("task", "cancel", task_id).exit_code == 0
    again = server.cli("task", "cancel", task_id)
    assert again.exit_code == ExitCode.GENERAL
    assert again.stderr.startswith("error: ")
    assert "illegal_transition" in again.stderr


def test_retry_of_a_failed_task_and_its_logs(server: Server) -> None:
    agent = PullAgent(server, [])
    task_id, lease = agent.take("Fails once")
    agent.call(f"/tasks/{task_id}/logs", {"lease_token": lease, "seq": 0, "data": "line one\n"})
    agent.call(f"/tasks/{task_id}/logs", {"lease_token": lease, "seq": 1, "data": "line two\n"})
    agent.call(
        f"/tasks/{task_id}/fail", {"lease_token": lease, "error": "boom", "retryable": False}
    )

    logs = server.cli("task", "logs", task_id)
    assert logs.exit_code == 0, logs.stderr
    assert logs.stdout == "line one\nline two\n"
    body = json.loads(server.cli("task", "logs", task_id, "--json").stdout)
    assert body == server.api("GET", f"/tasks/{task_id}/logs", params={"offset": 0}).json()
    assert server.cli("task", "logs", task_id, "--offset", "9").stdout == "line two\n"

    assert server.cli("task", "show", task_id).stdout.count("failed") >= 1
    retried = server.cli("task", "retry", task_id)
    assert retried.exit_code == 0, retried.stderr
    assert retried.stdout == f"{task_id}: queued\n"


def test_logs_follow_prints_output_as_it_arrives_until_the_task_ends(server: Server) -> None:
    agent = PullAgent(server, [])
    task_id, lease = agent.take("Streams")
    agent.call(f"/tasks/{task_id}/logs", {"lease_token": lease, "seq": 0, "data": "start\n"})

    def finish_later() -> None:
        time.sleep(0.5)
        agent.call(f"/tasks/{task_id}/logs", {"lease_token": lease, "seq": 1, "data": "end\n"})
        agent.call(
            f"/tasks/{task_id}/complete", {"lease_token": lease, "receipt": {"exit_code": 0}}
        )

    worker = threading.Thread(target=finish_later)
    worker.start()
    result = server.cli("task", "logs", task_id, "--follow")
    worker.join()
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "start\nend\n"


def test_ctrl_c_while_following_exits_130(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = PullAgent(server, [])
    task_id, lease = agent.take("Never ends")
    agent.call(f"/tasks/{task_id}/logs", {"lease_token": lease, "seq": 0, "data": "so far\n"})

    def interrupt(_secs: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("fleet_api.cli.tasks.time.sleep", interrupt)
    result = server.cli("task", "logs", task_id, "--follow")
    assert result.exit_code == ExitCode.INTERRUPTED
    assert result.stdout == "so far\n"
    assert "Traceback" not in result.output


def test_join_tokens_create_list_revoke(server: Server) -> None:
    created = server.cli("join-token", "create", "--ttl", "120")
    assert created.exit_code == 0
    secret = created.stdout.strip()
    assert created.stdout == f"{secret}\n" and secret.startswith("flj_")

    as_json = json.loads(server.cli("join-token", "create", "--json").stdout)
    assert set(as_json) >= {"id", "token", "expires_at"}
    listed = server.cli("join-token", "list")
    assert as_json["id"] in listed.stdout
    assert (
        json.loads(server.cli("join-token", "list", "--json").stdout)
        == server.api("GET", "/join-tokens", params={"page_size": 100}).json()
    )

    revoked = server.cli("join-token", "revoke", as_json["id"])
    assert revoked.exit_code == 0 and as_json["id"] in revoked.stdout
    [row] = [t for t in server.api("GET", "/join-tokens").json() if t["id"] == as_json["id"]]
    assert row["revoked_at"] is not None

    missing = server.cli("join-token", "revoke", "tok_nope")
    assert missing.exit_code == ExitCode.NOT_FOUND


def test_admin_tokens_list_and_revoke(server: Server) -> None:
    extra = server.api("POST", "/admin-tokens", json={"name": "temp"}).json()
    listed = server.cli("admin-token", "list")
    assert extra["id"] in listed.stdout and "cli-tests" in listed.stdout
    assert server.cli("admin-token", "revoke", extra["id"]).exit_code == 0
    after = invoke("--server", server.url, "--token", extra["token"], "task", "list")
    assert after.exit_code == ExitCode.AUTH


def test_agents_list_show_drain_resume(server: Server) -> None:
    capability = f"cap{uuid.uuid4().hex[:6]}"
    agent = PullAgent(server, [capability])
    table = server.cli("agents", "list", "--capability", capability)
    assert table.exit_code == 0
    [row] = table.stdout.splitlines()[1:]
    assert row.split()[0] == agent.id and capability in row
    as_json = server.cli("agents", "list", "--capability", capability, "--json")
    api = server.api("GET", "/agents", params={"capability": capability}).json()
    assert json.loads(as_json.stdout) == api

    drained = server.cli("agents", "drain", agent.id)
    assert drained.exit_code == 0, drained.stderr
    assert drained.stdout.startswith(f"drain sent to {agent.id}")
    assert server.cli("agents", "resume", agent.id, "--json").exit_code == 0
    shown = server.cli("agents", "show", agent.id)
    assert shown.exit_code == 0
    assert capability in shown.stdout
    kinds = [line.split()[1] for line in shown.stdout.split("\n\n", 1)[1].splitlines()[1:]]
    assert sorted(kinds) == ["drain", "resume"]

    assert server.cli("agents", "drain", "agt_nope").exit_code == ExitCode.NOT_FOUND


@pytest.mark.parametrize(
    "args",
    [("task", "show", "tsk_nope"), ("task", "logs", "tsk_nope"), ("agents", "show", "agt_x")],
)
def test_unknown_objects_exit_5(server: Server, args: tuple[str, ...]) -> None:
    result = server.cli(*args)
    assert result.exit_code == ExitCode.NOT_FOUND
    assert result.stderr.startswith("error: ")
    assert result.stdout == ""


def test_bad_token_exits_4(server: Server) -> None:
    result = invoke("--server", server.url, "--token", "fla_not_a_real_token", "task", "list")
    assert result.exit_code == ExitCode.AUTH
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.output


def test_agent_token_on_admin_endpoint_exits_4(server: Server) -> None:
    agent = PullAgent(server, [])
    result = invoke("--server", server.url, "--token", agent.token, "agents", "list")
    assert result.exit_code == ExitCode.AUTH
