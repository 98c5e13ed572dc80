"""``fleet events verify``: the task table is a projection of the event log.

A scenario drives tasks through every kind of transition with the services (claim, start,
failed attempts and their retries, receipts with and without a PR, review, merge, close,
cancel, admin retry, lease expiry, changes while queued); replaying the log then reports
nothing. Then one row is altered by hand with SQL, and ``verify`` reports exactly that row and
that field, nothing else.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select, text, update

from fleet_common import sweeps
from fleet_common.db import Database, utcnow
from fleet_common.dispatch.claim import claim_next
from fleet_common.forgejo import prs
from fleet_common.settings import Settings
from fleet_common.tasks import lease, replay
from fleet_common.tasks import service as tasks
from fleet_common.tasks.models import Task, TaskEvent
from fleet_common.tasks.replay import Difference
from fleet_common.tasks.state import PR_COLUMNS
from tests.api_helpers import pull_agent

HOUR = dt.timedelta(hours=1)


def in_review_check(_task: Task, _receipt: dict[str, Any]) -> tuple[bool, str | None]:
    """A Forgejo-connected repository: a receipt with a PR sends the task to review."""
    return True, None


@dataclass
class Scenario:
    """The tasks of the scenario, by what happened to them."""

    ids: dict[str, str]
    agent_id: str


class Driver:
    """Services called the way the API and the workers call them, one unit of work each."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.orch = settings.orchestrator
        with db.session() as session:
            self.agent_id = pull_agent(session, ["code:python"], max_concurrency=10)

    def create(self, title: str, **data: Any) -> str:
        with self.db.session() as session:
            body = {"title": title, "labels": ["agent:code:python"], **data}
            return tasks.create_task(session, self.settings, body, actor="admin:test").task.id

    def claim(self, expected: str, *, now: dt.datetime | None = None) -> str:
        """Claim, check it is ``expected``, and return the lease token."""
        with self.db.session() as session:
            claim = claim_next(session, self.orch, self.agent_id, now=now)
            assert claim is not None and claim.task.id == expected, claim
            return claim.lease_token

    def _held(self, session: Any, task_id: str, token: str, now: dt.datetime) -> lease.Held:
        return lease.held_task(session, task_id, self.agent_id, token, now=now)

    def start(self, task_id: str, token: str, *, now: dt.datetime | None = None) -> None:
        now = now or utcnow()
        with self.db.session() as session:
            held = self._held(session, task_id, token, now)
            lease.report_status(session, held, "running", "on it", now=now)

    def complete(
        self,
        task_id: str,
        token: str,
        receipt: dict[str, Any],
        *,
        now: dt.datetime | None = None,
        review: bool = False,
    ) -> str:
        now = now or utcnow()
        check = in_review_check if review else lease.no_forge
        with self.db.session() as session:
            held = self._held(session, task_id, token, now)
            task = lease.complete(session, self.orch, held, receipt, pr_check=check, now=now)
            return str(task.status)

    def fail(self, task_id: str, token: str, *, retryable: bool = True) -> str:
        with self.db.session() as session:
            held = self._held(session, task_id, token, utcnow())
            return str(lease.fail(session, self.orch, held, "boom", retryable=retryable).status)

    def pull_request(self, task_id: str, *, merged: bool) -> None:
        pull = pull_ref(task_id, 7, "abc123", state="closed", merged=merged)
        with self.db.session() as session:
            task = tasks.get_task(session, task_id, for_update=True)
            change = prs.complete_merged if merged else prs.fail_closed
            change(session, task, pull, actor="forgejo", now=utcnow())

    def attach(self, task_id: str, number: int, head_sha: str) -> None:
        """Forgejo tells of a PR from the task's branch (attached, or its head moved)."""
        pull = pull_ref(task_id, number, head_sha)
        with self.db.session() as session:
            task = tasks.get_task(session, task_id, for_update=True)
            if task.pr_number == number:
                prs.record(session, task, "pr_synchronized", pull, actor="forgejo", now=utcnow())
            else:
                prs.attach(session, task, pull, actor="forgejo")

    def detach(self, task_id: str) -> None:
        with self.db.session() as session:
            task = tasks.get_task(session, task_id, for_update=True)
            prs.detach(session, task, actor="forgejo", now=utcnow())

    def status(self, task_id: str) -> str:
        with self.db.session() as session:
            return str(tasks.get_task(session, task_id).status)


def pull_ref(
    task_id: str, number: int, head_sha: str, *, state: str = "open", merged: bool = False
) -> prs.PullRef:
    return prs.PullRef.from_api(
        {
            "number": number,
            "state": state,
            "merged": merged,
            "html_url": f"https://git.example.com/acme/rocket/pulls/{number}",
            "head": {"ref": f"fleet/{task_id}", "sha": head_sha},
        }
    )


