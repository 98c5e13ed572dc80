"""The lease holder's hot write as a single PostgreSQL statement: complete a task with a plain
receipt (and its log's last chunk). (The worker's start is part of its claim:
``claim.claim_and_start``.)

The statement moves the row and appends the event :func:`state.transition` would have
written (its ``data`` from :func:`state.event_data`), in the caller's transaction. The
completion covers only the common case (the lease current, exit code 0, no pull request
involved, the chunk new and within the log's cap); in any other case it writes nothing and
returns False, and the caller takes the general path (:mod:`fleet_common.tasks.lease`), which
decides (and refuses) exactly as before. SQLite always takes the general path.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from typing import Any

from sqlalchemy import Integer, String, column, text
from sqlalchemy.orm import Session

from fleet_common.auth import tokens
from fleet_common.db import Prebuilt
from fleet_common.dispatch import claim
from fleet_common.forgejo import writeback
from fleet_common.sql import compact
from fleet_common.tasks import state
from fleet_common.tasks.models import TaskStatus

_EVENT_COLUMNS = "task_id, seq, type, from_status, to_status, actor, data, at"

# {room}: the log chunk's condition (new, within the cap) or nothing; {chunk}: its insert;
# {then}: the worker's next claim (:func:`claim.claim_after_completion`, its agent CTEs
# {before}) or nothing, and
# {first}: with it, the agent's row is locked (shared) before the task's row, as a heartbeat
# locks them (the agent, then its tasks): a scalar subquery, evaluated once the task's row is
# found and before it is locked.
# The task's row is found by its primary key alone (``locked``), and the lease checked on the
# locked row (``held``): with the lease's conditions in the scan, the planner took the lease
# index (``lease_expires_at > :now``) whenever its statistics made it look small, as on a
# table not yet analyzed, and read every entry a finished task had left in it until the next
# vacuum (~190 a completion in a 1,000-task burst).
_COMPLETE = f"""
WITH {{before}}locked AS (
    SELECT id, status, attempt, log_bytes, agent_id, lease_digest, lease_expires_at,
        requires_pr
    FROM tasks WHERE id = :task_id {{room}}{{first}}
    FOR UPDATE
),
held AS (
    SELECT id, status, attempt, log_bytes FROM locked
    WHERE agent_id = :agent_id AND lease_digest = :lease_digest
      AND status IN ('dispatched', 'running') AND lease_expires_at > :now
      AND NOT requires_pr
),
done AS (
    UPDATE tasks SET status = 'completed', receipt = CAST(:receipt AS jsonb),
        artifacts = COALESCE(tasks.artifacts, CAST('[]' AS jsonb)), updated_at = :now,
        finished_at = :now, lease_expires_at = NULL, event_seq = tasks.event_seq + 1,
        log_bytes = tasks.log_bytes + :size
    FROM held WHERE tasks.id = held.id
    RETURNING tasks.id, tasks.event_seq, tasks.issue_number, tasks.artifacts,
        held.status AS from_status, held.attempt, held.log_bytes AS log_offset
),
event AS (
    INSERT INTO task_events ({_EVENT_COLUMNS})
    SELECT id, event_seq, 'completed', from_status, 'completed', :actor,
        jsonb_build_object('changes', jsonb_build_object(
            'receipt', CAST(:receipt AS jsonb), 'artifacts', artifacts)),
        :now
    FROM done
){{chunk}}{{then}}
SELECT {{result}}"""  # noqa: S608
_ROOM = """
      AND log_bytes + :size <= :max_bytes
      AND NOT EXISTS (SELECT 1 FROM task_log_chunks AS c
                      WHERE c.task_id = tasks.id AND c.attempt = tasks.attempt AND c.seq = :seq)"""
_CHUNK = """,
chunk AS (
    INSERT INTO task_log_chunks (task_id, attempt, seq, "offset", data, created_at)
    SELECT id, attempt, :seq, log_offset, :data, :now FROM done
)"""
_DONE = "done.id AS done_id, done.issue_number AS done_issue_number"
_DONE_COLUMNS = (column("done_id", String), column("done_issue_number", Integer))
_ALONE = {"before": "", "then": "", "first": "", "result": f"{_DONE} FROM done"}


def _then_claim(keys: int) -> dict[str, str]:
    return {
        "before": claim.AGENT_SHARED,
        "first": "\n      AND (SELECT count(*) FROM agent) >= 0",
        "then": f",\n{claim.claim_after_completion(keys)}",
        "result": f"{_DONE}, {claim.STARTED_RESULT} FROM done "
        f"LEFT JOIN ({claim.STARTED_FROM}) ON true",
    }


@functools.cache
def _completion(log: bool, keys: int | None) -> Prebuilt:
    """The completion, quiet or with the log's chunk (``log``), alone or with the worker's
    next claim (for an agent serving ``keys`` requirement keys); run by the driver (see
    :class:`Prebuilt`), built once."""
    parts = _ALONE if keys is None else _then_claim(keys)
    sql = _COMPLETE.format(room=_ROOM if log else "", chunk=_CHUNK if log else "", **parts)
    columns = (*_DONE_COLUMNS, *(claim.STARTED_COLUMNS if keys is not None else ()))
    return Prebuilt(text(compact(sql)).columns(*columns))


def on_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def is_plain(receipt: dict[str, Any]) -> bool:
    """A receipt that completes a task by itself: exit code 0, no pull request."""
    has_pr = bool(receipt.get("pr_url") or receipt.get("pr_number"))
    return not has_pr and receipt.get("exit_code", 0) == 0


def complete_plain(
    session: Session,
    task_id: str,
    agent_id: str,
    lease_token: str,
    receipt: dict[str, Any],
    log: tuple[int, str] | None,
    *,
    max_bytes: int,
    now: dt.datetime,
    then_claim: dict[str, Any] | None = None,
) -> Any:
    """Complete the task with ``receipt`` and store ``log`` (seq, text) if this is the
    common case (see the module); None, having written nothing, otherwise. ``then_claim``:
    the parameters of the worker's next claim (:func:`claim.started_params`), made by the
    same statement once the task is completed; the row returned is then also the claim's
    (:func:`claim.read_started`)."""
    if not on_postgresql(session) or not is_plain(receipt):
        return None
    state.check_move(TaskStatus.RUNNING, TaskStatus.COMPLETED)
    params: dict[str, Any] = {
        **(then_claim or {}),
        "task_id": task_id,
        "agent_id": agent_id,
        "lease_digest": tokens.digest(lease_token),
        "now": now,
        "actor": f"agent:{agent_id}",
        "receipt": json.dumps(receipt),
        "size": 0,
    }
    with_log = log is not None and bool(log[1])  # an empty chunk is not stored (logs.append)
    if log is not None and with_log:
        seq, data = log
        size = len(data.encode("utf-8", "replace"))
        params.update(seq=seq, data=data, size=size, max_bytes=max_bytes)
    statement = _completion(with_log, None if then_claim is None else then_claim["key_count"])
    row = statement.execute(session, params).first()
    if row is not None and row.done_issue_number is not None:
        writeback.inserted(session, [row.done_id])  # the write-back's flush hook cannot see it
    return row
