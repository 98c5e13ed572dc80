"""``fleet agents``: list, inspect, drain and resume agents."""

from __future__ import annotations

from typing import Any

import click

from fleet_api.cli.context import CliState, pass_state
from fleet_api.cli.output import (
    Column,
    ago,
    column,
    json_option,
    print_fields,
    print_json,
    print_table,
)

AGENT_COLUMNS = (
    column("id"),
    column("name", max_width=30),
    column("mode"),
    column("status"),
    column("desired_state", "STATE"),
    column("capabilities", "CAPABILITIES", max_width=40),
    column("max_concurrency", "SLOTS"),
    column("host_id", "HOST"),
    column("last_heartbeat_at", "LAST SEEN", time=True),
)
COMMAND_COLUMNS = (
    column("id"),
    column("kind"),
    column("status"),
    Column("PAYLOAD", lambda c: c.get("payload") or None),
    column("created_at", "CREATED", time=True),
    Column("RESULT", lambda c: c.get("result") or c.get("error"), max_width=50),
)


@click.group("agents")
def agents_group() -> None:
    """Inspect and steer agents."""


@agents_group.command("list")
@click.option("--status", type=click.Choice(["online", "offline"]), help="Only this status.")
@click.option("--capability", help="Only agents with this capability.")
@click.option(
    "--desired-state", type=click.Choice(["active", "draining", "disabled"]), help="Only these."
)
@click.option("--mode", type=click.Choice(["ssh_cli", "http_pull"]), help="Only this mode.")
@json_option
@pass_state
def list_agents(
    state: CliState,
    status: str | None,
    capability: str | None,
    desired_state: str | None,
    mode: str | None,
    as_json: bool,
) -> None:
    """List agents."""
    agents = state.client().get_all(
        "/agents", status=status, capability=capability, desired_state=desired_state, mode=mode
    )
    if as_json:
        print_json(agents)
    else:
        print_table(agents, AGENT_COLUMNS)


@agents_group.command("show")
@click.argument("agent_id")
@json_option
@pass_state
def show(state: CliState, agent_id: str, as_json: bool) -> None:
    """Show an agent and its command history (--json: the agent alone)."""
    client = state.client()
    agent = client.get(f"/agents/{agent_id}").body
    if as_json:
        print_json(agent)
        return
    commands = client.get_all(f"/agents/{agent_id}/commands")
    print_fields(_agent_fields(agent))
    click.echo()
    print_table(commands, COMMAND_COLUMNS)


def _agent_fields(agent: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        ("id", agent.get("id")),
        ("name", agent.get("name")),
        ("mode", agent.get("mode")),
        ("agent type", agent.get("agent_type")),
        ("status", agent.get("status")),
        ("desired state", agent.get("desired_state")),
        ("capabilities", agent.get("capabilities")),
        ("max concurrency", agent.get("max_concurrency")),
        ("host", agent.get("host_id")),
        ("hostname", agent.get("hostname")),
        ("platform", agent.get("platform")),
        ("version", agent.get("version")),
        ("last seen", ago(agent.get("last_heartbeat_at"))),
        ("registered", ago(agent.get("created_at"))),
    ]


@agents_group.command("drain")
@click.argument("agent_id")
@json_option
@pass_state
def drain(state: CliState, agent_id: str, as_json: bool) -> None:
    """Let an agent finish its running tasks and take nothing new."""
    _command(state, agent_id, "drain", as_json)


@agents_group.command("resume")
@click.argument("agent_id")
@json_option
@pass_state
def resume(state: CliState, agent_id: str, as_json: bool) -> None:
    """Let a drained agent take tasks again."""
    _command(state, agent_id, "resume", as_json)


def _command(state: CliState, agent_id: str, kind: str, as_json: bool) -> None:
    reply = state.client().post(f"/agents/{agent_id}/commands", {"kind": kind})
    if as_json:
        print_json(reply.body)
        return
    command_id = reply.body.get("id") if isinstance(reply.body, dict) else None
    click.echo(f"{kind} sent to {agent_id}" + (f" (command {command_id})" if command_id else ""))