PR_RECEIPT = {
    "exit_code": 0,
    "summary": "opened a PR",
    "branch": "fleet/x",
    "pr_url": "https://git.example.com/acme/rocket/pulls/7",
    "pr_number": 7,
    "tests": {"passed": 12, "failed": 0},
    "cost_usd": 0.25,
}


def run_scenario(db: Database, settings: Settings) -> Scenario:
    """Every kind of transition, each task's life finished before the next task is created
    (so each claim takes the task it is meant to)."""
    d = Driver(db, settings)
    ids: dict[str, str] = {}

    # queued → dispatched → running → completed.
    ids["completed"] = t = d.create("plain")
    token = d.claim(t)
    d.start(t, token)
    assert d.complete(t, token, {"exit_code": 0, "summary": "done"}) == "completed"

    # A failed attempt is retried after its backoff; the second one opens a PR (attached,
    # then its head moves): in_review, then the PR is merged.
    ids["merged"] = t = d.create("flaky", max_retries=2)
    token = d.claim(t)
    d.start(t, token)
    assert d.fail(t, token) == "queued"
    later = utcnow() + HOUR  # past the backoff
    token = d.claim(t, now=later)
    d.attach(t, 7, "abc123")
    assert d.complete(t, token, PR_RECEIPT, now=later, review=True) == "in_review"
    d.attach(t, 7, "def456")
    d.pull_request(t, merged=True)
    assert d.status(t) == "completed"

    # In review, then the PR is closed unmerged: failed (pr_closed).
    # A PR that stopped naming the task was detached first.
    ids["pr_closed"] = t = d.create("rejected")
    token = d.claim(t)
    d.attach(t, 6, "0ld")
    d.detach(t)
    d.attach(t, 7, "abc123")
    assert d.complete(t, token, PR_RECEIPT, review=True) == "in_review"
    d.pull_request(t, merged=False)
    assert d.status(t) == "failed"

    # No retries: failed; an admin retry queues it again with a fresh budget; it completes,
    # with its PR kept as an artifact (no Forgejo).
    ids["retried"] = t = d.create("fragile", max_retries=0)
    token = d.claim(t)
    assert d.fail(t, token) == "failed"
    with db.session() as session:
        tasks.retry_task(session, t, actor="admin:test")
    token = d.claim(t)
    assert d.complete(t, token, PR_RECEIPT) == "completed"

    # A non-zero exit and a non-retryable failure.
    ids["exit_code"] = t = d.create("crashy", max_retries=0)
    token = d.claim(t)
    assert d.complete(t, token, {"exit_code": 3}) == "failed"

    # Changed while queued (priority, assignment), then cancelled.
    ids["cancelled_queued"] = t = d.create("unwanted")
    with db.session() as session:
        tasks.update_task(
            session, t, {"priority": 5, "assigned_agent_id": d.agent_id}, actor="admin:test"
        )
        tasks.cancel_task(session, t, actor="admin:test")

    # Cancelled while running.
    ids["cancelled_running"] = t = d.create("interrupted")
    token = d.claim(t)
    d.start(t, token)
    with db.session() as session:
        tasks.cancel_task(session, t, actor="admin:test")

    # The last ones stay queued, waiting out a backoff: a receipt without the PR the task
    # requires, and a lease that expired.
    ids["no_pr"] = t = d.create("needs a PR", requires_pr=True)
    token = d.claim(t)
    assert d.complete(t, token, {"exit_code": 0}) == "queued"

    ids["lease_expired"] = t = d.create("abandoned")
    d.claim(t)
    with db.session() as session:
        assert sweeps.expired_leases(session, settings.orchestrator, utcnow() + HOUR) == 1
    assert d.status(t) == "queued"
    return Scenario(ids, d.agent_id)


@pytest.fixture
def scenario(db: Database, settings: Settings) -> Scenario:
    return run_scenario(db, settings)


def differences(db: Database) -> list[Difference]:
    with db.session() as session:
        return list(replay.verify(session))


def test_replay_of_a_full_scenario_reports_nothing(db: Database, scenario: Scenario) -> None:
    with db.session() as session:
        statuses = {name: session.get_one(Task, i).status for name, i in scenario.ids.items()}
    assert statuses == {
        "completed": "completed",
        "merged": "completed",
        "pr_closed": "failed",
        "retried": "completed",
        "exit_code": "failed",
        "cancelled_queued": "cancelled",
        "cancelled_running": "cancelled",
        "no_pr": "queued",
        "lease_expired": "queued",
    }
    assert differences(db) == []


@dataclass(frozen=True)
class Tamper:
    task: str  # which task of the scenario
    sql: str  # run with :id bound to that task's id
    field: str
    row: Any  # what verify reports for the row ...
    replayed: Any  # ... and for the log


