"""What a task's issue should show in Forgejo: its status comment, its ``fleet/*`` label and
the commit status on its pull request's head. Pure: :func:`desired_view` renders the task's
current row, nothing else, so rendering twice gives the same view and an older state is never
rendered over a newer one.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

from fleet_common.tasks.models import TaskStatus

S = TaskStatus

#: The status labels, with the colour and description they are created with. They are
#: "exclusive" (scoped) labels: Forgejo itself keeps at most one ``fleet/…`` on an issue.
LABELS: dict[str, tuple[str, str]] = {
    "fleet/queued": ("#c5def5", "Fleet: waiting for an agent"),
    "fleet/running": ("#1d76db", "Fleet: an agent is working on it"),
    "fleet/in-review": ("#fbca04", "Fleet: pull request waiting for review"),
    "fleet/done": ("#0e8a16", "Fleet: done"),
    "fleet/failed": ("#d93f0b", "Fleet: failed"),
}

#: The label of each status; a cancelled task carries none (there is no fleet/cancelled).
STATUS_LABEL: dict[str, str | None] = {
    S.QUEUED: "fleet/queued",
    S.DISPATCHED: "fleet/running",
    S.RUNNING: "fleet/running",
    S.IN_REVIEW: "fleet/in-review",
    S.COMPLETED: "fleet/done",
    S.FAILED: "fleet/failed",
    S.CANCELLED: None,
}

#: The commit-status context Fleet posts under.
COMMIT_CONTEXT = "fleet"
#: ``in_review`` is success: the agent's part is done, and a pending status would block a
#: merge that requires it, while merging is what completes the task.
COMMIT_STATE: dict[str, str] = {
    S.QUEUED: "pending",
    S.DISPATCHED: "pending",
    S.RUNNING: "pending",
    S.IN_REVIEW: "success",
    S.COMPLETED: "success",
    S.FAILED: "failure",
    S.CANCELLED: "error",
}

LOG_TAIL_LINES = 40
LOG_TAIL_CHARS = 3000
ERROR_CHARS = 1000


@dataclass(frozen=True)
class View:
    """What Forgejo should show for one task."""

    comment_body: str
    label: str | None  # the one fleet/* label the issue carries; None: none at all
    commit_state: str  # for the PR head's commit status (posted only when the head is known)
    commit_description: str


def comment_marker(task_id: str) -> str:
    """The invisible line that identifies a task's status comment (to adopt it again if its
    id was never stored)."""
    return f"<!-- fleet:task:{task_id} -->"


def desired_view(task: Any, agent_name: str | None, log_tail: str = "") -> View:
    """The view of ``task`` (a Task row) as it is now: its status comment, label and commit
    state. ``agent_name`` names the agent holding it; ``log_tail`` (already redacted) is shown
    when the task failed."""
    status = str(task.status)
    agent = f"**{_inline(agent_name or task.agent_id or 'an agent')}**"
    pr = _pr_ref(task)
    reason = task.failure_reason or ""
    lines: list[str]
    if status == S.QUEUED:
        headline, description = "⏳ Queued", "queued"
        lines = ["Waiting for an agent."]
        if task.attempt > 1 and reason:
            lines = [f"Attempt {task.attempt - 1} failed (`{reason}`); it will be retried."]
            lines += _error_block(task.last_error)
    elif status == S.DISPATCHED:
        headline, description = f"🚀 Starting on agent {agent}", "starting"
        lines = [f"Attempt {task.attempt} was handed to agent {agent}."]
    elif status == S.RUNNING:
        headline, description = f"⚙️ Running on agent {agent}", "running"
        lines = [f"Attempt {task.attempt} is running on agent {agent}."]
    elif status == S.IN_REVIEW:
        headline, description = f"👀 In review: pull request {pr}".rstrip(), "in review"
        lines = [
            f"Agent {agent} opened pull request {pr}; the task completes when it is merged.",
            *_summary(task),
        ]
    elif status == S.COMPLETED:
        headline, description = "✅ Done", "done"
        lines = [f"Pull request {pr} was merged."] if pr else []
        lines += _summary(task)
    elif status == S.FAILED:
        headline, description = f"❌ Failed (`{reason or 'error'}`)", f"failed ({reason})"
        lines = [*_error_block(task.last_error), *_log_block(log_tail)]
    else:
        headline, description = f"🚫 Cancelled (`{reason or 'cancelled'}`)", "cancelled"
        lines = []
    body = [
        comment_marker(task.id),
        f"**Fleet** · {headline}",
        "",
        *lines,
        "",
        f"<sub>Task `{task.id}` · attempt {task.attempt} · {_when(task.updated_at)}</sub>",
    ]
    return View(
        comment_body="\n".join(body).replace("\n\n\n", "\n\n"),
        label=STATUS_LABEL.get(status),
        commit_state=COMMIT_STATE.get(status, "pending"),
        commit_description=f"Fleet: {description}"[:140],
    )


def pr_number_of(task: Any) -> int | None:
    """The task's PR number: the linked one, else the one its receipt names."""
    if task.pr_number:
        return int(task.pr_number)
    number = (task.receipt or {}).get("pr_number")
    return number if isinstance(number, int) and not isinstance(number, bool) else None


def tail(text: str, *, lines: int = LOG_TAIL_LINES, chars: int = LOG_TAIL_CHARS) -> str:
    """The last ``lines`` lines of ``text``, at most ``chars`` characters."""
    kept = "\n".join(text.rstrip().splitlines()[-lines:])
    return kept[-chars:]


def _pr_ref(task: Any) -> str:
    number = pr_number_of(task)
    if number:
        return f"#{number}"
    url = task.pr_url or (task.receipt or {}).get("pr_url")
    return str(url) if url else ""


def _summary(task: Any) -> list[str]:
    summary = (task.receipt or {}).get("summary")
    if not isinstance(summary, str) or not summary.strip():
        return []
    return ["", *(f"> {line}" for line in summary.strip()[:ERROR_CHARS].splitlines())]


def _error_block(error: str | None) -> list[str]:
    if not error:
        return []
    return ["", *_fenced(error[:ERROR_CHARS])]


def _log_block(log_tail: str) -> list[str]:
    if not log_tail.strip():
        return []
    return ["", "<details><summary>Log tail</summary>", "", *_fenced(log_tail), "", "</details>"]


def _fenced(text: str) -> list[str]:
    # A fence longer than any run of backticks inside, so the text cannot close it.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence, text.rstrip("\n"), fence]


def _inline(text: str) -> str:
    return re.sub(r"[`*_<>\[\]\n]", "", text)[:100]


def _when(at: dt.datetime | None) -> str:
    if at is None:
        return ""
    return at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
