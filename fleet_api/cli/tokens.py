"""``fleet admin-token`` and ``fleet join-token``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import click

from fleet_api.cli.context import TOKEN_FILE, CliState, config_option, pass_state
from fleet_api.cli.db import session_scope
from fleet_api.cli.errors import CliError
from fleet_api.cli.output import Column, column, info, json_option, print_json, print_table
from fleet_common.auth import service
from fleet_common.auth.models import TokenKind

TOKEN_COLUMNS = (
    column("id"),
    column("name"),
    column("created_at", "CREATED", time=True),
    column("last_used_at", "LAST USED", time=True),
    column("expires_at", "EXPIRES", time=True),
    column("revoked_at", "REVOKED", time=True),
)
JOIN_TOKEN_COLUMNS = (
    column("id"),
    column("created_at", "CREATED", time=True),
    column("expires_at", "EXPIRES", time=True),
    column("used_at", "USED", time=True),
    column("agent_id", "AGENT"),
    column("revoked_at", "REVOKED", time=True),
)


def _list(state: CliState, path: str, columns: Sequence[Column], as_json: bool) -> None:
    items = state.client().get_all(path)
    if as_json:
        print_json(items)
    else:
        print_table(items, columns)


def _revoke(state: CliState, path: str, what: str, token_id: str, as_json: bool) -> None:
    reply = state.client().delete(f"{path}/{token_id}")
    if as_json:
        print_json(reply.body)
    else:
        click.echo(f"revoked {what} {token_id}")


def save_token(secret: str, path: Path = TOKEN_FILE) -> None:
    """Write ``secret`` to ``path``, readable by its owner only, never over an existing one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CliError(f"{path} exists already; remove it first to replace it") from None
    with os.fdopen(fd, "w") as file:
        file.write(secret + "\n")


@click.group("admin-token")
def admin_token() -> None:
    """Admin tokens: full control of the API."""


@admin_token.command("create")
@click.option("--name", required=True, help="Who or what the token is for.")
@click.option("--save", is_flag=True, help=f"Also write it to {TOKEN_FILE} (mode 0600).")
@config_option
@pass_state
def admin_token_create(state: CliState, name: str, save: bool, config: str | None) -> None:
    """Mint an admin token with direct database access (no server or token needed).

    Prints the token alone on stdout; it is shown only this once.
    """
    settings = state.settings(config)
    if save and TOKEN_FILE.exists():
        raise CliError(f"{TOKEN_FILE} exists already; remove it first to replace it")
    with session_scope(settings, upgrade=True) as session:
        row, secret = service.mint(session, TokenKind.ADMIN, actor="cli", name=name)
        token_id = row.id
    if save:
        save_token(secret)
        info(f"admin token {token_id} saved to {TOKEN_FILE}")
    click.echo(secret)


@admin_token.command("list")
@json_option
@pass_state
def admin_token_list(state: CliState, as_json: bool) -> None:
    """List admin tokens."""
    _list(state, "/admin-tokens", TOKEN_COLUMNS, as_json)


@admin_token.command("revoke")
@click.argument("token_id")
@json_option
@pass_state
def admin_token_revoke(state: CliState, token_id: str, as_json: bool) -> None:
    """Revoke an admin token by its id."""
    _revoke(state, "/admin-tokens", "admin token", token_id, as_json)


@click.group("join-token")
def join_token() -> None:
    """Join tokens: one-time, expiring tokens pull agents register with."""


@join_token.command("create")
@click.option("--ttl", "ttl_secs", type=click.IntRange(min=1), help="Lifetime in seconds.")
@click.option("--name", help="A note on what the token is for.")
@json_option
@pass_state
def join_token_create(
    state: CliState, ttl_secs: int | None, name: str | None, as_json: bool
) -> None:
    """Mint a join token; prints the token alone on stdout (shown only this once)."""
    body = {key: value for key, value in (("ttl_secs", ttl_secs), ("name", name)) if value}
    reply = state.client().post("/join-tokens", body)
    if as_json:
        print_json(reply.body)
        return
    info(f"join token {reply.body.get('id')} expires {reply.body.get('expires_at') or 'never'}")
    click.echo(reply.body["token"])


@join_token.command("list")
@json_option
@pass_state
def join_token_list(state: CliState, as_json: bool) -> None:
    """List join tokens."""
    _list(state, "/join-tokens", JOIN_TOKEN_COLUMNS, as_json)


@join_token.command("revoke")
@click.argument("token_id")
@json_option
@pass_state
def join_token_revoke(state: CliState, token_id: str, as_json: bool) -> None:
    """Revoke a join token by its id."""
    _revoke(state, "/join-tokens", "join token", token_id, as_json)