TAMPERS = {
    "status": Tamper(
        "cancelled_running",
        "UPDATE tasks SET status = 'completed' WHERE id = :id",
        "status",
        "completed",
        "cancelled",
    ),
    "attempt": Tamper(
        "merged", "UPDATE tasks SET attempt = attempt + 1 WHERE id = :id", "attempt", 3, 2
    ),
    "priority": Tamper(
        "cancelled_queued", "UPDATE tasks SET priority = 0 WHERE id = :id", "priority", 0, 5
    ),
    "failure_reason": Tamper(
        "exit_code",
        "UPDATE tasks SET failure_reason = NULL WHERE id = :id",
        "failure_reason",
        None,
        "exit_code",
    ),
    "agent_id": Tamper(
        "lease_expired",
        "UPDATE tasks SET agent_id = (SELECT id FROM agents LIMIT 1) WHERE id = :id",
        "agent_id",
        "<agent>",
        None,
    ),
    "retry_base": Tamper(
        "retried", "UPDATE tasks SET retry_base = 0 WHERE id = :id", "retry_base", 0, 1
    ),
    "pr_number": Tamper(
        "merged", "UPDATE tasks SET pr_number = 8 WHERE id = :id", "pr_number", 8, 7
    ),
    "pr_url": Tamper(
        "pr_closed",
        "UPDATE tasks SET pr_url = NULL WHERE id = :id",
        "pr_url",
        None,
        "https://git.example.com/acme/rocket/pulls/7",
    ),
    "pr_head_sha": Tamper(
        "merged",
        "UPDATE tasks SET pr_head_sha = 'abc123' WHERE id = :id",
        "pr_head_sha",
        "abc123",
        "def456",
    ),
    "pr_attached_by_hand": Tamper(
        "completed", "UPDATE tasks SET pr_number = 3 WHERE id = :id", "pr_number", 3, None
    ),
}


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_a_row_altered_by_hand_is_reported_exactly(
    db: Database, scenario: Scenario, name: str
) -> None:
    tamper = TAMPERS[name]
    task_id = scenario.ids[tamper.task]
    with db.session() as session:
        session.execute(text(tamper.sql), {"id": task_id})
    row = scenario.agent_id if tamper.row == "<agent>" else tamper.row
    assert differences(db) == [Difference(task_id, tamper.field, row, tamper.replayed)]


def test_an_altered_receipt_is_reported(db: Database, scenario: Scenario) -> None:
    task_id = scenario.ids["merged"]
    forged = {**PR_RECEIPT, "tests": {"passed": 12, "failed": 3}}
    with db.session() as session:
        session.execute(update(Task).where(Task.id == task_id).values(receipt=forged))
    assert differences(db) == [Difference(task_id, "receipt", forged, PR_RECEIPT)]


def test_a_missing_event_is_reported(db: Database, scenario: Scenario) -> None:
    """Deleting the ``started`` event (it changes nothing later events do not) leaves a gap."""
    task_id = scenario.ids["completed"]
    with db.session() as session:
        session.execute(
            text("DELETE FROM task_events WHERE task_id = :id AND type = 'started'"),
            {"id": task_id},
        )
    assert differences(db) == [
        Difference(task_id, "seq", "contiguous", "event seq 3 missing"),
        Difference(task_id, "event_seq", 4, 3),
    ]


def test_verify_pages_through_many_tasks(db: Database, settings: Settings) -> None:
    """More tasks than one batch of ``verify``: one altered row among them is still found."""
    ids: list[str] = []
    with db.session() as session:
        for n in range(replay.BATCH + 20):
            body = {"title": f"bulk {n}"}
            ids.append(tasks.create_task(session, settings, body, actor="admin:test").task.id)
    victim = sorted(ids)[replay.BATCH + 5]  # in the second batch
    with db.session() as session:
        session.execute(text("UPDATE tasks SET max_retries = 9 WHERE id = :id"), {"id": victim})
    assert differences(db) == [
        Difference(victim, "max_retries", 9, settings.orchestrator.default_max_retries)
    ]


def test_a_log_written_before_the_pr_columns_were_projected_replays(
    db: Database, scenario: Scenario
) -> None:
    """Events written before the PR columns were in ``changes`` carry them in ``data`` only;
    replay takes them from there, so an old log is still clean and still catches a forgery."""
    with db.session() as session:
        for event in session.scalars(select(TaskEvent)):
            changes = (event.data or {}).get("changes", {})
            if changes.keys() & set(PR_COLUMNS):
                old = {k: v for k, v in changes.items() if k not in PR_COLUMNS}
                event.data = (
                    {**event.data, "changes": old}
                    if old
                    else {k: v for k, v in event.data.items() if k != "changes"}
                )
    assert differences(db) == []
    task_id = scenario.ids["merged"]
    with db.session() as session:
        session.execute(update(Task).where(Task.id == task_id).values(pr_head_sha="abc123"))
    assert differences(db) == [Difference(task_id, "pr_head_sha", "abc123", "def456")]
