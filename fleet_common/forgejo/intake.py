"""The webhook intake: one verified delivery in, task changes out, inside the caller's
transaction. Nothing here calls Forgejo, so the receiver answers well within Forgejo's 5 s.

Steps: store the delivery (its id and its body digest are unique, so a redelivery and a manual
replay, which carries a new id, are both dropped as ``duplicate``), drop the echoes of Fleet's
own write-back (comment and label events sent by ``bot_login``), then route on the event kind:

- issue opened / reopened / labelled, qualifying, no active task → a new task (for a label
  change only when it asks for one: ``issues.labelled_again``); a queued task follows a label
  change (its requirements) and an edit (title and prompt);
- issue closed, or labels changed so that it no longer qualifies → its task is cancelled
  (``cancelled_by_issue``) unless it is in review or its PR was merged already;
- pull request opened / reopened / edited / synchronized → attached to the tasks it belongs to
  (``edited`` re-reads the references and detaches a task it no longer names);
  merged → in-review tasks complete; closed unmerged → the in-review task it is attached to
  fails (``pr_closed``).

What must happen after commit (wake-ups for new tasks, a write-back sync of the tasks whose
Forgejo view changed) comes back in the :class:`IntakeResult`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlalchemy import bindparam, update
from sqlalchemy.orm import Session

from fleet_common.db import utcnow
from fleet_common.errors import FleetError
from fleet_common.forgejo import health, issues, prs
from fleet_common.forgejo.events import Delivery, EventKind
from fleet_common.forgejo.models import UNQUALIFIED, WebhookDelivery
from fleet_common.settings import Settings
from fleet_common.sql import insert_new, table_of
from fleet_common.sweeps import Publish
from fleet_common.tasks.models import TERMINAL, Task, TaskStatus

K = EventKind
ISSUE_KINDS = frozenset(
    {
        K.ISSUE_OPENED,
        K.ISSUE_EDITED,
        K.ISSUE_CLOSED,
        K.ISSUE_REOPENED,
        K.ISSUE_LABEL_UPDATED,
        K.ISSUE_LABEL_CLEARED,
    }
)
PR_KINDS = frozenset(
    {K.PR_OPENED, K.PR_EDITED, K.PR_SYNCHRONIZED, K.PR_MERGED, K.PR_CLOSED, K.PR_REOPENED}
)
_CREATING = frozenset({K.ISSUE_OPENED, K.ISSUE_REOPENED, K.ISSUE_LABEL_UPDATED})
_LABELLING = frozenset({K.ISSUE_LABEL_UPDATED, K.ISSUE_LABEL_CLEARED})
_STOPPING = frozenset({K.ISSUE_CLOSED, *_LABELLING})

_DELIVERIES = table_of(WebhookDelivery)
_RECORD_OUTCOME = (
    update(_DELIVERIES)
    .where(_DELIVERIES.c.id == bindparam("stored"))
    .values(outcome=bindparam("new_outcome"), task_id=bindparam("new_task_id"))
    .returning(health.last_webhook_of(bindparam("health_repo")))
)


@dataclass
class IntakeResult:
    """What a delivery did. ``outcome`` is one short word (a metrics label); ``detail`` says more.

    ``publish``: wake-ups to send after commit; ``task_ids``: tasks whose Forgejo view changed
    (for a write-back sync after commit); ``error``: a problem worth showing in intake health.
    """

    outcome: str
    detail: str = ""
    task_ids: list[str] = field(default_factory=list)
    publish: list[Publish] = field(default_factory=list)
    error: str | None = None

    @property
    def summary(self) -> str:
        return f"{self.outcome}: {self.detail}" if self.detail else self.outcome


def receive(
    session: Session, settings: Settings, delivery: Delivery, *, now: dt.datetime | None = None
) -> IntakeResult:
    """Apply one verified delivery in the caller's unit of work (see the module docstring)."""
    now = now or utcnow()
    # One statement stores and dedupes (both ``delivery_id`` and ``digest`` are unique): no
    # SAVEPOINT, no read first. A concurrent twin waits for ours to commit, then finds it.
    connection = session.connection()
    stored = insert_new(
        connection,
        WebhookDelivery,
        {
            "delivery_id": (delivery.delivery_id or f"sha256:{delivery.digest}")[:100],
            "digest": delivery.digest,
            "event": delivery.event[:60],
            "action": delivery.action[:60],
            "repo": delivery.repo_full_name[:300],
            "number": delivery.number,
            "outcome": "",
            "task_id": None,
            "received_at": now,
        },
    )
    if stored is None:
        return IntakeResult("duplicate")
    result = _route(session, settings, delivery, now)
    session.flush()  # routing's ORM changes (state transitions) are written first
    last_webhook = connection.execute(
        _RECORD_OUTCOME,
        {
            "stored": stored,
            "new_outcome": result.summary[:200],
            "new_task_id": result.task_ids[0] if result.task_ids else None,
            "health_repo": delivery.repo_full_name,
        },
    ).scalar_one()
    # Health last: task rows are always locked before it (see fleet_common.forgejo.health).
    health.webhook_seen(session, delivery.repo_full_name, now, last_webhook)
    if result.error:
        health.record_error(session, delivery.repo_full_name, result.error, now)
    return result


