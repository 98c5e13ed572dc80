"""``fleet agent run``: the HTTP pull agent daemon."""

from __future__ import annotations

import logging
import shlex
import socket
from pathlib import Path

import click

from fleet_api.cli.context import CliState, config_option, pass_state
from fleet_api.cli.errors import CliError, ExitCode
from fleet_common.settings import AgentTypeSettings


@click.group("agent")
def agent_group() -> None:
    """The pull agent daemon."""


@agent_group.command("run")
@click.option("--server", "agent_server", help="Fleet API URL (default: the global --server).")
@click.option(
    "--join-token", envvar="FLEET_JOIN_TOKEN", help="One-time join token [env FLEET_JOIN_TOKEN]."
)
@click.option("--name", default=socket.gethostname, show_default="this host's name")
@click.option(
    "--capabilities", default="", help="Comma-separated capabilities, e.g. code:python,tests."
)
@click.option("--agent-type", help="An agent type from the settings file (default: demo).")
@click.option(
    "--command", "command_line", help='The agent command, e.g. "codex exec {prompt_file}".'
)
@click.option("--max-concurrency", type=click.IntRange(1, 256), default=1, show_default=True)
@click.option(
    "--state-dir", type=click.Path(file_okay=False), default=".fleet/agent", show_default=True
)
@config_option
@pass_state
def run_command(
    state: CliState,
    agent_server: str | None,
    join_token: str | None,
    name: str,
    capabilities: str,
    agent_type: str | None,
    command_line: str | None,
    max_concurrency: int,
    state_dir: str,
    config: str | None,
) -> None:
    """Register (or resume), heartbeat, pull tasks and run them until SIGTERM drains it."""
    from fleet_worker.pull_agent.daemon import Daemon, DaemonConfig, RegistrationError

    settings = state.settings(config)
    if agent_type and command_line:
        raise CliError("give --agent-type or --command, not both", ExitCode.USAGE)
    if command_line:
        kind = AgentTypeSettings(name="command", command=tuple(shlex.split(command_line)))
    else:
        wanted = agent_type or "demo"
        if wanted not in settings.agent_types:
            raise CliError(
                f"unknown agent type {wanted!r} (not in the settings file)", ExitCode.USAGE
            )
        kind = settings.agent_types[wanted]
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    daemon = Daemon(
        DaemonConfig(
            server=(agent_server or state.server).rstrip("/"),
            name=name,
            capabilities=[c.strip() for c in capabilities.split(",") if c.strip()],
            agent_type=kind,
            state_dir=Path(state_dir),
            settings=settings,
            max_concurrency=max_concurrency,
            join_token=join_token,
        )
    )
    try:
        code = daemon.run()
    except RegistrationError as error:
        # A bad body (422) is a refusal like any other; only a bad or missing token is AUTH.
        code = ExitCode.AUTH if error.status in (None, 401, 403) else ExitCode.GENERAL
        raise CliError(str(error), code) from None
    raise SystemExit(code)
