"""Local transport: the agent is a subprocess of the worker, in a process group of its own.

The child starts a new session (so its whole tree can be signalled as one process group) and
asks the kernel for SIGKILL when its parent dies (Linux ``PR_SET_PDEATHSIG``), so a worker
that is SIGKILLed leaves no agent running. The signal is set by ``setpriv --pdeathsig KILL``
(util-linux) in front of the command, which lets ``subprocess`` start the child with
``vfork`` (under 1 ms); only where ``setpriv`` is missing is it set by a Python
``preexec_fn``, which forces a full ``fork`` of the worker (15-18 ms per spawn).

The parent-death signal reaches the agent only, not the processes the agent started; one
small reaper per worker process (a shell in a session of its own, reading from a pipe only the
worker holds the groups to watch, ``+PGID`` and ``-PGID`` lines) kills every group still
watched when the pipe reaches EOF: when the worker dies, however it dies.

``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, not the process. A
run started from a short-lived thread (a thread pool that shrinks, a per-task thread) would
kill its agent when that thread ends. So a child started with :meth:`LocalExecutor.start`,
whose handle may outlive the calling thread, is forked by one daemon thread that lives as long
as the process (:class:`_Spawner`). A child started by ``execute`` (every step and agent of an
attempt) is forked by the calling thread itself, which waits for it to the end: this saves two
thread wake-ups on the way to the agent.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from fleet_worker.executors import local_fs
from fleet_worker.executors.base import DirsStep, ExecResult, Executor, ProcessHandle, StartFailed
from fleet_worker.executors.served_queue import ServedQueue

#: The only variables the agent inherits from the worker: Fleet's secrets must not leak.
INHERITED_ENV = ("PATH", "HOME", "LANG")

#: How long closing the executor waits for removed workspaces to be deleted.
CLOSE_WAIT_SECS = 10.0

_PR_SET_PDEATHSIG = 1

#: The reaper: reads ``+PGID``/``-PGID`` lines from a pipe whose write end only the worker
#: holds, keeping the watched groups in ``$g`` (" 12 34 "); the worker's death closes the pipe,
#: and the reaper kills every group still watched. No command but ``kill`` forks.
_REAPER = """g=' '
while read -r line; do
  p=${line#?}
  case $line in
    +*) g="$g$p " ;;
    -*) case $g in *" $p "*) g="${g%% "$p" *} ${g#* "$p" }" ;; esac ;;
  esac
done
for p in $g; do kill -KILL -"$p" 2>/dev/null; done
"""


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


def _find_setpriv() -> str | None:
    path = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if path is None:
        return None
    try:  # util-linux's setpriv; busybox's has no --pdeathsig
        probe = subprocess.run(
            [path, "--pdeathsig", "KILL", "--", "true"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return path if probe.returncode == 0 else None


#: ``setpriv`` sets the parent-death signal and execs the command (see the module docstring).
SETPRIV = _find_setpriv()


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
        self._jobs: ServedQueue[tuple[Callable[[], Any], Future[Any]]] = ServedQueue(
            "fleet-spawner", self._loop
        )
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        # A forked child (Celery prefork) has the lock's state: a lock of its own.
        self._lock = threading.Lock()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the spawner thread and return its result (or raise its exception)."""
        with self._lock:
            jobs = self._jobs.jobs()
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


