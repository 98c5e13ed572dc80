"""What every command shares: the global options, settings loading and the API client."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from fleet_api.cli.client import ApiClient
from fleet_api.cli.errors import CliError, ExitCode
from fleet_common.settings import DEFAULT_STATE_DIR, ConfigError, Settings, load_settings

DEFAULT_SERVER = "http://127.0.0.1:9090"
# Where `fleet up` leaves an admin token for the person who started it (mode 0600).
TOKEN_FILE = Path(DEFAULT_STATE_DIR) / "admin-token"

HOW_TO_AUTHENTICATE = (
    "no API token: pass --token or set FLEET_TOKEN, or keep one in ./.fleet/admin-token "
    "(`fleet up` writes it on its first run; `fleet admin-token create --name NAME --save` "
    "makes one with direct database access)"
)


@dataclass
class CliState:
    """The global options, resolved lazily so commands that need neither a server nor a
    database never fail for want of one."""

    server: str = DEFAULT_SERVER
    token: str | None = None
    config: str | None = None

    def settings(self, config: str | None = None, **overrides: dict[str, Any]) -> Settings:
        """Validated settings; a bad value stops with ``error: <key>: <message>`` (exit 2)."""
        try:
            return load_settings(config or self.config, overrides=overrides or None)
        except ConfigError as exc:
            raise CliError(str(exc), ExitCode.USAGE) from None

    def resolve_token(self) -> str:
        """--token, then FLEET_TOKEN (both arrive as ``token``), then ./.fleet/admin-token."""
        if self.token:
            return self.token.strip()
        try:
            token = TOKEN_FILE.read_text().strip()
        except FileNotFoundError:
            token = ""
        except OSError as exc:
            raise CliError(f"cannot read {TOKEN_FILE}: {exc.strerror}", ExitCode.AUTH) from None
        if not token:
            raise CliError(HOW_TO_AUTHENTICATE, ExitCode.AUTH)
        return token

    def client(self) -> ApiClient:
        if not self.server.startswith(("http://", "https://")):
            raise CliError(
                f"invalid server URL {self.server!r}: expected http://HOST:PORT or https://...",
                ExitCode.USAGE,
            )
        return ApiClient(self.server, self.resolve_token())


pass_state = click.make_pass_decorator(CliState, ensure=True)


def config_option(func: Any) -> Any:
    """``--config FILE`` on a command (overrides the global one)."""
    return click.option(
        "--config",
        "config",
        type=click.Path(dir_okay=False),
        default=None,
        help="Settings file (TOML); default: FLEET_CONFIG or the embedded defaults.",
    )(func)
