"""A job queue served by one daemon thread per process: started at first use, and again in a
forked child (Celery prefork), which inherits the queue but not its thread."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class ServedQueue(Generic[T]):
    def __init__(self, name: str, serve: Callable[[queue.SimpleQueue[T]], None]) -> None:
        self._name, self._serve = name, serve
        self._queue: queue.SimpleQueue[T] | None = None
        self._pid = 0

    def jobs(self) -> queue.SimpleQueue[T]:
        """The queue, its thread started if this process has none yet (call it under the
        owner's lock, so two callers never start two threads)."""
        if self._queue is None or self._pid != os.getpid():
            self._queue, self._pid = queue.SimpleQueue(), os.getpid()
            thread = threading.Thread(
                target=self._serve, args=(self._queue,), name=self._name, daemon=True
            )
            thread.start()
        return self._queue
