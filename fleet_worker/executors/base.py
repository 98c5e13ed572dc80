"""The executor interface: run commands on a host, stream their output, stop their trees.

A transport (local subprocess, SSH) implements four primitives: :meth:`Executor.start` a
command as a killable process tree, and read and write small files. Everything else is shared
and written once here: the supervision loop (streaming, cancel polling, timeout, SIGTERM then
SIGKILL) and the task run (workspace steps, the agent, hooks, receipt, cleanup).
"""

from __future__ import annotations

import shlex
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fleet_worker.receipts import MAX_RECEIPT_BYTES, parse_receipt
from fleet_worker.redaction import Redactor

OutputSink = Callable[[bytes], None]
CancelCheck = Callable[[], bool]

READ_POLL_SECS = 0.1  # longest a read blocks, so cancel and timeout are noticed promptly
CANCEL_POLL_SECS = 0.25  # should_cancel is called at most this often (the contract: <= 0.5 s)
IDLE_FLUSH_SECS = 0.5  # output paused this long: release text held back for redaction
STRAGGLER_GRACE_SECS = 0.5  # main process exited but its children still hold the output open
GIVE_UP_SECS = 5.0  # after SIGKILL, stop waiting for the exit status after this long
CLEANUP_TIMEOUT_SECS = 120.0


def never() -> bool:
    """A ``should_cancel`` that never cancels."""
    return False


class ExecutorError(Exception):
    """The host could not be used at all (connection, authentication); nothing ran."""


class HostKeyError(ExecutorError):
    """The SSH host key is unknown or does not match ``known_hosts``."""


class StartFailed(Exception):
    """The command could not be started (not found, bad working directory)."""


class ProcessHandle(ABC):
    """A started command: its merged output, its exit, and its process tree."""

    #: Set when the transport broke while the command ran (SSH connection lost).
    lost: str | None = None

    @abstractmethod
    def read(self, timeout: float) -> bytes | None:
        """Output that arrives within ``timeout`` seconds: ``b""`` if none, ``None`` at its end."""

    @abstractmethod
    def wait(self, timeout: float) -> int | None:
        """The exit code if the command ends within ``timeout`` seconds, else ``None``."""

    @abstractmethod
    def terminate(self) -> None:
        """Ask the whole process tree to stop (SIGTERM to its process group)."""

    @abstractmethod
    def kill(self) -> None:
        """Kill the whole process tree (SIGKILL to its process group)."""

    def close(self) -> None:  # noqa: B027 - optional for transports with nothing to release
        """Release the handle's resources (pipes, channels)."""


@dataclass(frozen=True)
class ExecResult:
    """How one command ended. ``exit_code`` is ``None`` when it is unknown."""

    exit_code: int | None
    timed_out: bool = False
    cancelled: bool = False
    duration_secs: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class CommandStep:
    """One argv to run on the host, e.g. ``git clone`` or a hook."""

    name: str
    argv: tuple[str, ...]
    cwd: str | None = None


@dataclass(frozen=True)
class WriteFileStep:
    """Write (or append to) a file on the host, e.g. the prompt."""

    name: str
    path: str
    data: bytes
    append: bool = False


@dataclass(frozen=True)
class DirsStep:
    """Remove directory trees (``rm -rf``), then create directories (``mkdir -p``): workspace
    housekeeping that a transport may do without starting a process."""

    name: str
    remove: tuple[str, ...] = ()
    make: tuple[str, ...] = ()

    def command(self) -> str:
        """The same as one shell command line."""
        parts = []
        if self.remove:
            parts.append(shlex.join(["rm", "-rf", "--", *self.remove]))
        if self.make:
            parts.append(shlex.join(["mkdir", "-p", "--", *self.make]))
        return " && ".join(parts) or "true"

    def as_argv(self) -> tuple[str, ...]:
        """What a transport without a shortcut runs: the command line, in one ``sh``."""
        return ("sh", "-c", self.command())


