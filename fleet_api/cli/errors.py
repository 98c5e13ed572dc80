"""Exit codes and the one exception every command raises for an expected failure.

Scripts can tell failures apart by exit code; people get one ``error: ...`` line on stderr
(plus details where they help), never a traceback.
"""

from __future__ import annotations

from enum import IntEnum
from typing import IO

import click


class ExitCode(IntEnum):
    OK = 0
    GENERAL = 1  # the API refused the request (4xx other than below, 5xx), or it failed
    USAGE = 2  # bad flags or a bad configuration
    UNREACHABLE = 3  # the API server (or the database) cannot be reached
    AUTH = 4  # no token, or the API answered 401/403
    NOT_FOUND = 5  # the API answered 404
    INTERRUPTED = 130  # Ctrl-C


class CliError(click.ClickException):
    """An expected failure: printed as ``error: <message>`` and the ``details`` lines; click
    exits with ``code``."""

    def __init__(
        self, message: str, code: int = ExitCode.GENERAL, details: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.code = int(code)
        self.details = details or []

    @property
    def exit_code(self) -> int:  # type: ignore[override]  # click exits with this
        return self.code

    def show(self, file: IO[str] | None = None) -> None:
        click.echo(f"error: {self.message}", err=file is None, file=file)
        for line in self.details:
            click.echo(f"  {line}", err=file is None, file=file)
