"""Local transport: the agent is a subprocess of the worker, in a process group of its own.

The child starts a new session, so its whole tree can be signalled as one process group, and
dies with its worker, however the worker dies. One small reaper per worker process (a shell in
a session of its own) reads ``+PGID`` and ``-PGID`` lines from a pipe whose write end only the
worker holds: the groups to watch. When the pipe reaches EOF (the kernel closes it when the
worker dies, SIGKILL included) the reaper kills every group still watched, then every process
that still carries this worker's tracking id in its environment (:data:`TRACKING_ENV`, read
from ``/proc/PID/environ``, as the GitHub Actions runner does with ``RUNNER_TRACKING_ID``).
The id catches what the groups miss: an agent the worker had started but not yet named to the
reaper when it died, and a descendant that left its group (``setsid``, a daemon).

Why not the parent-death signal (``PR_SET_PDEATHSIG``): it must be set in the child between
fork and exec. ``setpriv --pdeathsig KILL`` in front of the command costs an extra exec, 1.4 ms
of CPU on every spawn (measured: 2.6 ms for ``setpriv ... true`` against 1.2 ms for ``true``),
a sixth of a trivial task's whole cost in Fleet; a ``preexec_fn`` forces a full ``fork`` of the
worker instead of ``vfork`` (15-18 ms). And it reaches the direct child only, fires when the
forking *thread* exits, not the process, and needs Linux; the reaper needs ``sh``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import secrets
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fleet_worker.executors import local_fs
from fleet_worker.executors.base import DirsStep, ExecResult, Executor, ProcessHandle, StartFailed

#: The only variables the agent inherits from the worker: Fleet's secrets must not leak.
INHERITED_ENV = ("PATH", "HOME", "LANG")

#: Every process a worker starts carries the worker's tracking id in this variable.
TRACKING_ENV = "FLEET_TRACKING_ID"

#: How long closing the executor waits for removed workspaces to be deleted.
CLOSE_WAIT_SECS = 10.0

#: The reaper (``sh -c REAPER fleet-reaper TRACKING_ID``): reads ``+PGID``/``-PGID`` lines from
#: a pipe whose write end only the worker holds, keeping the watched groups in ``$g``
#: (" 12 34 "); the worker's death closes the pipe, and the reaper kills every group still
#: watched, then (a few passes, for children forked meanwhile) every process whose environment
#: holds the tracking id. Only ``kill`` and ``grep`` (once a pass) fork.
_REAPER = f"""g=' '
while read -r line; do
  p=${{line#?}}
  case $line in
    +*) g="$g$p " ;;
    -*) case $g in *" $p "*) g="${{g%% "$p" *}} ${{g#* "$p" }}" ;; esac ;;
  esac
done
for p in $g; do kill -KILL -"$p" 2>/dev/null; done
[ -d /proc ] || exit 0
for pass in 1 2 3 4 5; do
  found=$(grep -lsxzF "{TRACKING_ENV}=$1" /proc/[0-9]*/environ)
  [ -n "$found" ] || exit 0
  for f in $found; do p=${{f#/proc/}}; kill -KILL "${{p%/environ}}" 2>/dev/null; done
done
"""


def agent_environment(
    env: Mapping[str, str], parent: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``env`` on top of the few variables inherited from ``parent`` (the worker's)."""
    parent = os.environ if parent is None else parent
    result = {name: parent[name] for name in INHERITED_ENV if name in parent}
    result.update(env)
    return result


class _Reaper:
    """This process's reaper (see the module docstring): started on first use and again if it
    died. A forked child (Celery prefork) gets a tracking id and a reaper of its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._popen: subprocess.Popen[bytes] | None = None
        self._tracking_id = secrets.token_hex(8)
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        # The parent's reaper must see EOF when the parent dies: no child keeps the write end.
        if self._popen is not None and self._popen.stdin is not None:
            with contextlib.suppress(OSError):
                self._popen.stdin.close()
        self._lock, self._popen = threading.Lock(), None
        self._tracking_id = secrets.token_hex(8)

    def tracking_id(self) -> str:
        """The id every process started here carries, once the reaper runs; StartFailed if it
        cannot be started (an agent that might outlive a killed worker is not started)."""
        with self._lock:
            if self._running(start=True) is None:
                raise StartFailed("cannot start the reaper that stops agents with their worker")
            return self._tracking_id

    def watch(self, pgid: int) -> None:
        """Kill group ``pgid`` if this process dies."""
        self._send(f"+{pgid}\n", start=True)

    def forget(self, pgid: int) -> None:
        """The group is gone (its id may be reused): stop watching it."""
        self._send(f"-{pgid}\n", start=False)

    def _send(self, line: str, *, start: bool) -> None:
        with self._lock:
            for _ in range(2):  # a reaper found dead is started again, once
                popen = self._running(start=start)
                if popen is None or popen.stdin is None:
                    return
                try:
                    os.write(popen.stdin.fileno(), line.encode())
                    return
                except OSError:
                    self._popen = None
                    with contextlib.suppress(OSError):
                        popen.stdin.close()
                    popen.poll()  # reaped, if it is dead

    def _running(self, *, start: bool) -> subprocess.Popen[bytes] | None:
        # Not polled for each line: a dead reaper's pipe refuses the write (BrokenPipeError),
        # and the next write starts a new one.
        popen = self._popen
        if popen is not None:
            return popen
        if not start:
            return None
        try:
            self._popen = subprocess.Popen(
                ["sh", "-c", _REAPER, "fleet-reaper", self._tracking_id],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # not in the worker's group: a Ctrl-C must not take it
                close_fds=True,
            )
        except OSError:
            self._popen = None
        return self._popen


_REAPER_PROCESS = _Reaper()


class _LocalProcess(ProcessHandle):
    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        assert popen.stdout is not None
        self._popen = popen
        _REAPER_PROCESS.watch(popen.pid)
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
        if not self._out.closed:
            self._out.close()
            _REAPER_PROCESS.forget(self._popen.pid)


class LocalExecutor(Executor):
    """Runs commands as local subprocesses of this process."""

    def __init__(self, parent_env: Mapping[str, str] | None = None) -> None:
        self._parent_env = parent_env

    def start(
        self, argv: Sequence[str], *, cwd: str | None, env: Mapping[str, str]
    ) -> ProcessHandle:
        """Start ``argv`` in a new session that dies with this process."""
        full_env = agent_environment(env, self._parent_env)
        full_env[TRACKING_ENV] = _REAPER_PROCESS.tracking_id()
        # Found here: a missing command fails with the error exec would give, and a program
        # given by path saves subprocess trying every PATH entry in the child.
        program = _executable(argv[0], cwd, full_env.get("PATH", os.defpath))
        try:
            popen = subprocess.Popen(
                list(argv),
                executable=program,
                cwd=cwd or None,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,  # not the reaper's pipe, above all
            )
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
    program = _on_path(name, path)
    if program is None or not os.access(program, os.X_OK):  # gone since: search again
        _on_path.cache_clear()
        program = _on_path(name, path)
    if program is None:
        raise StartFailed(os.strerror(errno.ENOENT))
    # Found through a relative PATH entry: leave the search to exec, from the agent's cwd.
    return program if os.path.isabs(program) else name


@functools.lru_cache(maxsize=256)
def _on_path(name: str, path: str) -> str | None:
    """``name`` searched on ``path``, remembered like a shell's command hash: a program
    installed earlier on the path later is found once the one remembered is gone."""
    return shutil.which(name, path=path)