Step = CommandStep | WriteFileStep | DirsStep


@dataclass(frozen=True)
class RunSpec:
    """Everything needed to run one task attempt; built by ``workspace.plan_run``.

    ``setup`` prepares the workspace and writes the prompt file, ``after`` runs once the agent
    has exited on its own, ``teardown`` removes the workspace when ``cleanup`` says so.
    """

    task_id: str
    argv: tuple[str, ...]
    workspace: str
    prompt_path: str
    receipt_path: str
    env: Mapping[str, str] = field(default_factory=dict)
    timeout_secs: float | None = None
    branch: str = ""
    clone_url: str = ""
    setup: tuple[Step, ...] = ()
    after: tuple[Step, ...] = ()
    teardown: tuple[CommandStep | DirsStep, ...] = ()
    cleanup: str = "on_success"  # "always", "on_success" or "never"
    step_env: Mapping[str, str] = field(default_factory=dict)
    step_timeout_secs: float = 600.0
    redactor: Redactor | None = None


@dataclass(frozen=True)
class RunResult:
    """The outcome of a task attempt.

    ``exit_code`` is the agent's (``None`` if it never ran or the result is unknown);
    ``error`` names a failure outside the agent (``clone_failed: ...``, ``connection_lost``).
    """

    exit_code: int | None
    timed_out: bool = False
    cancelled: bool = False
    receipt: dict[str, Any] | None = None
    receipt_error: str | None = None
    duration_secs: float = 0.0
    error: str | None = None
    workspace_removed: bool = False

    @property
    def failure(self) -> str | None:
        """Why the attempt failed (``timeout``, ``cancelled``, ``exit_code: 2``, ...), or None."""
        if self.cancelled:
            return "cancelled"
        if self.timed_out:
            return "timeout"
        if self.error:
            return self.error
        if self.exit_code != 0:
            return f"exit_code: {self.exit_code}"
        return self.receipt_error

    @property
    def succeeded(self) -> bool:
        """The agent exited 0, every step passed and the receipt is valid."""
        return self.failure is None


class Executor(ABC):
    """Runs commands and task attempts on one host. Thread-safe; call :meth:`close` at the end."""

    #: How long a SIGTERMed tree gets before SIGKILL.
    kill_grace_secs: float = 2.0

    @abstractmethod
    def start(
        self, argv: Sequence[str], *, cwd: str | None, env: Mapping[str, str]
    ) -> ProcessHandle:
        """Start ``argv`` as its own process tree with stdout and stderr merged.

        Raises :class:`StartFailed` if the command cannot start, :class:`ExecutorError` if the
        host cannot be reached.
        """

    @abstractmethod
    def write_file(self, path: str, data: bytes, *, append: bool = False) -> None:
        """Write ``data`` to ``path`` on the host."""

    @abstractmethod
    def read_file(self, path: str, limit: int) -> bytes | None:
        """At most ``limit`` bytes of the file at ``path`` on the host; ``None`` if missing."""

    def dirs(self, step: DirsStep, **run: Any) -> ExecResult:
        """Do ``step``: by default as one command (``run`` are :meth:`execute`'s options)."""
        return self.execute(step.as_argv(), **run)

    def close(self) -> None:  # noqa: B027 - optional for transports with nothing to release
        """Release connections; the executor must not be used afterwards."""

    def execute(
        self,
        argv: Sequence[str],
        *,
        on_output: OutputSink,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_secs: float | None = None,
        should_cancel: CancelCheck = never,
        on_idle: Callable[[], None] | None = None,
    ) -> ExecResult:
        """Run one command to its end, streaming output, honouring cancel and timeout.

        ``should_cancel`` is polled every 0.25 s; when it turns true, or at ``timeout_secs``,
        the tree gets SIGTERM and, ``kill_grace_secs`` later, SIGKILL. When the main process
        exits, anything it left behind holding the output open is killed too.
        """
        started = time.monotonic()
        try:
            proc = self.start(argv, cwd=cwd, env=dict(env or {}))
        except StartFailed as exc:
            on_output(f"[fleet] cannot start {argv[0]!r}: {exc}\n".encode())
            return ExecResult(127, duration_secs=time.monotonic() - started)
        try:
            return _supervise(
                proc, started, timeout_secs, self.kill_grace_secs, on_output, should_cancel, on_idle
            )
        finally:
            proc.close()

    def run(
        self, spec: RunSpec, on_output: OutputSink, should_cancel: CancelCheck = never
    ) -> RunResult:
        """Run a task attempt: setup steps, the agent, after steps, receipt, cleanup.

        Output of every step goes to ``on_output``, redacted when the spec has a redactor.
        Task-level failures are in the result; :class:`ExecutorError` is raised only when the
        host cannot be reached.
        """
        started = time.monotonic()
        stream = spec.redactor.stream(on_output) if spec.redactor else None
        try:
            result = _Attempt(self, spec, stream or on_output, should_cancel).run(
                stream.flush_idle if stream else None
            )
        finally:
            if stream:
                stream.close()
        if spec.redactor and result.receipt:
            result = replace(result, receipt=_redact_values(spec.redactor, result.receipt))
        return replace(result, duration_secs=time.monotonic() - started)


