"""Run one claimed task attempt: plan it, stream its log, stop it when it is cancelled or its
lease is lost, and report the outcome. Where reports go is a :class:`Reporter`: the database
for a Celery worker (``fleet_worker.db_reporter``), HTTP for the pull daemon
(``fleet_worker.pull_agent.reporter``). Every report carries the attempt's lease token."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from fleet_common.settings import AgentTypeSettings, HostSettings, OrchestratorSettings
from fleet_worker.executors.base import Executor, ExecutorError, RunResult
from fleet_worker.outcome import Outcome, outcome_of
from fleet_worker.redaction import redactor_for
from fleet_worker.workspace import plan_run

log = logging.getLogger("fleet.worker")

FLUSH_BYTES = 65_536


@dataclass(frozen=True)
class Attempt:
    """What a runner needs of a claim."""

    task_id: str
    agent_id: str
    lease_token: str
    attempt: int
    prompt: str
    repo: str
    clone_url: str
    timeout_secs: int
    issue_number: int | None = None

    @classmethod
    def of(cls, task: Any, lease_token: str, agent_id: str = "") -> Attempt:
        """From a Task row or the dequeue reply's task dict."""
        get = task.get if isinstance(task, dict) else lambda k: getattr(task, k, None)
        return cls(
            str(get("id")),
            agent_id or str(get("agent_id") or ""),
            lease_token,
            int(get("attempt") or 1),
            get("prompt") or "",
            get("repo") or "",
            get("clone_url") or "",
            int(get("timeout_secs") or 1800),
            _issue_number(get("issue_number")),
        )


def _issue_number(value: Any) -> int | None:
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


class Control:
    """How the rest of the process stops a running attempt (cancel, lost lease, shutdown)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self.stopping_worker = False

    def stop(self, *, worker_shutdown: bool = False) -> None:
        self.stopping_worker = self.stopping_worker or worker_shutdown
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()


@dataclass(frozen=True)
class LogChunk:
    seq: int
    text: str


class Reporter(Protocol):
    """Where an attempt reports. ``start``/``log``/``check`` return False when the attempt
    must stop (the task was cancelled or the lease is no longer ours)."""

    flush_secs: float  # the stored log is at most this far behind the agent
    check_secs: float  # a silent run asks at least this often whether to stop

    def start(self) -> bool: ...

    def log(self, seq: int, text: str) -> bool: ...

    def check(self) -> bool: ...

    def finish(self, outcome: Outcome, last_log: LogChunk | None = None) -> None:
        """Report the outcome; ``last_log`` (the log's end, not yet sent) is stored first."""
        ...


class AttemptRun:
    """One attempt from start to report."""

    def __init__(
        self,
        orchestrator: OrchestratorSettings,
        host: HostSettings,
        agent_type: AgentTypeSettings,
        executor: Executor,
        attempt: Attempt,
        control: Control,
        reporter: Reporter,
    ) -> None:
        self.orchestrator = orchestrator
        self.host = host
        self.agent_type = agent_type
        self.executor = executor
        self.attempt = attempt
        self.control = control
        self.reporter = reporter
        self._buffer = bytearray()
        self._seq = 0
        self._last_flush = self._last_check = time.monotonic()
        self._lock = threading.Lock()

    def run(self) -> None:
        """Run the attempt and report it; never raises for a task-level failure."""
        a = self.attempt
        if not self.reporter.start():
            return
        timeout = min(a.timeout_secs, self.agent_type.timeout_secs or a.timeout_secs)
        orch = self.orchestrator
        try:
            spec = plan_run(
                self.host,
                self.agent_type,
                task_id=a.task_id,
                prompt=a.prompt,
                repo=a.repo,
                clone_url=a.clone_url,
                issue_number=a.issue_number,
                timeout_secs=timeout,
                redactor=redactor_for(orch.secrets, orch.redact_patterns),
            )
            result = self.executor.run(spec, self._output, self._should_cancel)
        except ExecutorError as error:
            result = RunResult(None, error=f"connection_lost: {error}")
        except Exception as error:  # a bug or a bad template fails the attempt, never hangs it
            log.exception("attempt %s of %s crashed", a.attempt, a.task_id)
            result = RunResult(None, error=f"worker_error: {error}")
        # The log's end goes with the outcome: one report (one transaction) instead of two.
        outcome = outcome_of(result, stopping=self.control.stopping_worker)
        self.reporter.finish(outcome, self._take())
        log.info("task %s attempt %s: %s", a.task_id, a.attempt, result.failure or "succeeded")

    def _output(self, chunk: bytes) -> None:
        with self._lock:
            self._buffer += chunk
            due = len(self._buffer) >= FLUSH_BYTES
        if due or time.monotonic() - self._last_flush >= self.reporter.flush_secs:
            self._flush()

    def _take(self) -> LogChunk | None:
        """The output not yet sent, as the log's next chunk (None if there is none)."""
        with self._lock:
            data, self._buffer = bytes(self._buffer), bytearray()
        if not data:
            return None
        chunk = LogChunk(self._seq, data.decode("utf-8", "replace"))
        self._seq += 1
        return chunk

    def _flush(self) -> None:
        chunk = self._take()
        self._last_flush = self._last_check = time.monotonic()
        ok = self.reporter.log(chunk.seq, chunk.text) if chunk else self.reporter.check()
        if not ok:
            self.control.stop()

    def _should_cancel(self) -> bool:
        now = time.monotonic()
        if (self._buffer and now - self._last_flush >= self.reporter.flush_secs) or (
            now - self._last_check >= self.reporter.check_secs
        ):
            self._flush()
        return self.control.stopped
