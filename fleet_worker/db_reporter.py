"""A Celery worker's reporter: writes go straight to the database, fenced by the lease."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from fleet_common.db import Database, utcnow
from fleet_common.dispatch import claim
from fleet_common.dispatch.claim import AgentReading, Claim
from fleet_common.errors import FleetError, NotFound, StaleLease
from fleet_common.settings import OrchestratorSettings
from fleet_common.tasks import lease, lease_sql, logs
from fleet_common.tasks.state import Reason
from fleet_worker.attempt import Attempt, LogChunk
from fleet_worker.outcome import Outcome

log = logging.getLogger("fleet.worker")


class DbReporter:
    flush_secs = 0.5
    check_secs = 1.0

    def __init__(
        self,
        db: Database,
        orchestrator: OrchestratorSettings,
        attempt: Attempt,
        *,
        pr_check: lease.PrCheck = lease.no_forge,
        started: bool = False,
        then_claim: Callable[[], AgentReading | None] | None = None,
    ) -> None:
        self.db = db
        self.orchestrator = orchestrator
        self.attempt = attempt
        self.pr_check = pr_check  # validates a receipt's PR (fleet_common.forgejo.receipts)
        #: The claim already recorded ``started`` (HostWorker claims and starts in one commit).
        self.started = started
        #: The agent's reading when the completion should also claim the agent's next task
        #: (HostWorker: the place this attempt frees goes to it), asked at completion; what
        #: it claimed, and the agent row's reading it returned, are ``next_claim`` and
        #: ``next_reading`` (None: no claim was made, or the agent takes no work).
        self.then_claim = then_claim
        self.next_claim: Claim[Any] | None = None
        self.next_reading: AgentReading | None = None

    def start(self) -> bool:
        if self.started:
            return True
        return self._fenced(
            lambda s, held: lease.report_status(s, held, "running", None, now=utcnow())
        )

    def log(self, seq: int, text: str) -> bool:
        return self._fenced(lambda s, held: self._append(s, held, LogChunk(seq, text)))

    def _append(self, session: Session, held: lease.Held, chunk: LogChunk) -> None:
        limit = self.orchestrator.max_log_bytes
        logs.append(session, held.task, chunk.seq, chunk.text, max_bytes=limit, now=utcnow())

    def check(self) -> bool:
        return self._fenced(lambda s, held: None)

    def _fenced(self, action: Callable[[Any, lease.Held], Any]) -> bool:
        """Run ``action`` under the lease (renewing it); False when the task was cancelled or
        the lease is no longer ours. A database outage is not a reason to stop the agent."""
        a = self.attempt
        try:
            with self.db.session() as session:
                held = lease.held_task(session, a.task_id, a.agent_id, a.lease_token, now=utcnow())
                if held.cancelled:
                    return False
                action(session, held)
                lease.renew(held.task, self.orchestrator, utcnow())
            return True
        except (StaleLease, NotFound):
            log.info("task %s: lease lost; stopping attempt %s", a.task_id, a.attempt)
            return False
        except FleetError as error:
            log.warning("task %s: %s", a.task_id, error)
            return True
        except Exception:
            log.warning("task %s: database unavailable; will retry", a.task_id, exc_info=True)
            return True

    def _complete_plain(self, outcome: Outcome, last_log: LogChunk | None) -> bool:
        """The common completion as one statement (:mod:`fleet_common.tasks.lease_sql`), which
        is atomic on its own, so it runs without a transaction (no BEGIN and COMMIT). Not for
        a Forgejo task: its write-back is announced by the transactional sessions' commit
        hook. False when it does not apply and the general path must decide."""
        a = self.attempt
        receipt = outcome.receipt or {"exit_code": 0}
        if (
            outcome.kind != "complete"
            or a.issue_number is not None
            or self.db.dialect != "postgresql"
            or not lease_sql.is_plain(receipt)
        ):
            return False
        then, token = None, ""
        reading = self.then_claim() if self.then_claim is not None else None
        if reading is not None:
            then, token = claim.started_params(self.orchestrator, a.agent_id, reading)
        with self.db.session(autocommit=True) as session:
            row = lease_sql.complete_plain(
                session,
                a.task_id,
                a.agent_id,
                a.lease_token,
                receipt,
                None if last_log is None else (last_log.seq, last_log.text),
                max_bytes=self.orchestrator.max_log_bytes,
                now=utcnow(),
                then_claim=then,
            )
            if row is not None and then is not None:
                self.next_claim, self.next_reading = claim.read_started(session, row, token)
        return row is not None

    def finish(self, outcome: Outcome, last_log: LogChunk | None = None) -> None:
        """Store ``last_log`` and report the outcome atomically; retried through a
        short database outage (the lease sweep acts if it lasts longer)."""
        if outcome.kind == "none":
            if last_log is not None:
                self.log(last_log.seq, last_log.text)
            return
        orch = self.orchestrator
        a = self.attempt
        deadline = time.monotonic() + orch.lease_secs
        while True:
            try:
                if self._complete_plain(outcome, last_log):
                    return
                with self.db.session() as session:
                    held = lease.held_task(
                        session, a.task_id, a.agent_id, a.lease_token, now=utcnow()
                    )
                    if last_log is not None:  # a cancelled task still takes its log
                        self._append(session, held, last_log)
                    if held.cancelled:
                        return
                    if outcome.kind == "complete":
                        receipt = outcome.receipt or {"exit_code": 0}
                        lease.complete(session, orch, held, receipt, pr_check=self.pr_check)
                    else:
                        reason = Reason(outcome.reason or Reason.EXIT_CODE)
                        lease.fail(session, orch, held, outcome.error or reason, reason=reason)
                return
            except FleetError as error:
                log.info("task %s: report refused: %s", a.task_id, error)
                if last_log is not None:  # rolled back with the refused report
                    self.log(last_log.seq, last_log.text)
                return
            except Exception:
                if time.monotonic() > deadline:
                    log.exception("task %s: could not report; the lease sweep will", a.task_id)
                    return
                time.sleep(1.0)
