"""Output for people (aligned tables, short times) and for programs (``--json``).

Results go to stdout; warnings, progress and errors go to stderr, so ``fleet ... | jq`` and
``TOKEN=$(fleet ...)`` see only the result.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

EMPTY = "-"


def json_option(func: F) -> F:
    """The ``--json`` flag every API command takes."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print the API's JSON response body instead."
    )(func)


def print_json(body: Any) -> None:
    """Print a JSON document exactly as the API returned it (indented for reading); an empty
    body (204) prints nothing."""
    if body is None:
        return
    click.echo(json.dumps(body, indent=2, ensure_ascii=False))


def info(message: str) -> None:
    """A note for the person at the terminal (stderr)."""
    click.echo(message, err=True)


def warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


@dataclass(frozen=True)
class Column:
    """A table column: its header, how to get the cell from a row, and its widest cell."""

    header: str
    get: Callable[[Mapping[str, Any]], Any]
    max_width: int = 40


def column(
    name: str, header: str | None = None, *, max_width: int = 40, time: bool = False
) -> Column:
    """A column showing ``row[name]`` (a relative time when ``time`` is set)."""

    def get(row: Mapping[str, Any]) -> Any:
        value = row.get(name)
        return ago(value) if time else value

    return Column(header or name.upper(), get, max_width)


def cell(value: Any, max_width: int = 40) -> str:
    """One value as table text: lists joined by commas, None as ``-``, long text cut."""
    if value is None or value == "" or value == []:
        text = EMPTY
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, list | tuple):
        text = ",".join(str(item) for item in value)
    elif isinstance(value, dict):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = str(value)
    text = " ".join(text.split())
    if len(text) > max_width:
        text = text[: max_width - 1] + "…"
    return text


def print_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[Column]) -> None:
    """An aligned table with a header line; ``(none)`` on stderr when there are no rows."""
    cells = [[cell(col.get(row), col.max_width) for col in columns] for row in rows]
    if not cells:
        info("(none)")
        return
    headers = [col.header for col in columns]
    widths = [max(len(line[i]) for line in [headers, *cells]) for i in range(len(columns))]
    for line in [headers, *cells]:
        text = "  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True))
        click.echo(text.rstrip())


def print_fields(pairs: Sequence[tuple[str, Any]]) -> None:
    """``label: value`` lines, labels aligned; values may span lines (prompts, errors)."""
    width = max((len(label) for label, _ in pairs), default=0)
    for label, value in pairs:
        text = cell(value, max_width=10_000) if not isinstance(value, str) else value
        lines = (text or EMPTY).splitlines() or [EMPTY]
        click.echo(f"{label + ':':<{width + 1}} {lines[0]}")
        for line in lines[1:]:
            click.echo(f"{'':<{width + 1}} {line}")


def parse_time(value: str | None) -> dt.datetime | None:
    """An RFC 3339 time from the API, or None."""
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def ago(value: str | None, now: dt.datetime | None = None) -> str:
    """A short relative time: ``12s ago``, ``in 5m``; a date beyond a week."""
    when = parse_time(value)
    if when is None:
        return value or EMPTY
    now = now or dt.datetime.now(dt.UTC)
    seconds = int((now - when).total_seconds())
    future = seconds < 0
    seconds = abs(seconds)
    if seconds >= 7 * 86400:
        return when.astimezone(dt.UTC).strftime("%Y-%m-%d")
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or unit == "s":
            amount = f"{seconds // size}{unit}"
            break
    return f"in {amount}" if future else f"{amount} ago"