class _Reaper:
    """This process's reaper (see the module docstring), started on first use and again in a
    forked child or if it died."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._popen: subprocess.Popen[bytes] | None = None
        self._pid = 0  # the process that started it

    def watch(self, pgid: int) -> bool:
        """Kill group ``pgid`` if this process dies; False if no reaper could be started (the
        parent-death signal still stops the agent itself)."""
        return self._send(f"+{pgid}\n", start=True)

    def forget(self, pgid: int) -> None:
        """The group is gone (its id may be reused): stop watching it."""
        self._send(f"-{pgid}\n", start=False)

    def _send(self, line: str, *, start: bool) -> bool:
        with self._lock:
            popen = self._popen
            if popen is None or self._pid != os.getpid() or popen.poll() is not None:
                if not start:
                    return False
                popen = self._start()
                if popen is None:
                    return False
            assert popen.stdin is not None
            try:
                os.write(popen.stdin.fileno(), line.encode())
            except OSError:
                self._popen = None
                return False
            return True

    def _start(self) -> subprocess.Popen[bytes] | None:
        try:
            self._popen = subprocess.Popen(
                ["sh", "-c", _REAPER, "fleet-reaper"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # not in the worker's group: a Ctrl-C must not take it
                close_fds=True,
            )
        except OSError:
            self._popen = None
        self._pid = os.getpid()
        return self._popen


_REAPER_PROCESS = _Reaper()


class _LocalProcess(ProcessHandle):
    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        assert popen.stdout is not None
        self._popen = popen
        self._watched = _REAPER_PROCESS.watch(popen.pid)
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
        if self._watched:
            self._watched = False
            _REAPER_PROCESS.forget(self._popen.pid)


class LocalExecutor(Executor):
    """Runs commands as local subprocesses of this process."""

    def __init__(self, parent_env: Mapping[str, str] | None = None) -> None:
        self._parent_env = parent_env

    def start(
        self, argv: Sequence[str], *, cwd: str | None, env: Mapping[str, str]
    ) -> ProcessHandle:
        """Start ``argv`` in a new session that dies with this process."""
        return self._start(argv, cwd, env, _SPAWNER.call)

    def start_supervised(
        self, argv: Sequence[str], *, cwd: str | None, env: Mapping[str, str]
    ) -> ProcessHandle:
        """Start ``argv`` from the calling thread, which waits for it to its end."""
        return self._start(argv, cwd, env, lambda spawn: spawn())

    def _start(
        self,
        argv: Sequence[str],
        cwd: str | None,
        env: Mapping[str, str],
        forker: Callable[[Callable[[], subprocess.Popen[bytes]]], subprocess.Popen[bytes]],
    ) -> ProcessHandle:
        full_env = agent_environment(env, self._parent_env)
        if SETPRIV is not None:
            # Found here, so that a missing command fails to start as it would without setpriv.
            program = _executable(argv[0], cwd, full_env.get("PATH", os.defpath))
            command, setup = [SETPRIV, "--pdeathsig", "KILL", "--", program, *argv[1:]], None
        else:
            command, setup = list(argv), _die_with_parent(os.getpid())

        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                command,
                cwd=cwd or None,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=setup,  # None (vfork) with setpriv; else only prctl
                close_fds=True,
            )

        try:
            popen = forker(spawn)
        except OSError as exc:
            where = f" in {cwd}" if cwd else ""
            raise StartFailed(f"{exc.strerror or exc}{where}") from None
        return _LocalProcess(popen)

    def dirs(self, step: DirsStep, **run: Any) -> ExecResult:
        """Remove and create the directories in this process: no ``rm``/``mkdir`` to start
        (:mod:`local_fs`: a removed tree is renamed away and deleted by another thread)."""
        started = time.monotonic()
        try:
            for path in step.remove:
                local_fs.remove_tree(path)
            for path in step.make:
                local_fs.make_dirs(path)
        except OSError as exc:
            run["on_output"](f"[fleet] {step.name}: {exc}\n".encode())
            return ExecResult(1, duration_secs=time.monotonic() - started)
        return ExecResult(0, duration_secs=time.monotonic() - started)

    def write_file(self, path: str, data: bytes, *, append: bool = False) -> None:
        """Write ``data`` to a local file readable by this user only."""
        local_fs.write_file(path, data, append=append)

    def close(self) -> None:
        """Let the trees removed so far be deleted (a process that exits leaves them to the
        next one otherwise)."""
        local_fs.wait_removed(CLOSE_WAIT_SECS)

    def read_file(self, path: str, limit: int) -> bytes | None:
        """At most ``limit`` bytes of a local file, ``None`` if it does not exist."""
        try:
            with open(path, "rb") as fh:
                return fh.read(limit)
        except FileNotFoundError:
            return None


def _executable(name: str, cwd: str | None, path: str) -> str:
    """Where ``execvp`` would find ``name`` (searched on ``path`` unless it has a slash);
    StartFailed with the error exec would report when there is no such program."""
    if "/" in name:
        found = os.path.join(cwd, name) if cwd and not os.path.isabs(name) else name
        if not os.path.exists(found):
            raise StartFailed(os.strerror(errno.ENOENT) + (f" in {cwd}" if cwd else ""))
        if os.path.isdir(found) or not os.access(found, os.X_OK):
            raise StartFailed(os.strerror(errno.EACCES))
        return name  # relative to cwd, which the child changes to before exec
    program = shutil.which(name, path=path)
    if program is None:
        raise StartFailed(os.strerror(errno.ENOENT))
    # Found through a relative PATH entry: leave the search to exec, from the agent's cwd.
    return program if os.path.isabs(program) else name