def _supervise(
    proc: ProcessHandle,
    started: float,
    timeout_secs: float | None,
    kill_grace: float,
    on_output: OutputSink,
    should_cancel: CancelCheck,
    on_idle: Callable[[], None] | None,
) -> ExecResult:
    """The one streaming/stop loop every transport shares."""
    now = time.monotonic
    deadline = started + timeout_secs if timeout_secs else None
    timed_out = cancelled = killed = output_done = False
    exit_code: int | None = None
    exited_at = stop_at = 0.0
    last_output, idle_flushed, next_cancel_check = started, True, started
    while True:
        if not output_done:
            chunk = proc.read(READ_POLL_SECS)
            if chunk is None:
                output_done = True
            elif chunk:
                on_output(chunk)
                last_output, idle_flushed = now(), False
            elif on_idle and not idle_flushed and now() - last_output >= IDLE_FLUSH_SECS:
                on_idle()
                idle_flushed = True
        if exit_code is None:
            exit_code = proc.wait(READ_POLL_SECS if output_done else 0)
            exited_at = now()
        t = now()
        if exit_code is not None:
            if output_done:
                break
            if not killed and t - exited_at >= STRAGGLER_GRACE_SECS:
                proc.kill()
                killed = True
            if t - exited_at >= STRAGGLER_GRACE_SECS + GIVE_UP_SECS:
                break
            continue
        if not (timed_out or cancelled):
            if deadline is not None and t >= deadline:
                timed_out = True
            elif t >= next_cancel_check:
                next_cancel_check = t + CANCEL_POLL_SECS
                cancelled = bool(should_cancel())
            if timed_out or cancelled:
                proc.terminate()
                stop_at = t
        elif not killed and t - stop_at >= kill_grace:
            proc.kill()
            killed = True
        elif killed and t - stop_at >= kill_grace + GIVE_UP_SECS:
            break  # the tree is SIGKILLed; stop waiting for a status that may never come
    if proc.lost:
        exit_code = None
    return ExecResult(exit_code, timed_out, cancelled, now() - started, proc.lost)


