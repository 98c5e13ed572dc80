"""The local transport's workspace housekeeping, in this process and in few system calls.

Each system call of a worker thread gives the GIL away and waits to get it back (eight pool
threads, Celery's consumer and the heartbeat share it), so the steps of a task's run cost
more in wait than in work. Removing a tree (``rm -rf``) is one ``rename`` on the calling
thread: the tree leaves its path at once (a workspace is gone when its step ends, and a
later attempt of the same task can make it again), and one daemon thread per process
deletes it under its hidden name, ``.<name>.removing-<pid>-<n>`` in the same directory
(task ids start with a letter or digit, so no workspace has such a name). Trees that a
previous process renamed but did not delete (it died first) are deleted with the first
removal in their directory.
"""

from __future__ import annotations

import itertools
import logging
import os
import posixpath
import queue
import shutil
import stat
import threading

from fleet_worker.executors.served_queue import ServedQueue

log = logging.getLogger("fleet.worker")

_TRASH_MARK = ".removing-"


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
        self._idle = threading.Condition(self._lock)
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        # A forked child (Celery prefork) has the lock's state and the counts, not the thread.
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending, self._swept = 0, set()

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
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def _loop(self, jobs: queue.SimpleQueue[str]) -> None:
        while True:
            job = jobs.get()
            try:
                if job.endswith("/"):
                    self._sweep(job.rstrip("/") or "/")
                else:
                    _remove_now(job)
            except OSError as exc:
                log.warning("cannot remove %s: %s", job, exc)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    @staticmethod
    def _sweep(parent: str) -> None:
        """Delete what earlier processes renamed to be deleted but left (they died first)."""
        mine = f"{_TRASH_MARK}{os.getpid()}-"
        with os.scandir(parent) as entries:
            left = [
                e.path
                for e in entries
                if e.name.startswith(".") and _TRASH_MARK in e.name and mine not in e.name
            ]
        for path in left:
            shutil.rmtree(path, ignore_errors=True)
            if os.path.lexists(path):
                _remove_now(path)


_REMOVER = _Remover()


def wait_removed(timeout: float) -> bool:
    """Wait for this process's pending removals; False if some are still going on."""
    return _REMOVER.wait(timeout)
