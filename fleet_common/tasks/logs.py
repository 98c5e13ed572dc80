"""Task logs: chunks addressed by byte offset, deduplicated by the agent's sequence number,
capped per task (the oldest middle is dropped, the head and the tail kept)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from fleet_common.tasks.models import TERMINAL, Task, TaskLogChunk

READ_LIMIT = 1_048_576


@dataclass(frozen=True)
class LogSlice:
    offset: int
    next_offset: int
    data: str
    complete: bool


def append(
    session: Session,
    task: Task,
    seq: int,
    data: str,
    *,
    max_bytes: int,
    now: dt.datetime,
) -> bool:
    """Append a chunk for the task's current attempt; False when ``seq`` was already stored."""
    exists = session.scalars(
        select(TaskLogChunk.id).where(
            TaskLogChunk.task_id == task.id,
            TaskLogChunk.attempt == task.attempt,
            TaskLogChunk.seq == seq,
        )
    ).first()
    if exists is not None or not data:
        return False
    size = len(data.encode("utf-8", "replace"))
    session.add(
        TaskLogChunk(
            task_id=task.id,
            attempt=task.attempt,
            seq=seq,
            offset=task.log_bytes,
            data=data,
            created_at=now,
        )
    )
    task.log_bytes += size
    if task.log_bytes > max_bytes:
        _drop_middle(session, task, max_bytes)
    return True


def _drop_middle(session: Session, task: Task, max_bytes: int) -> None:
    """Keep the first half and the last half of the cap; drop whole chunks between."""
    head_end = max_bytes // 2
    tail_start = task.log_bytes - max_bytes // 2
    session.flush()
    session.execute(
        delete(TaskLogChunk).where(
            TaskLogChunk.task_id == task.id,
            TaskLogChunk.offset >= head_end,
            TaskLogChunk.offset < tail_start,
        )
    )


def read(session: Session, task: Task, offset: int, limit: int = READ_LIMIT) -> LogSlice:
    """The log from byte ``offset``; a dropped stretch reads as one marker line."""
    offset = max(0, min(offset, task.log_bytes))
    chunks = session.scalars(
        select(TaskLogChunk)
        .where(
            TaskLogChunk.task_id == task.id,
            TaskLogChunk.offset >= _first_offset(session, task, offset),
        )
        .order_by(TaskLogChunk.offset)
    )
    parts: list[bytes] = []
    position = offset
    size = 0
    for chunk in chunks:
        raw = chunk.data.encode("utf-8", "replace")
        end = chunk.offset + len(raw)
        if end <= position:
            continue
        if chunk.offset > position:
            marker = f"\n[... {chunk.offset - position} bytes dropped ...]\n".encode()
            parts.append(marker)
            size += len(marker)
            position = chunk.offset
        piece = raw[position - chunk.offset :]
        parts.append(piece)
        size += len(piece)
        position = end
        if size >= limit:
            break
    if not parts and position < task.log_bytes:
        # Everything from here on was dropped (only possible before the tail arrives).
        position = task.log_bytes
    text = b"".join(parts).decode("utf-8", "replace")
    done = task.status in TERMINAL and position >= task.log_bytes
    return LogSlice(offset=offset, next_offset=position, data=text, complete=done)


def _first_offset(session: Session, task: Task, offset: int) -> int:
    """The start of the chunk containing ``offset`` (or the next one after a gap)."""
    start = session.scalar(
        select(TaskLogChunk.offset)
        .where(TaskLogChunk.task_id == task.id, TaskLogChunk.offset <= offset)
        .order_by(TaskLogChunk.offset.desc())
        .limit(1)
    )
    return start if start is not None else offset
