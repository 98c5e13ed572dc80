"""Taking work off a queue in batches: the next item, what is already waiting, and what comes
within a while."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class _Queue(Protocol[T_co]):
    def get(self, block: bool = True, timeout: float | None = None) -> T_co: ...

    def get_nowait(self) -> T_co: ...


def take_batch(
    jobs: _Queue[T],
    until: Callable[[], float],
    limit: int,
    more: Callable[[T], bool] = lambda item: True,
) -> list[T]:
    """The next item (waiting for it), then every item already waiting or coming before
    ``until()`` (a ``time.monotonic()`` reading, asked once the first item is in), up to
    ``limit`` items and while ``more(last item)`` holds."""
    batch = [jobs.get()]
    deadline = until()
    while len(batch) < limit and more(batch[-1]):
        left = deadline - time.monotonic()
        try:
            batch.append(jobs.get(timeout=left) if left > 0 else jobs.get_nowait())
        except queue.Empty:
            break
    return batch
