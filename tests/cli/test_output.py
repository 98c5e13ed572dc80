"""The pure helpers behind the CLI's output and error messages."""

from __future__ import annotations

import datetime as dt

import pytest

from fleet_api.cli.client import field_errors
from fleet_api.cli.output import Column, ago, cell, column, print_table

NOW = dt.datetime(2026, 1, 10, 12, 0, tzinfo=dt.UTC)


def test_ago_is_short_and_relative() -> None:
    assert ago("2026-01-10T11:59:48+00:00", NOW) == "12s ago"
    assert ago("2026-01-10T11:55:00Z", NOW) == "5m ago"
    assert ago("2026-01-10T09:00:00+00:00", NOW) == "3h ago"
    assert ago("2026-01-10T12:05:00+00:00", NOW) == "in 5m"
    assert ago("2025-12-01T00:00:00+00:00", NOW) == "2025-12-01"
    assert ago(None, NOW) == "-"


def test_cells() -> None:
    assert cell(["a", "b"]) == "a,b"
    assert cell(None) == "-"
    assert cell(True) == "yes"
    assert cell("x" * 50, 10) == "x" * 9 + "…"
    assert cell("two\nlines") == "two lines"


def test_table_columns_are_aligned(capsys: pytest.CaptureFixture[str]) -> None:
    rows: list[dict[str, str | None]] = [{"id": "a", "name": "short"}, {"id": "bbbb", "name": None}]
    print_table(rows, [column("id"), Column("NAME", lambda r: r.get("name"))])
    out = capsys.readouterr().out.splitlines()
    assert out == ["ID    NAME", "a     short", "bbbb  -"]


def test_field_errors_are_flattened() -> None:
    errors = {"json": {"title": ["Missing data for required field."], "labels": {"0": ["bad"]}}}
    assert field_errors(errors) == [
        "title: Missing data for required field.",
        "labels.0: bad",
    ]
    assert field_errors(None) == []
