"""One attempt in the pull daemon: the shared :class:`AttemptRun` with an HTTP reporter. Status
or log posts go out at least every 1.5 s while it runs; their reply says whether to stop."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fleet_common.settings import HostSettings
from fleet_worker.attempt import Attempt, AttemptRun, Control, LogChunk
from fleet_worker.executors.base import Executor
from fleet_worker.outcome import Outcome
from fleet_worker.pull_agent.client import AgentClient, ApiError, Unreachable

if TYPE_CHECKING:
    from fleet_worker.pull_agent.daemon import DaemonConfig

log = logging.getLogger("fleet.agent")


class HttpReporter:
    flush_secs = 0.5
    check_secs = 1.5  # the protocol asks for a post at least every 2 s while running

    def __init__(self, client: AgentClient, attempt: Attempt, lease_secs: float = 60) -> None:
        self.client = client
        self.attempt = attempt
        self.lease_secs = lease_secs

    def _post(self, path: str, body: dict[str, Any]) -> bool:
        a = self.attempt
        try:
            reply = self.client.call(
                f"tasks/{a.task_id}/{path}", {"lease_token": a.lease_token, **body}, retry_for=5
            )
        except ApiError as error:
            if error.status in (404, 409):
                log.info("task %s: %s; stopping", a.task_id, error)
                return False
            log.warning("task %s: %s refused: %s", a.task_id, path, error)
            return True
        except Unreachable as error:
            log.warning("task %s: %s", a.task_id, error)  # keep running; the lease decides
            return True
        return not (reply or {}).get("cancel_requested", False)

    def start(self) -> bool:
        return self._post("status", {"status": "running"})

    def log(self, seq: int, text: str) -> bool:
        return self._post("logs", {"seq": seq, "data": text})

    def check(self) -> bool:
        return self._post("status", {"status": "running"})

    def finish(self, outcome: Outcome, last_log: LogChunk | None = None) -> None:
        if last_log is not None:
            self.log(last_log.seq, last_log.text)
        if outcome.kind == "none":
            return
        a = self.attempt
        body: dict[str, Any]
        if outcome.kind == "complete":
            path, body = "complete", {"receipt": outcome.receipt or {"exit_code": 0}}
        else:
            path, body = "fail", {"error": outcome.error or "failed", "reason": outcome.reason}
        try:
            self.client.call(
                f"tasks/{a.task_id}/{path}",
                {"lease_token": a.lease_token, **body},
                retry_for=self.lease_secs,
            )
        except (ApiError, Unreachable) as error:
            log.warning("task %s: could not report %s: %s", a.task_id, path, error)


class PullAttempt:
    """A dequeued task, run on its own thread."""

    def __init__(
        self,
        client: AgentClient,
        config: DaemonConfig,
        host: HostSettings,
        executor: Executor,
        task: dict[str, Any],
        lease_token: str,
        on_done: Callable[[str], None],
    ) -> None:
        self.attempt = Attempt.of(task, lease_token)
        self.lease_token = lease_token
        self.control = Control()
        self.started = time.monotonic()
        orch = config.settings.orchestrator
        self._run = AttemptRun(
            orch,
            host,
            config.agent_type,
            executor,
            self.attempt,
            self.control,
            HttpReporter(client, self.attempt, orch.lease_secs),
        )
        self._on_done = on_done

    def run(self) -> None:
        try:
            self._run.run()
        finally:
            self._on_done(self.attempt.task_id)
