"""``fleet events verify``: replay the event log against the task table."""

from __future__ import annotations

import click
from sqlalchemy import func, select

from fleet_api.cli.context import CliState, config_option, pass_state
from fleet_api.cli.db import session_scope
from fleet_api.cli.errors import ExitCode
from fleet_common.tasks import replay
from fleet_common.tasks.models import Task


@click.group("events")
def events_group() -> None:
    """The task event log."""


@events_group.command("verify")
@config_option
@pass_state
def verify(state: CliState, config: str | None) -> None:
    """Replay every task's events and report each row that differs from its log.

    Exits 0 when the table matches the log, 1 when any difference is found.
    """
    settings = state.settings(config)
    with session_scope(settings) as session:
        checked = session.scalar(select(func.count()).select_from(Task)) or 0
        differences = 0
        for difference in replay.verify(session):
            differences += 1
            click.echo(str(difference))
    noun = "difference" if differences == 1 else "differences"
    click.echo(f"{checked} {'task' if checked == 1 else 'tasks'} checked, {differences} {noun}")
    if differences:
        raise click.exceptions.Exit(ExitCode.GENERAL)
