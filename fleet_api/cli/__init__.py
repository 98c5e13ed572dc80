"""The ``fleet`` command line: one module per command group, assembled here.

Exit codes: 0 success, 1 general failure or an API refusal, 2 bad usage or configuration,
3 the API server (or database) cannot be reached, 4 authentication (no token, 401, 403),
5 not found (404), 130 interrupted.
"""

from __future__ import annotations

from typing import Any

import click

from fleet_api.cli import agent, agents, db, doctor, events, processes, stack, tasks, tokens
from fleet_api.cli.context import DEFAULT_SERVER, CliState
from fleet_api.cli.errors import ExitCode


class FleetGroup(click.Group):
    """The root group: Ctrl-C anywhere exits 130 quietly instead of click's ``Aborted!``."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo(err=True)
            raise click.exceptions.Exit(ExitCode.INTERRUPTED) from None


@click.group(cls=FleetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--server",
    envvar="FLEET_SERVER",
    default=DEFAULT_SERVER,
    show_default=True,
    help="Fleet API base URL [env FLEET_SERVER].",
)
@click.option(
    "--token",
    envvar="FLEET_TOKEN",
    help="API token [env FLEET_TOKEN; default: ./.fleet/admin-token].",
)
@click.option(
    "--config",
    envvar="FLEET_CONFIG",
    type=click.Path(dir_okay=False),
    help="Settings file (TOML) [env FLEET_CONFIG].",
)
@click.version_option(package_name="fleet", prog_name="fleet")
@click.pass_context
def main(ctx: click.Context, server: str, token: str | None, config: str | None) -> None:
    """Fleet: an orchestrator for fleets of AI coding agents."""
    ctx.obj = CliState(server=server, token=token, config=config)


for command in (
    stack.up_command,
    processes.api_command,
    stack.worker_command,
    processes.beat_command,
    stack.flower_command,
    agent.agent_group,
    db.db_group,
    tokens.admin_token,
    tokens.join_token,
    tasks.task_group,
    agents.agents_group,
    events.events_group,
    doctor.doctor_command,
):
    main.add_command(command)
