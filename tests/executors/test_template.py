"""Command templates: placeholders inside arguments, strictly."""

from __future__ import annotations

import pytest

from fleet_worker.executors.template import render_command

VALUES = {
    "prompt_file": "/w/t1/.fleet/prompt.md",
    "workspace": "/w/t1",
    "task_id": "t1",
    "branch": "fleet/t1",
    "repo": "acme/rocket",
    "python": "/usr/bin/python3",
}


def test_placeholders_are_substituted_inside_arguments() -> None:
    argv = render_command(
        ["codex", "exec", "--cd={workspace}", "{prompt_file}", "{repo}#{task_id}@{branch}"],
        VALUES,
    )
    assert argv == [
        "codex",
        "exec",
        "--cd=/w/t1",
        "/w/t1/.fleet/prompt.md",
        "acme/rocket#t1@fleet/t1",
    ]


def test_values_are_never_split_or_interpreted() -> None:
    values = {**VALUES, "repo": "a b; rm -rf / {task_id}"}
    assert render_command(["{repo}", "{{literal}}"], values) == [
        "a b; rm -rf / {task_id}",
        "{literal}",
    ]


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("{secret}", "unknown placeholder {secret}"),
        ("{python.__class__}", "unknown placeholder {python.__class__}"),
        ("{0}", "unknown placeholder {0}"),
        ("{task_id!r}", "must not have a conversion"),
        ("{task_id:>10}", "must not have a conversion or format spec"),
        ("{task_id", "bad placeholder syntax"),
    ],
)
def test_bad_placeholders_are_refused_by_name(arg: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace(".", r"\.")):
        render_command(["agent", arg], VALUES)


def test_an_empty_command_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        render_command([], VALUES)
