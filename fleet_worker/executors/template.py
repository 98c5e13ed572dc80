"""Render an agent type's command template into an argument list (never a shell string)."""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence

PLACEHOLDERS = ("prompt_file", "workspace", "task_id", "branch", "repo", "python")

_FORMATTER = string.Formatter()


class _StrictValues(dict[str, str]):
    def __missing__(self, key: str) -> str:
        raise KeyError(key)


def render_command(template: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """Substitute ``{placeholder}`` fields inside each argument of ``template``.

    Only the names in :data:`PLACEHOLDERS` are allowed, and only as plain fields: ``{{`` and
    ``}}`` give literal braces; attribute access, indexing, conversions and format specs are
    refused, so a template cannot reach into Python objects. Raises ``ValueError`` naming the
    offending placeholder and argument.
    """
    known = _StrictValues({name: str(values.get(name, "")) for name in PLACEHOLDERS})
    argv: list[str] = []
    for arg in template:
        _check_fields(arg)
        argv.append(arg.format_map(known))
    if not argv:
        raise ValueError("agent command is empty")
    return argv


def _check_fields(arg: str) -> None:
    try:
        parsed = list(_FORMATTER.parse(arg))
    except ValueError as exc:
        raise ValueError(f"bad placeholder syntax in command argument {arg!r}: {exc}") from None
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in PLACEHOLDERS:
            raise ValueError(
                f"unknown placeholder {{{field}}} in command argument {arg!r}; "
                f"known placeholders: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
            )
        if spec or conversion:
            raise ValueError(
                f"placeholder {{{field}}} in command argument {arg!r} "
                "must not have a conversion or format spec"
            )