def _route(
    session: Session, settings: Settings, delivery: Delivery, now: dt.datetime
) -> IntakeResult:
    if delivery.ignored or not delivery.repo_full_name:
        return IntakeResult("ignored", f"{delivery.event or '?'} {delivery.action}".strip())
    if delivery.is_echo(settings.forgejo.bot_login):
        return IntakeResult("echo", f"sent by {delivery.sender_login}")
    if delivery.kind in ISSUE_KINDS:
        return _issue_event(session, settings, delivery, now)
    if delivery.kind in PR_KINDS:
        return _pull_event(session, settings, delivery, now)
    return IntakeResult("ignored", str(delivery.kind))


def _actor(delivery: Delivery) -> str:
    return f"forgejo:{delivery.sender_login or 'unknown'}"[:120]


def _issue_event(
    session: Session, settings: Settings, delivery: Delivery, now: dt.datetime
) -> IntakeResult:
    issue, kind, repo = delivery.issue, delivery.kind, delivery.repo_full_name
    if issue is None or issue.is_pull or issue.number <= 0:
        return IntakeResult("ignored", "not an issue")
    actor = _actor(delivery)
    qualifying = issues.qualifies(settings.forgejo, issue.labels, issue.state)
    if qualifying and kind in _CREATING:
        if kind == K.ISSUE_LABEL_UPDATED:
            active = issues.active_task(session, repo, issue.number)
            latest = None if active else issues.latest_task(session, repo, issue.number)
            if latest is not None and latest.status not in TERMINAL:
                # A racing delivery committed the issue's task between the two reads.
                active = issues.active_task(session, repo, issue.number)
            if active is not None:
                return _relabel(session, settings, active, issue.labels, actor, now)
            if not issues.labelled_again(session, settings.forgejo, latest, issue.labels):
                detail = f"issue #{issue.number}: its task {latest.id if latest else ''} is over"
                return IntakeResult("unchanged", detail)
        # Opened / reopened: no read first, the insert finds an active task by itself.
        opened = issues.open_task(
            session,
            settings,
            repo=repo,
            clone_url=delivery.repo_clone_url,
            issue=issue,
            actor=actor,
            now=now,
        )
        task = opened.task
        if opened.outcome == "rejected":
            return IntakeResult("rejected", opened.detail, error=opened.detail)
        if opened.outcome == "created" and task is not None:
            return IntakeResult("created", task.id, [task.id], issues.wakes(opened))
        return IntakeResult("exists", task.id if task else "")
    task = issues.active_task(session, repo, issue.number)
    if task is None and not qualifying and kind in _LABELLING:
        return IntakeResult(UNQUALIFIED)  # remembered: see issues.labelled_again
    if task is None:
        return IntakeResult("no_task", f"issue #{issue.number}")
    if kind == K.ISSUE_EDITED:
        changed = issues.refresh(session, settings, task, issue, repo=repo, actor=actor, now=now)
        return IntakeResult(
            "updated" if changed else "exists", task.id, [task.id] if changed else []
        )
    if not qualifying and kind in _STOPPING:
        outcome = issues.stop_task(session, task, actor=actor, now=now)
        return IntakeResult(outcome, task.id, [task.id] if outcome == "cancelled" else [])
    return IntakeResult("exists", task.id)


