"""What a finished run means for its task: complete with a receipt, fail with a reason, or
nothing to report (the task was cancelled or taken away). Shared by the Celery worker (which
reports through the database) and the pull daemon (which reports over HTTP)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleet_common.tasks.state import Reason
from fleet_worker.executors.base import RunResult


@dataclass(frozen=True)
class Outcome:
    kind: str  # "complete", "fail" or "none"
    receipt: dict[str, Any] | None = None
    reason: str | None = None
    error: str | None = None


NOTHING = Outcome("none")


def outcome_of(result: RunResult, *, stopping: bool = False) -> Outcome:
    """Map a run to its report. ``stopping``: the run was cancelled because this worker is
    shutting down, so the attempt is lost (and retried elsewhere), not cancelled by a user."""
    if result.cancelled:
        if stopping:
            return Outcome("fail", reason=Reason.AGENT_LOST, error="the worker shut down")
        return NOTHING  # a cancelled task or a lost lease: the server already knows
    if result.timed_out:
        return Outcome("fail", reason=Reason.TIMEOUT, error="the agent timed out")
    if result.error:
        reason = (
            Reason.AGENT_LOST if result.error.startswith("connection_lost") else Reason.EXIT_CODE
        )
        return Outcome("fail", reason=reason, error=result.error)
    if result.exit_code is None:
        return Outcome("fail", reason=Reason.AGENT_LOST, error="the agent's exit status is unknown")
    if result.exit_code != 0:
        receipt = dict(result.receipt or {})
        receipt["exit_code"] = result.exit_code
        return Outcome("complete", receipt=receipt)
    if result.receipt_error:
        return Outcome("fail", reason=Reason.RECEIPT_INVALID, error=result.receipt_error)
    return Outcome("complete", receipt=dict(result.receipt or {"exit_code": 0}))
