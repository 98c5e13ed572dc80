"""Local transport: the agent is a subprocess of the worker, in a process group of its own.

The child starts a new session (so its whole tree can be signalled as one process group) and
asks the kernel for SIGKILL when its parent dies (Linux ``PR_SET_PDEATHSIG``), so a worker
that is SIGKILLed leaves no agent running. The parent-death signal reaches the agent only, not
the processes the agent started; a small reaper next to each agent (a shell in a session of its
own, waiting for EOF on a pipe only the worker holds) kills the rest of the group when the
worker dies, however it dies.

``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, not the process. A
run started from a short-lived thread (a thread pool that shrinks, a per-task thread) would
kill its agent when that thread ends. So every child is forked by one daemon thread that lives
as long as the process (:class:`_Spawner`); the calling thread only waits for the ``Popen``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import queue
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from fleet_worker.executors.base import Executor, ProcessHandle, StartFailed

#: The only variables the agent inherits from the worker: Fleet's secrets must not leak.
INHERITED_ENV = ("PATH", "HOME", "LANG")

_PR_SET_PDEATHSIG = 1

#: The reaper: blocks reading a pipe whose write end only the worker holds; the worker's death
#: closes it, and the reaper kills the agent's process group ("$1").
_REAPER = 'read -r _; kill -KILL -"$1" 2>/dev/null'


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


# Resolved once at import: the code between fork and exec must not load libraries.
_PRCTL = _load_prctl()


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec: keep it tiny
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(1)

    return setup


class _Spawner:
    """Forks every child from one daemon thread that lives as long as the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] | None = None
        self._pid = 0
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        # A forked child (Celery prefork) has the lock state but not the thread: start afresh.
        self._lock = threading.Lock()
        self._queue = None

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the spawner thread and return its result (or raise its exception)."""
        with self._lock:
            if self._queue is None or self._pid != os.getpid():
                self._queue = queue.SimpleQueue()
                self._pid = os.getpid()
                threading.Thread(
                    target=self._loop, args=(self._queue,), name="fleet-spawner", daemon=True
                ).start()
            jobs = self._queue
        done: Future[Any] = Future()
        jobs.put((fn, done))
        return done.result()

    @staticmethod
    def _loop(jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]]) -> None:
        while True:
            fn, done = jobs.get()
            try:
                done.set_result(fn())
            except BaseException as exc:
                done.set_exception(exc)


_SPAWNER = _Spawner()


def agent_environment(
    env: Mapping[str, str], parent: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``env`` on top of the few variables inherited from ``parent`` (the worker's)."""
    parent = os.environ if parent is None else parent
    result = {name: parent[name] for name in INHERITED_ENV if name in parent}
    result.update(env)
    return result


def _start_reaper(pgid: int) -> subprocess.Popen[bytes] | None:
    """A process that kills group ``pgid`` when this process dies (see the module docstring)."""
    try:
        return subprocess.Popen(
            ["sh", "-c", _REAPER, "fleet-reaper", str(pgid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # not in the worker's group: a Ctrl-C must not take it first
            close_fds=True,
        )
    except OSError:  # the parent-death signal still stops the agent itself
        return None


class _LocalProcess(ProcessHandle):
    def __init__(
        self, popen: subprocess.Popen[bytes], reaper: subprocess.Popen[bytes] | None = None
    ) -> None:
        assert popen.stdout is not None
        self._popen = popen
        self._reaper = reaper
        self._out = popen.stdout
        os.set_blocking(self._out.fileno(), False)
        self._poll = select.poll()
        self._poll.register(self._out.fileno(), select.POLLIN)

    def read(self, timeout: float) -> bytes | None:
        if not self._poll.poll(timeout * 1000):
            return b""
        try:
            data = os.read(self._out.fileno(), 65_536)
        except BlockingIOError:
            return b""
        return data or None

    def wait(self, timeout: float) -> int | None:
        try:
            code = self._popen.wait(timeout) if timeout > 0 else self._popen.poll()
        except subprocess.TimeoutExpired:
            return None
        if code is None:
            return None
        return 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + N

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        # The child leads its own session, so its pid is its process group id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, sig)

    def close(self) -> None:
        if self._popen.poll() is None:
            self.kill()
            self._popen.wait()
        self._out.close()
        if self._reaper is not None:
            # Killed before it sees EOF: the group is gone and its id may be reused.
            self._reaper.kill()
            self._reaper.wait()
            if self._reaper.stdin is not None:
                self._reaper.stdin.close()


class LocalExecutor(Executor):
    """Runs commands as local subprocesses of this process."""

    def __init__(self, parent_env: Mapping[str, str] | None = None) -> None:
        self._parent_env = parent_env

    def start(
        self, argv: Sequence[str], *, cwd: str | None, env: Mapping[str, str]
    ) -> ProcessHandle:
        """Start ``argv`` in a new session that dies with this process."""
        full_env = agent_environment(env, self._parent_env)
        setup = _die_with_parent(os.getpid())

        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                list(argv),
                cwd=cwd or None,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=setup,  # only prctl, and forked from the spawner thread
                close_fds=True,
            )

        try:
            popen = _SPAWNER.call(spawn)
        except OSError as exc:
            where = f" in {cwd}" if cwd else ""
            raise StartFailed(f"{exc.strerror or exc}{where}") from None
        return _LocalProcess(popen, _start_reaper(popen.pid))

    def write_file(self, path: str, data: bytes, *, append: bool = False) -> None:
        """Write ``data`` to a local file readable by this user only."""
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        fd = os.open(path, flags, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)

    def read_file(self, path: str, limit: int) -> bytes | None:
        """At most ``limit`` bytes of a local file, ``None`` if it does not exist."""
        try:
            with open(path, "rb") as fh:
                return fh.read(limit)
        except FileNotFoundError:
            return None