class _Attempt:
    """One task attempt on one executor (kept apart from :class:`Executor` for readability)."""

    def __init__(
        self, executor: Executor, spec: RunSpec, sink: OutputSink, should_cancel: CancelCheck
    ) -> None:
        self.executor = executor
        self.spec = spec
        self.sink = sink
        self.should_cancel = should_cancel
        self.on_idle: Callable[[], None] | None = None

    def run(self, on_idle: Callable[[], None] | None) -> RunResult:
        self.on_idle = on_idle
        spec = self.spec
        for step in spec.setup:
            failed = self.step(step)
            if failed is not None:
                return self.finish(failed)
        self.note(f"agent: {shlex.join(spec.argv)}")
        agent = self.executor.execute(
            spec.argv,
            on_output=self.sink,
            cwd=spec.workspace,
            env=spec.env,
            timeout_secs=spec.timeout_secs,
            should_cancel=self.should_cancel,
            on_idle=on_idle,
        )
        result = RunResult(
            agent.exit_code,
            timed_out=agent.timed_out,
            cancelled=agent.cancelled,
            error=f"connection_lost: {agent.error}" if agent.error else None,
        )
        if result.timed_out or result.cancelled or result.error or agent.exit_code is None:
            return self.finish(result)
        self.note(f"agent exited with code {agent.exit_code}")
        for step in spec.after:
            failed = self.step(step)
            if failed is not None:
                return self.finish(replace(failed, exit_code=agent.exit_code))
        try:
            data = self.executor.read_file(spec.receipt_path, MAX_RECEIPT_BYTES + 1)
        except OSError as exc:
            unreadable = f"receipt_invalid: cannot read {spec.receipt_path}: {exc}"
            return self.finish(replace(result, receipt_error=unreadable))
        outcome = parse_receipt(data, agent.exit_code)
        return self.finish(replace(result, receipt=outcome.receipt, receipt_error=outcome.error))

    def step(self, step: Step) -> RunResult | None:
        """Run a setup or after step; a RunResult describing the failure, or None."""
        if isinstance(step, WriteFileStep):
            try:
                self.executor.write_file(step.path, step.data, append=step.append)
            except OSError as exc:
                return RunResult(None, error=f"{step.name}_failed: {exc}")
            return None
        res = self.command(step, self.spec.step_timeout_secs, self.should_cancel, self.on_idle)
        if res.cancelled:
            return RunResult(None, cancelled=True)
        if res.error:
            return RunResult(None, error=f"connection_lost: {res.error}")
        if res.timed_out:
            return RunResult(None, error=f"{step.name}_failed: timed out")
        if res.exit_code != 0:
            return RunResult(None, error=f"{step.name}_failed: exit code {res.exit_code}")
        return None

    def finish(self, result: RunResult) -> RunResult:
        policy = self.spec.cleanup
        if policy == "never" or (policy == "on_success" and not result.succeeded):
            if self.spec.teardown:
                self.note(f"keeping workspace {self.spec.workspace}")
            return result
        removed = bool(self.spec.teardown)
        for step in self.spec.teardown:
            try:
                res = self.command(step, CLEANUP_TIMEOUT_SECS, quiet=True)
            except ExecutorError as exc:  # the result stands; only the cleanup is lost
                self.note(f"cleanup failed: {exc}")
                return result
            removed = removed and res.exit_code == 0
        return replace(result, workspace_removed=removed)

    def command(
        self,
        step: CommandStep | DirsStep,
        timeout_secs: float,
        should_cancel: CancelCheck = never,
        on_idle: Callable[[], None] | None = None,
        *,
        quiet: bool = False,
    ) -> ExecResult:
        """Run a command or directory step, its output (and unless ``quiet`` a note naming
        it) in the log."""
        if not quiet:
            line = step.command() if isinstance(step, DirsStep) else shlex.join(step.argv)
            self.note(f"{step.name}: {line}")
        run: dict[str, Any] = {
            "on_output": self.sink,
            "env": self.spec.step_env,
            "timeout_secs": timeout_secs,
            "should_cancel": should_cancel,
            "on_idle": on_idle,
        }
        if isinstance(step, DirsStep):
            return self.executor.dirs(step, **run)
        return self.executor.execute(step.argv, cwd=step.cwd, **run)

    def note(self, message: str) -> None:
        self.sink(f"[fleet] {message}\n".encode())


def _redact_values(redactor: Redactor, receipt: dict[str, Any]) -> dict[str, Any]:
    return {
        key: redactor.redact_text(value) if isinstance(value, str) else value
        for key, value in receipt.items()
    }
