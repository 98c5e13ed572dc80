"""``fleet task``: submit, list, show, follow logs, cancel and retry tasks."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import IO, Any

import click

from fleet_api.cli.client import ApiClient
from fleet_api.cli.context import CliState, pass_state
from fleet_api.cli.errors import CliError, ExitCode
from fleet_api.cli.output import (
    Column,
    ago,
    column,
    info,
    json_option,
    print_fields,
    print_json,
    print_table,
    warn,
)

STATUSES = ("queued", "dispatched", "running", "in_review", "completed", "failed", "cancelled")
# How often `task logs --follow` asks for more once it has caught up.
FOLLOW_INTERVAL_SECS = 1.0

TASK_COLUMNS = (
    column("id"),
    column("status"),
    column("priority", "PRI"),
    column("title", max_width=48),
    column("requirements", "REQUIRES"),
    column("agent_id", "AGENT"),
    column("attempt", "TRY"),
    column("created_at", "CREATED", time=True),
)


def _event_status(event: Mapping[str, Any]) -> str:
    """``queued → dispatched``, or the status alone when the event changed something else."""
    before, after = event.get("from_status"), event.get("to_status")
    return str(after) if before == after else f"{before or '∅'} → {after}"


def _event_detail(event: Mapping[str, Any]) -> str:
    """The one thing worth knowing about an event: its reason, error or message."""
    data = event.get("data") or {}
    changes = data.get("changes") or {}
    for value in (
        data.get("reason"),
        changes.get("failure_reason"),
        data.get("error"),
        data.get("message"),
        changes.get("last_error"),
    ):
        if value:
            return str(value)
    return ""


EVENT_COLUMNS = (
    column("seq", "SEQ"),
    column("at", "AT", time=True),
    column("type", "EVENT"),
    Column("STATUS", _event_status),
    column("actor", "ACTOR"),
    Column("DETAIL", _event_detail, max_width=60),
)


@click.group("task")
def task_group() -> None:
    """Submit and manage tasks."""


@task_group.command("submit")
@click.argument("title")
@click.option("--prompt", help="What the agent should do.")
@click.option(
    "--prompt-file", type=click.File("r"), help="Read the prompt from a file ('-' for stdin)."
)
@click.option("--label", "labels", multiple=True, help="A label; agent:CAP requires CAP.")
@click.option("--priority", type=int, help="Higher runs first (default 0).")
@click.option("--repo", help="Repository as owner/name.")
@click.option("--clone-url", help="Clone this repository into the workspace.")
@click.option("--requires-pr/--no-requires-pr", default=None, help="Fail without a PR.")
@click.option("--max-retries", type=click.IntRange(min=0), help="Attempts after the first.")
@click.option("--timeout-secs", type=click.IntRange(min=1), help="Per attempt.")
@click.option("--assign", "assigned_agent_id", metavar="AGENT_ID", help="Run on this agent.")
@click.option("--idempotency-key", help="Submitting again with the same key is a no-op.")
@json_option
@pass_state
def submit(
    state: CliState,
    title: str,
    prompt: str | None,
    prompt_file: IO[str] | None,
    labels: tuple[str, ...],
    idempotency_key: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Queue a task; prints its id."""
    if prompt is not None and prompt_file is not None:
        raise click.UsageError("give --prompt or --prompt-file, not both")
    body: dict[str, Any] = {"title": title}
    if prompt_file is not None:
        body["prompt"] = prompt_file.read()
    elif prompt is not None:
        body["prompt"] = prompt
    if labels:
        body["labels"] = list(labels)
    body.update({key: value for key, value in options.items() if value is not None})
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    reply = state.client().post("/tasks", body, headers=headers)
    if as_json:
        print_json(reply.body)
        return
    for warning in reply.body.get("warnings") or []:
        warn(warning if isinstance(warning, str) else json.dumps(warning))
    click.echo(reply.body["id"])


