"""Issues as work items: which issues qualify, the one active task of an issue, opening it,
keeping it in step with the issue, and stopping it when the issue stops qualifying.

An open issue qualifies when it carries ``[forgejo] trigger_label`` or any ``agent:`` label.
At most one task per repository + issue is active (not terminal); the partial unique index
``uq_tasks_active_issue`` enforces it, so :func:`open_task` inserts with ``ON CONFLICT DO
NOTHING`` and takes "nothing inserted" as "a concurrent delivery already created it" (no read
first, no SAVEPOINT).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_common.dispatch.routing import (
    AGENT_LABEL_PREFIX,
    req_key,
    requirements_from_labels,
    validate_capabilities,
)
from fleet_common.errors import FleetError, InvalidInput
from fleet_common.forgejo import prs, writeback
from fleet_common.forgejo.events import IssueInfo
from fleet_common.forgejo.models import UNQUALIFIED, WebhookDelivery
from fleet_common.settings import ForgejoSettings, Settings
from fleet_common.sweeps import Publish
from fleet_common.tasks import service, state
from fleet_common.tasks.models import TERMINAL, Task, TaskStatus
from fleet_common.tasks.state import Reason

log = logging.getLogger("fleet.forgejo")

DEFAULT_PROMPT_TEMPLATE = "{title}\n\n{body}"
MAX_TITLE = 500


def qualifying_labels(forgejo: ForgejoSettings, labels: Iterable[str]) -> set[str]:
    """The labels that make an issue Fleet's: the trigger label and every ``agent:`` label."""
    return {lb for lb in labels if lb == forgejo.trigger_label or lb.startswith(AGENT_LABEL_PREFIX)}


def qualifies(forgejo: ForgejoSettings, labels: Iterable[str], issue_state: str) -> bool:
    """An open issue with the trigger label or any ``agent:`` label."""
    return issue_state == "open" and bool(qualifying_labels(forgejo, labels))


def latest_task(session: Session, repo: str, number: int) -> Task | None:
    """The issue's newest task, whatever its status."""
    query = (
        select(Task)
        .where(Task.repo == repo, Task.issue_number == number)
        .order_by(Task.created_at.desc(), Task.id.desc())
    )
    return session.scalars(query.limit(1)).first()


def labelled_again(
    session: Session,
    forgejo: ForgejoSettings,
    latest: Task | None,
    labels: Iterable[str],
    *,
    before: dt.datetime | None = None,
) -> bool:
    """Whether a label change on an issue whose last task is over asks for a new task.

    Forgejo's label events carry no diff, so this compares with what Fleet stored: a new task
    when the issue had none, when its last one was cancelled because the issue stopped
    qualifying, when a qualifying label appeared that the last task did not have, or when a
    label event since that task ended left the issue unqualified (the label was removed and
    added again). Otherwise (a person tags a finished issue ``priority/high``) nothing starts.
    ``before`` ignores what Fleet learnt at or after that moment (reconcile's list is older).
    The retention sweep keeps these ``unqualified`` deliveries, so no removal is forgotten.
    """
    if latest is None:
        return True
    if latest.status not in TERMINAL:
        return False
    ended = latest.finished_at or latest.updated_at
    if before is not None and ended >= before:
        return False
    if latest.failure_reason == Reason.CANCELLED_BY_ISSUE:
        return True
    if qualifying_labels(forgejo, labels) - qualifying_labels(forgejo, latest.labels or []):
        return True
    query = select(WebhookDelivery.id).where(
        WebhookDelivery.received_at > ended,
        WebhookDelivery.repo == latest.repo,
        WebhookDelivery.number == latest.issue_number,
        WebhookDelivery.outcome == UNQUALIFIED,
    )
    if before is not None:
        query = query.where(WebhookDelivery.received_at < before)
    return session.scalars(query.limit(1)).first() is not None


def issue_from_api(issue: dict[str, Any]) -> IssueInfo:
    """An ``Issue`` from the REST API as the webhook parser shapes it."""
    labels = issue.get("labels") if isinstance(issue.get("labels"), list) else []
    number = issue.get("number")

    def text(key: str) -> str:
        value = issue.get(key)
        return value if isinstance(value, str) else ""

    return IssueInfo(
        number=number if isinstance(number, int) and not isinstance(number, bool) else 0,
        title=text("title"),
        body=text("body"),
        state=text("state"),
        labels=tuple(
            lb["name"]
            for lb in labels or []
            if isinstance(lb, dict) and isinstance(lb.get("name"), str)
        ),
        is_pull=issue.get("pull_request") is not None,
        html_url=text("html_url"),
    )


def active_task(session: Session, repo: str, number: int) -> Task | None:
    """The issue's non-terminal task, locked (there is at most one)."""
    query = (
        select(Task)
        .where(Task.repo == repo, Task.issue_number == number, Task.status.not_in(TERMINAL))
        .with_for_update()
    )
    return session.scalars(query).first()


