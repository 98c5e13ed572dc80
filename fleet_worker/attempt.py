"""Run one claimed task attempt on a worker: plan it, stream its log into the database, stop it
when it is cancelled or its lease is lost, and report the outcome — every write fenced by the
attempt's lease token."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleet_common.db import Database, utcnow
from fleet_common.errors import FleetError, NotFound, StaleLease
from fleet_common.settings import AgentTypeSettings, HostSettings, Settings
from fleet_common.tasks import lease, logs
from fleet_common.tasks.models import Task
from fleet_common.tasks.state import Reason
from fleet_worker.executors.base import Executor, ExecutorError, RunResult
from fleet_worker.outcome import outcome_of
from fleet_worker.redaction import Redactor
from fleet_worker.workspace import plan_run

log = logging.getLogger("fleet.worker")

FLUSH_SECS = 0.5  # the log in the database is at most this far behind the agent
FLUSH_BYTES = 65_536
CHECK_SECS = 1.0  # how often a silent run asks the database whether it was cancelled


@dataclass(frozen=True)
class Attempt:
    """What a worker needs of a claim, copied out of the claiming transaction."""

    task_id: str
    agent_id: str
    lease_token: str
    attempt: int
    prompt: str
    repo: str
    clone_url: str
    timeout_secs: int

    @classmethod
    def of(cls, task: Task, lease_token: str) -> Attempt:
        return cls(
            task.id,
            task.agent_id or "",
            lease_token,
            task.attempt,
            task.prompt or "",
            task.repo or "",
            task.clone_url or "",
            task.timeout_secs,
        )


class Control:
    """How the rest of the worker stops a running attempt (cancel, lost lease, shutdown)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self.stopping_worker = False

    def stop(self, *, worker_shutdown: bool = False) -> None:
        self.stopping_worker = self.stopping_worker or worker_shutdown
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()


class AttemptRun:
    """One attempt from start to report."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        host: HostSettings,
        agent_type: AgentTypeSettings,
        executor: Executor,
        attempt: Attempt,
        control: Control,
    ) -> None:
        self.db = db
        self.settings = settings
        self.host = host
        self.agent_type = agent_type
        self.executor = executor
        self.attempt = attempt
        self.control = control
        self._buffer = bytearray()
        self._seq = 0
        self._last_flush = self._last_check = time.monotonic()
        self._lock = threading.Lock()

    def run(self) -> None:
        """Run the attempt and report it; never raises for a task-level failure."""
        a = self.attempt
        if not self._fenced(
            lambda s, held: lease.report_status(s, held, "running", None, now=utcnow())
        ):
            return
        orch = self.settings.orchestrator
        timeout = min(a.timeout_secs, self.agent_type.timeout_secs or a.timeout_secs)
        try:
            spec = plan_run(
                self.host,
                self.agent_type,
                task_id=a.task_id,
                prompt=a.prompt,
                repo=a.repo,
                clone_url=a.clone_url,
                timeout_secs=timeout,
                redactor=Redactor(orch.secrets, orch.redact_patterns),
            )
            result = self.executor.run(spec, self._output, self._should_cancel)
        except ExecutorError as error:
            result = RunResult(None, error=f"connection_lost: {error}")
        except Exception as error:  # a bug or a bad template must fail the attempt, not hang it
            log.exception("attempt %s of %s crashed", a.attempt, a.task_id)
            result = RunResult(None, error=f"worker_error: {error}")
        self._flush()
        self._report(result)

    # -- output -------------------------------------------------------------------------

    def _output(self, chunk: bytes) -> None:
        with self._lock:
            self._buffer += chunk
        if len(self._buffer) >= FLUSH_BYTES or time.monotonic() - self._last_flush >= FLUSH_SECS:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            data, self._buffer = bytes(self._buffer), bytearray()
        self._last_flush = self._last_check = time.monotonic()
        if not data:
            self._check()
            return
        text = data.decode("utf-8", "replace")
        seq = self._seq
        self._seq += 1
        max_bytes = self.settings.orchestrator.max_log_bytes
        self._fenced(
            lambda s, held: logs.append(s, held.task, seq, text, max_bytes=max_bytes, now=utcnow())
        )

    # -- cancel -------------------------------------------------------------------------

    def _should_cancel(self) -> bool:
        now = time.monotonic()
        if self._buffer and now - self._last_flush >= FLUSH_SECS:
            self._flush()
        elif now - self._last_check >= CHECK_SECS:
            self._last_check = now
            self._check()
        return self.control.stopped

    def _check(self) -> None:
        self._fenced(lambda s, held: None)

    def _fenced(self, action: Callable[[Any, lease.Held], Any]) -> bool:
        """Run ``action`` under the attempt's lease (renewing it); stop the run and return False
        when the task was cancelled or the lease is no longer ours."""
        a = self.attempt
        try:
            with self.db.session() as session:
                held = lease.held_task(session, a.task_id, a.agent_id, a.lease_token, now=utcnow())
                if held.cancelled:
                    self.control.stop()
                    return False
                action(session, held)
                lease.renew(held.task, self.settings.orchestrator, utcnow())
            return True
        except (StaleLease, NotFound):
            log.info("task %s: lease lost, stopping attempt %s", a.task_id, a.attempt)
            self.control.stop()
            return False
        except FleetError as error:
            log.warning("task %s: %s", a.task_id, error)
            return False
        except Exception:
            # The database is down: keep running; the lease sweep decides if this takes too long.
            log.warning("task %s: database unavailable, will retry", a.task_id, exc_info=True)
            return True

    # -- report -------------------------------------------------------------------------

    def _report(self, result: RunResult) -> None:
        outcome = outcome_of(result, stopping=self.control.stopping_worker)
        orch = self.settings.orchestrator
        if outcome.kind == "complete":
            self._final(lambda s, held: lease.complete(s, orch, held, outcome.receipt or {}))
        elif outcome.kind == "fail":
            reason = Reason(outcome.reason or Reason.EXIT_CODE)
            self._final(
                lambda s, held: lease.fail(
                    s, orch, held, outcome.error or str(reason), reason=reason
                )
            )
        log.info(
            "task %s attempt %s: %s",
            self.attempt.task_id,
            self.attempt.attempt,
            result.failure or "succeeded",
        )

    def _final(self, action: Callable[[Any, lease.Held], Any]) -> None:
        """The report must not be lost to a short database outage: retry it for a while."""
        deadline = time.monotonic() + self.settings.orchestrator.lease_secs
        a = self.attempt
        while True:
            try:
                with self.db.session() as session:
                    held = lease.held_task(
                        session, a.task_id, a.agent_id, a.lease_token, now=utcnow()
                    )
                    if not held.cancelled:
                        action(session, held)
                return
            except FleetError as error:
                log.info("task %s: report refused: %s", a.task_id, error)
                return
            except Exception:
                if time.monotonic() > deadline:
                    log.exception("task %s: could not report; the lease sweep will", a.task_id)
                    return
                time.sleep(1.0)