@task_group.command("list")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(STATUSES),
    help="Only tasks in this status (repeatable).",
)
@click.option("--agent", "agent_id", help="Only tasks of this agent.")
@click.option("--repo", help="Only tasks of this repository (owner/name).")
@click.option("--page", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--page-size", type=click.IntRange(1, 500), default=50, show_default=True)
@json_option
@pass_state
def list_tasks(
    state: CliState,
    statuses: tuple[str, ...],
    agent_id: str | None,
    repo: str | None,
    page: int,
    page_size: int,
    as_json: bool,
) -> None:
    """List tasks, newest first, one page at a time."""
    reply = state.client().get(
        "/tasks",
        status=list(statuses),
        agent_id=agent_id,
        repo=repo,
        page=page,
        page_size=page_size,
    )
    if as_json:
        print_json(reply.body)
        return
    print_table(reply.body, TASK_COLUMNS)
    totals = reply.pagination
    if totals.get("total_pages", 1) > 1:
        info(
            f"page {totals.get('page', page)} of {totals['total_pages']} "
            f"({totals.get('total')} tasks); more with --page"
        )


@task_group.command("show")
@click.argument("task_id")
@json_option
@pass_state
def show(state: CliState, task_id: str, as_json: bool) -> None:
    """Show a task and its event history (--json: the task alone)."""
    client = state.client()
    task = client.get(f"/tasks/{task_id}").body
    if as_json:
        print_json(task)
        return
    events = client.get_all(f"/tasks/{task_id}/events")
    print_fields(_task_fields(task))
    click.echo()
    print_table(events, EVENT_COLUMNS)


def _task_fields(task: dict[str, Any]) -> list[tuple[str, Any]]:
    receipt = task.get("receipt") or {}
    outcome = receipt.get("summary") or (f"exit {receipt.get('exit_code')}" if receipt else None)
    prs = [a.get("url") or a.get("pr_url") for a in task.get("artifacts") or []]
    return [
        ("id", task.get("id")),
        ("title", task.get("title")),
        ("status", task.get("status")),
        ("priority", task.get("priority")),
        ("labels", task.get("labels")),
        ("requires", task.get("requirements")),
        ("repo", task.get("repo")),
        ("issue", task.get("issue_number")),
        ("assigned to", task.get("assigned_agent_id")),
        ("agent", task.get("agent_id")),
        ("attempt", f"{task.get('attempt')} (max retries {task.get('max_retries')})"),
        ("failure", task.get("failure_reason")),
        ("last error", task.get("last_error")),
        ("receipt", outcome),
        ("pull requests", [pr for pr in prs if pr] or receipt.get("pr_url")),
        ("created", ago(task.get("created_at"))),
        ("updated", ago(task.get("updated_at"))),
        ("prompt", task.get("prompt")),
    ]


@task_group.command("logs")
@click.argument("task_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the task finishes.")
@click.option("--offset", type=click.IntRange(min=0), default=0, help="Start at this byte.")
@json_option
@pass_state
def logs(state: CliState, task_id: str, follow: bool, offset: int, as_json: bool) -> None:
    """Print a task's log (--json: the API's reply, one JSON line per reply when following)."""
    client = state.client()
    if as_json and not follow:
        print_json(_read_log(client, task_id, offset))
        return
    while True:
        body = _read_log(client, task_id, offset)
        if as_json:
            click.echo(json.dumps(body, ensure_ascii=False))
        elif body.get("data"):
            click.echo(body["data"], nl=False)
        next_offset = int(body.get("next_offset", offset))
        progressed, offset = next_offset != offset, next_offset
        if body.get("complete"):
            return
        if not progressed:
            if not follow:
                return
            time.sleep(FOLLOW_INTERVAL_SECS)


def _read_log(client: ApiClient, task_id: str, offset: int) -> dict[str, Any]:
    body = client.get(f"/tasks/{task_id}/logs", offset=offset).body
    if not isinstance(body, dict):
        raise CliError("the API answered the log request with no JSON object", ExitCode.GENERAL)
    return body


@task_group.command("cancel")
@click.argument("task_id")
@json_option
@pass_state
def cancel(state: CliState, task_id: str, as_json: bool) -> None:
    """Cancel a task that has not finished."""
    _act(state, task_id, "cancel", as_json)


@task_group.command("retry")
@click.argument("task_id")
@json_option
@pass_state
def retry(state: CliState, task_id: str, as_json: bool) -> None:
    """Queue a failed task again, with a fresh retry budget."""
    _act(state, task_id, "retry", as_json)


def _act(state: CliState, task_id: str, action: str, as_json: bool) -> None:
    reply = state.client().post(f"/tasks/{task_id}/{action}")
    if as_json:
        print_json(reply.body)
        return
    status = reply.body.get("status") if isinstance(reply.body, dict) else None
    click.echo(f"{task_id}: {status}" if status else f"{task_id}: {action} requested")
