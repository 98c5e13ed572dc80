"""The local transport's workspace housekeeping, in this process and in few system calls.

Each system call of a worker thread gives the GIL away and waits to get it back (eight pool
threads, Celery's consumer and the heartbeat share it), so the steps of a task's run cost
more in wait than in work. Removing a tree (``rm -rf``) is one ``rename`` on the calling
thread: the tree leaves its path at once (a workspace is gone when its step ends, and a
later attempt of the same task can make it again). One daemon thread per process gathers the
renamed trees, ``.<name>.removing-<pid>-<n>`` in the same directory (task ids start with a
letter or digit, so no workspace has such a name), for up to :data:`GATHER_SECS`, and deletes
them with one ``rm -rf`` process: the deleting happens outside this process and its GIL
(deleting a workspace with :func:`shutil.rmtree` was 8% of a busy worker's CPU). Trees that a
previous process renamed but did not delete (it died first) go with the first removal in
their directory.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import posixpath
import queue
import shutil
import stat
import subprocess
import threading
import time

from fleet_worker.batches import take_batch
from fleet_worker.executors.served_queue import ServedQueue

log = logging.getLogger("fleet.worker")

_TRASH_MARK = ".removing-"

#: How long the remover gathers renamed trees before one ``rm`` deletes them all, and how many
#: at most; waiting for the removals (:func:`wait_removed`) cuts the gathering short.
GATHER_SECS = 0.5
GATHER_MAX = 256

#: Put on the queue to wake the remover without a tree.
_HURRY = ""


def remove_tree(path: str) -> None:
    """``rm -rf -- path``: a directory tree, a file or a symlink (not its target); no error if
    it does not exist. The path is free when this returns; a tree's contents go later."""
    _REMOVER.remove(path)


def make_dirs(path: str) -> None:
    """``mkdir -p -- path``, trying the directory itself first (one call when its parent
    exists, as a workspace's parent does)."""
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
    except FileNotFoundError:
        parent = posixpath.dirname(path.rstrip("/"))
        if not parent or parent == path:
            raise
        make_dirs(parent)
        make_dirs(path)


def write_file(path: str, data: bytes, *, append: bool = False) -> None:
    """Write ``data`` to a file readable by this user only (no buffered file object)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _remove_now(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


class _Remover:
    """Renames trees away and deletes them on one daemon thread per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: ServedQueue[str] = ServedQueue("fleet-remover", self._loop)
        self._names = itertools.count()
        self._swept: set[str] = set()
        self._pending = 0
        self._hurry = False
        self._idle = threading.Condition(self._lock)
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        # A forked child (Celery prefork) has the lock's state and the counts, not the thread.
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending, self._swept, self._hurry = 0, set(), False

    def remove(self, path: str) -> None:
        parent, name = posixpath.split(path.rstrip("/"))
        trash = posixpath.join(parent, f".{name}{_TRASH_MARK}{os.getpid()}-{next(self._names)}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        except OSError:  # a mount point, no permission on the parent, a name taken: as before
            _remove_now(path)
            return
        self._put(trash, parent)

    def _put(self, trash: str, parent: str) -> None:
        with self._lock:
            jobs = self._jobs.jobs()
            sweep = parent not in self._swept
            self._swept.add(parent)
            self._pending += 1
            jobs.put(trash)
            if sweep:
                self._pending += 1
                jobs.put(parent + "/")  # a directory to sweep for leftovers

    def wait(self, timeout: float) -> bool:
        """Wait until every tree handed over so far is deleted (at most ``timeout`` s)."""
        with self._idle:
            if self._pending:
                self._hurry = True
                self._jobs.jobs().put(_HURRY)
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def _loop(self, jobs: queue.SimpleQueue[str]) -> None:
        while True:
            batch = self._gather(jobs)
            try:
                trees = [job for job in batch if job and not job.endswith("/")]
                for parent in (job for job in batch if job.endswith("/")):
                    trees += _leftovers(parent.rstrip("/") or "/")
                _delete(trees)
            finally:
                with self._idle:
                    self._pending -= sum(1 for job in batch if job)
                    self._idle.notify_all()

    def _gather(self, jobs: queue.SimpleQueue[str]) -> list[str]:
        """The next job and those that come within GATHER_SECS (none after a hurry)."""
        batch = take_batch(
            jobs, lambda: time.monotonic() + GATHER_SECS, GATHER_MAX, lambda _: not self._hurry
        )
        with self._lock:
            self._hurry = False
        return batch


def _leftovers(parent: str) -> list[str]:
    """What earlier processes renamed to be deleted in ``parent`` but left (they died first)."""
    mine = f"{_TRASH_MARK}{os.getpid()}-"
    try:
        with os.scandir(parent) as entries:
            return [
                e.path
                for e in entries
                if e.name.startswith(".") and _TRASH_MARK in e.name and mine not in e.name
            ]
    except OSError as exc:
        log.warning("cannot look for leftovers in %s: %s", parent, exc)
        return []


def _delete(paths: list[str]) -> None:
    """Delete ``paths`` with one ``rm -rf`` process; what it leaves, in this process."""
    if not paths:
        return
    with contextlib.suppress(OSError):  # no rm: then all of it here
        subprocess.run(
            ["rm", "-rf", "--", *paths],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
    for path in paths:
        try:
            _remove_now(path)
        except OSError as exc:
            log.warning("cannot remove %s: %s", path, exc)


_REMOVER = _Remover()


def wait_removed(timeout: float) -> bool:
    """Wait for this process's pending removals; False if some are still going on."""
    return _REMOVER.wait(timeout)