def _relabel(
    session: Session,
    settings: Settings,
    task: Task,
    labels: tuple[str, ...],
    actor: str,
    now: dt.datetime,
) -> IntakeResult:
    try:
        changed = issues.relabel(session, settings, task, labels, actor=actor, now=now)
    except FleetError as error:
        detail = f"issue #{task.issue_number}: {error.message}"
        return IntakeResult("rejected", detail, error=detail)
    if not changed:
        return IntakeResult("exists", task.id)
    return IntakeResult("updated", task.id, [task.id], issues.wake_if_served(session, task))


def _pull_event(
    session: Session, settings: Settings, delivery: Delivery, now: dt.datetime
) -> IntakeResult:
    if delivery.pull_request is None or delivery.pull_request.number <= 0:
        return IntakeResult("ignored", "no pull request")
    repo, kind, actor = delivery.repo_full_name, delivery.kind, _actor(delivery)
    pull = prs.PullRef.from_event(delivery.pull_request, repo)
    server_url = settings.forgejo.url or None
    linked = {t.id: t for t in prs.linked_tasks(session, repo, pull, server_url)}
    attached = {t.id: t for t in prs.attached_tasks(session, repo, pull.number)}
    changed: list[str] = []
    outcomes: list[str] = []
    for task_id in sorted(linked.keys() | attached.keys()):
        task = linked.get(task_id) or attached[task_id]
        outcome = _pull_task(session, task, pull, kind, task_id in linked, actor, now)
        if outcome:
            outcomes.append(outcome)
            changed.append(task.id)
    if not changed:
        outcome = "unchanged" if linked or attached else "no_task"
        return IntakeResult(outcome, f"pull request #{pull.number}")
    # One word for the metrics: the most decisive thing that happened.
    for word in ("completed", "failed", "pr_attached", "pr_detached"):
        if word in outcomes:
            return IntakeResult(word, ",".join(changed), changed)
    return IntakeResult("recorded", ",".join(changed), changed)


def _pull_task(
    session: Session,
    task: Task,
    pull: prs.PullRef,
    kind: EventKind,
    linked: bool,
    actor: str,
    now: dt.datetime,
) -> str | None:
    """Apply one PR event to one task; returns what happened (``None``: nothing)."""
    own = task.pr_number == pull.number
    in_review = task.status == TaskStatus.IN_REVIEW
    if kind == K.PR_MERGED:
        if in_review and (own or linked):
            prs.complete_merged(session, task, pull, actor=actor, now=now)
            return "completed"
        if in_review:
            return None
        if not own:
            prs.attach(session, task, pull, actor=actor, now=now)
        prs.record(session, task, "pr_merged", pull, actor=actor, now=now)
        return "recorded"
    if kind == K.PR_CLOSED:
        if not own:
            return None
        if in_review:
            prs.fail_closed(session, task, pull, actor=actor, now=now)
            return "failed"
        prs.record(session, task, "pr_closed", pull, actor=actor, now=now)
        return "recorded"
    if kind == K.PR_EDITED and own and not linked and not in_review:
        prs.detach(session, task, actor=actor, now=now)
        return "pr_detached"
    if linked and not own and not in_review:
        # Before review the newest PR naming the task wins; in review the receipt's PR stays.
        prs.attach(session, task, pull, actor=actor, now=now)
        return "pr_attached"
    if own and kind == K.PR_SYNCHRONIZED and pull.head_sha and pull.head_sha != task.pr_head_sha:
        prs.record(session, task, "pr_synchronized", pull, actor=actor, now=now)
        return "recorded"
    if own and kind == K.PR_REOPENED:
        prs.record(session, task, "pr_reopened", pull, actor=actor, now=now)
        return "recorded"
    return None