def render_prompt(template: str, *, title: str, body: str, number: int, repo: str) -> str:
    """``prompt_template`` filled in; a template that does not format falls back to the default
    (a bad template must not drop issues on the floor)."""
    values = {"title": title, "body": body, "number": number, "repo": repo}
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as error:
        log.warning("forgejo.prompt_template does not format (%s); using the default", error)
        return DEFAULT_PROMPT_TEMPLATE.format(**values)


@dataclass(frozen=True)
class Opened:
    """What :func:`open_task` did: ``created``, ``exists`` or ``rejected`` (with why)."""

    outcome: str
    task: Task | None = None
    detail: str = ""
    #: A created task that a worker's agent could claim: its wake-up is worth sending.
    woken: bool = False


def open_task(
    session: Session,
    settings: Settings,
    *,
    repo: str,
    clone_url: str,
    issue: IssueInfo,
    actor: str,
    now: dt.datetime,
) -> Opened:
    """Create the issue's task unless one is active (race-proof through the unique index: a
    delivery racing another one for the same issue waits for it to commit, then inserts
    nothing and finds its task)."""
    forgejo = settings.forgejo
    data = {
        "title": (issue.title or f"{repo}#{issue.number}")[:MAX_TITLE],
        "prompt": render_prompt(
            forgejo.prompt_template,
            title=issue.title,
            body=issue.body,
            number=issue.number,
            repo=repo,
        ),
        "labels": list(issue.labels),
        "repo": repo,
        "clone_url": clone_url or None,
        "issue_number": issue.number,
        "requires_pr": forgejo.require_pr,
        "source": "forgejo",
    }
    try:
        task = service.new_task(settings, data, now=now)
    except FleetError as error:
        return Opened("rejected", None, f"issue #{issue.number}: {error.message}")
    stored = service.insert_checked(session, task, actor)
    if stored is None:
        return Opened("exists", active_task(session, repo, issue.number))
    writeback.inserted(session, [task.id])
    return Opened("created", task, woken=stored[1])


def wake_if_served(session: Session, task: Task) -> list[Publish]:
    """The wake-up of a queued ``task`` whose route changed, if a worker could claim it."""
    return [Publish.of(task)] if service.worker_could_claim(session, task) else []


def wakes(opened: Opened) -> list[Publish]:
    """The wake-ups to publish for what :func:`open_task` did: one for a created task that a
    worker could claim, none otherwise."""
    return [Publish.of(opened.task)] if opened.woken and opened.task is not None else []


def relabel(
    session: Session,
    settings: Settings,
    task: Task,
    labels: Iterable[str],
    *,
    actor: str,
    now: dt.datetime,
) -> bool:
    """A queued task follows its issue's ``agent:`` labels (its requirements, so its route);
    other labels are metadata and change nothing. Once an agent has the task, a label change no
    longer reroutes it. Raises InvalidInput for unusable labels."""
    labels = list(dict.fromkeys(labels))
    if task.status != TaskStatus.QUEUED:
        return False
    requirements = validate_capabilities(requirements_from_labels(labels), "labels")
    if requirements == list(task.requirements or []):
        return False
    limit = settings.orchestrator.max_requirements
    if len(requirements) > limit:
        raise InvalidInput(
            f"labels: a task may require at most {limit} capabilities "
            f"(orchestrator.max_requirements), got {len(requirements)}"
        )
    changes = {"labels": labels, "requirements": requirements, "req_key": req_key(requirements)}
    state.transition(
        session,
        task,
        TaskStatus.QUEUED,
        event="relabelled",
        actor=actor,
        changes=changes,
        data={"labels": labels, "requirements": requirements},
        now=now,
    )
    task.last_published_at = now
    return True


def refresh(
    session: Session,
    settings: Settings,
    task: Task,
    issue: IssueInfo,
    *,
    repo: str,
    actor: str,
    now: dt.datetime,
) -> bool:
    """An edited issue updates the title and prompt of its task while it is still queued."""
    if task.status != TaskStatus.QUEUED:
        return False
    title = (issue.title or task.title)[:MAX_TITLE]
    prompt = render_prompt(
        settings.forgejo.prompt_template,
        title=issue.title,
        body=issue.body,
        number=issue.number,
        repo=repo,
    )
    if (title, prompt) == (task.title, task.prompt):
        return False
    state.transition(
        session,
        task,
        TaskStatus.QUEUED,
        event="issue_edited",
        actor=actor,
        changes={"title": title, "prompt": prompt},
        data={"title": title},
        now=now,
    )
    return True


def stop_task(session: Session, task: Task, *, actor: str, now: dt.datetime) -> str:
    """The issue stopped qualifying or was closed: cancel its task (``cancelled``), unless the
    task reached review or its PR was already merged (``kept``): merging a PR closes its issue,
    and the two events arrive in either order."""
    if task.status == TaskStatus.IN_REVIEW or prs.merged_pr_recorded(session, task):
        return "kept"
    service.cancel_task(session, task.id, actor=actor, reason=Reason.CANCELLED_BY_ISSUE, now=now)
    return "cancelled"
