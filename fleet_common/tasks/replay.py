"""Replay the event log: rebuild each task's projected state and compare it to its row."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_common.tasks.models import Task, TaskEvent
from fleet_common.tasks.state import PR_COLUMNS, PROJECTED, to_json

BATCH = 500
#: Events ``forgejo.prs.record`` writes (they may move the PR head).
_PR_RECORDS = frozenset({"pr_merged", "pr_closed", "pr_synchronized", "pr_reopened"})


@dataclass(frozen=True)
class Difference:
    task_id: str
    field: str
    row: Any
    replayed: Any

    def __str__(self) -> str:
        return (
            f"{self.task_id}: {self.field} is {self.row!r} in the row, {self.replayed!r} replayed"
        )


def rebuild(events: list[TaskEvent]) -> dict[str, Any]:
    """Fold a task's events (in seq order) into its projected fields."""
    state: dict[str, Any] = {}
    expected_seq = 1
    for event in events:
        if event.seq != expected_seq:
            state["__gap__"] = f"event seq {expected_seq} missing"
        expected_seq = event.seq + 1
        changes = (event.data or {}).get("changes", {})
        if not changes.keys() & PR_COLUMNS:
            changes = {**_legacy_pr_changes(event, state), **changes}
        state.update(changes)
        if event.to_status is not None:
            state["status"] = event.to_status
    return state


def _legacy_pr_changes(event: TaskEvent, state: dict[str, Any]) -> dict[str, Any]:
    """The PR columns changed by an event written before they were projected, from its
    ``data`` (the values ``forgejo.prs`` set; a newer event carries them in ``changes``)."""
    data = event.data or {}
    if event.type == "pr_attached":
        return {
            "pr_number": data.get("pr_number"),
            "pr_url": data.get("pr_url") or state.get("pr_url"),
            "pr_head_sha": data.get("head_sha") or None,
        }
    if event.type == "pr_detached":
        return dict.fromkeys(PR_COLUMNS)
    head = data.get("head_sha")
    if event.type in _PR_RECORDS and head and data.get("pr_number") == state.get("pr_number"):
        return {"pr_head_sha": head}
    return {}


def verify(session: Session) -> Iterator[Difference]:
    """Every projected field of every task that differs from its replayed log."""
    last_id = ""
    while True:
        tasks = list(
            session.scalars(select(Task).where(Task.id > last_id).order_by(Task.id).limit(BATCH))
        )
        if not tasks:
            return
        last_id = tasks[-1].id
        events: dict[str, list[TaskEvent]] = {task.id: [] for task in tasks}
        query = (
            select(TaskEvent)
            .where(TaskEvent.task_id.in_(list(events)))
            .order_by(TaskEvent.task_id, TaskEvent.seq)
        )
        for event in session.scalars(query):
            events[event.task_id].append(event)
        for task in tasks:
            yield from _compare(task, events[task.id])
        session.expunge_all()


def _compare(task: Task, events: list[TaskEvent]) -> Iterator[Difference]:
    if not events:
        yield Difference(task.id, "events", "present", "none")
        return
    replayed = rebuild(events)
    if "__gap__" in replayed:
        yield Difference(task.id, "seq", "contiguous", replayed["__gap__"])
    if len(events) != task.event_seq:
        yield Difference(task.id, "event_seq", task.event_seq, len(events))
    for name in PROJECTED:
        row_value = to_json(getattr(task, name))
        if name in replayed and replayed[name] != row_value:
            yield Difference(task.id, name, row_value, replayed[name])
        elif name not in replayed and row_value not in (None, [], {}):
            yield Difference(task.id, name, row_value, None)
