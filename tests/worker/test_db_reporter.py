"""A Celery worker's claim, start and finish against the database, on both backends: the
common completion (one statement on PostgreSQL) and the cases it leaves to the general path
end as the services would have them, with an event log that replays clean."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text as sql

from fleet_common.agents import service as agents
from fleet_common.auth import tokens
from fleet_common.db import Database, utcnow
from fleet_common.settings import AgentSlotSettings, HostSettings, Settings
from fleet_common.tasks import lease, logs, replay
from fleet_common.tasks import service as tasks
from fleet_common.tasks.models import Task, TaskEvent
from fleet_worker.attempt import Attempt, LogChunk
from fleet_worker.db_reporter import DbReporter
from fleet_worker.executors.local import LocalExecutor
from fleet_worker.host import HostWorker
from fleet_worker.outcome import Outcome


@pytest.fixture
def worker(settings: Settings, db: Database, tmp_path: Path) -> HostWorker:
    host = HostSettings(
        host_id="h",
        transport="local",
        work_dir=str(tmp_path / "work"),
        agents=(AgentSlotSettings(agent_type="a", capabilities=(), max_concurrency=4),),
    )
    worker = HostWorker(settings, host, db, executor=LocalExecutor())
    worker.register()
    return worker


def claim(worker: HostWorker, db: Database, settings: Settings, **data: Any) -> Attempt:
    with db.session() as session:
        body = {"title": "t", **data}
        tasks.create_task(session, settings, body, actor="admin:test")
    attempt = worker._claim_in_db(worker.slots[0])
    assert attempt is not None
    return attempt


def reporter(worker: HostWorker, db: Database, attempt: Attempt) -> DbReporter:
    return DbReporter(db, worker.settings.orchestrator, attempt, started=True)


def state(db: Database, task_id: str) -> tuple[Task, list[str], str]:
    with db.session() as session:
        task = session.get(Task, task_id)
        assert task is not None
        events = session.query(TaskEvent).filter_by(task_id=task_id).order_by(TaskEvent.seq)
        types = [event.type for event in events]
        text = logs.read(session, task, 0).data
        assert list(replay.verify(session)) == []
        return task, types, text


def test_a_plain_completion_stores_the_log_and_the_receipt(
    worker: HostWorker, db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempt = claim(worker, db, settings)
    rep = reporter(worker, db, attempt)
    assert rep.log(0, "first\n")
    if db.dialect == "postgresql":  # the one-statement path, not the general one

        def general(*_args: Any, **_kwargs: Any) -> None:
            raise AssertionError("the general path was taken")

        monkeypatch.setattr(lease, "held_task", general)
    rep.finish(Outcome("complete", receipt={"exit_code": 0, "summary": "ok"}), LogChunk(1, "é\n"))
    task, types, text = state(db, attempt.task_id)
    assert types == ["created", "dispatched", "started", "completed"]
    assert (task.status, task.receipt, task.artifacts) == (
        "completed",
        {"exit_code": 0, "summary": "ok"},
        [],
    )
    assert task.finished_at is not None and task.started_at is not None
    assert task.lease_expires_at is None
    assert (text, task.log_bytes) == ("first\né\n", 9)


def test_a_completion_with_a_stale_lease_is_refused_and_keeps_nothing(
    worker: HostWorker, db: Database, settings: Settings
) -> None:
    attempt = claim(worker, db, settings)
    stale = Attempt(**{**attempt.__dict__, "lease_token": "not-the-lease"})
    reporter(worker, db, stale).finish(Outcome("complete"), LogChunk(0, "zombie\n"))
    task, types, text = state(db, attempt.task_id)
    assert (task.status, types[-1], text) == ("running", "started", "")


def test_a_failed_exit_code_and_a_log_over_the_cap_take_the_general_path(
    worker: HostWorker, db: Database, settings: Settings
) -> None:
    attempt = claim(worker, db, settings, max_retries=0)
    rep = reporter(worker, db, attempt)
    rep.finish(Outcome("complete", receipt={"exit_code": 3}))
    task, types, _ = state(db, attempt.task_id)
    assert (task.status, types[-1], task.failure_reason) == ("failed", "failed", "exit_code")

    attempt = claim(worker, db, settings)
    big = "x" * (settings.orchestrator.max_log_bytes + 10)
    reporter(worker, db, attempt).finish(Outcome("complete"), LogChunk(0, big))
    task, types, text = state(db, attempt.task_id)
    assert (task.status, types[-1]) == ("completed", "completed")
    assert task.log_bytes == len(big) and text == big  # one chunk: nothing to drop


def test_the_claim_starts_the_task_with_the_events_two_steps_would_write(
    worker: HostWorker, db: Database, settings: Settings
) -> None:
    attempt = claim(worker, db, settings)
    task, types, _ = state(db, attempt.task_id)
    assert (task.status, types) == ("running", ["created", "dispatched", "started"])
    assert task.started_at >= task.dispatched_at and task.lease_expires_at is not None
    assert (attempt.agent_id, attempt.attempt) == (task.agent_id, 1)
    with db.session() as session:
        events = session.query(TaskEvent).filter_by(task_id=task.id).order_by(TaskEvent.seq)
        moves = [(e.seq, e.from_status, e.to_status, e.actor, e.data) for e in events][1:]
    actor = f"agent:{task.agent_id}"
    changes = {"agent_id": task.agent_id, "not_before": None}
    dispatched = {"mode": "ssh_cli", "attempt": 1, "changes": changes}
    assert moves == [
        (2, "queued", "dispatched", actor, dispatched),
        (3, "dispatched", "running", actor, {}),
    ]


def test_a_claim_never_predates_the_task_it_claims(
    worker: HostWorker, db: Database, settings: Settings
) -> None:
    """PostgreSQL's one-statement claim reads the clock before its snapshot; it dates the
    claim at the task's last change if that is later (SQLite reads it under its lock)."""
    if db.dialect != "postgresql":
        pytest.skip("PostgreSQL's one-statement claim")
    with db.session() as session:
        created = tasks.create_task(session, settings, {"title": "t"}, actor="admin:test")
        task = session.get(Task, created.task.id)
        assert task is not None
        later = task.updated_at + dt.timedelta(minutes=5)  # another machine's clock, ahead
        task.updated_at = later
    attempt = worker._claim_in_db(worker.slots[0])
    assert attempt is not None
    claimed, _, _ = state(db, attempt.task_id)
    assert claimed.dispatched_at is not None and claimed.dispatched_at >= later


def test_a_drained_slot_claims_nothing_and_a_changed_row_is_claimed_for_as_it_is_now(
    worker: HostWorker, db: Database, settings: Settings
) -> None:
    slot = worker.slots[0]
    with db.session() as session:
        tasks.create_task(session, settings, {"title": "t", "labels": ["agent:gpu"]}, actor="a:t")
        agents.update_agent(session, slot.agent_id, {"desired_state": "draining"}, actor="a:t")
    assert worker._claim_in_db(slot) is None
    with db.session() as session:  # an operator gives the slot's agent a capability
        changes = {"desired_state": "active", "capabilities": ["gpu"]}
        agents.update_agent(session, slot.agent_id, changes, actor="a:t")
    attempt = worker._claim_in_db(slot)
    assert attempt is not None and state(db, attempt.task_id)[0].status == "running"
    if db.dialect == "postgresql":  # its claim came back with the row's values, then claimed
        assert slot.reading is not None and slot.reading.capabilities == ("gpu",)


def test_a_completion_claims_the_slots_next_task_in_its_place(
    worker: HostWorker, db: Database, settings: Settings
) -> None:
    slot = worker.slots[0]
    running = [claim(worker, db, settings) for _ in range(slot.config.max_concurrency)]
    with db.session() as session:
        nxt = tasks.create_task(session, settings, {"title": "next"}, actor="admin:test").task.id
    assert worker._claim_in_db(slot) is None  # the slot is full

    stale = Attempt(**{**running[0].__dict__, "lease_token": "not-the-lease"})
    rep = DbReporter(
        db, settings.orchestrator, stale, started=True, then_claim=lambda: slot.reading
    )
    rep.finish(Outcome("complete"), LogChunk(0, "zombie\n"))
    assert rep.next_claim is None  # a refused completion claims nothing

    rep = DbReporter(
        db, settings.orchestrator, running[0], started=True, then_claim=lambda: slot.reading
    )
    rep.finish(Outcome("complete"), LogChunk(0, "done\n"))
    done, types, _ = state(db, running[0].task_id)
    assert (done.status, types[-1]) == ("completed", "completed")
    if db.dialect != "postgresql":  # SQLite completes on the general path, alone
        assert rep.next_claim is None
        return
    assert rep.next_claim is not None and rep.next_claim.task.id == nxt
    claimed, types, _ = state(db, nxt)
    assert (claimed.status, types) == ("running", ["created", "dispatched", "started"])
    assert claimed.lease_digest == tokens.digest(rep.next_claim.lease_token)


def test_a_completion_that_claims_locks_the_agent_before_its_task_as_a_heartbeat_does(
    worker: HostWorker, db: Database, settings: Settings
) -> None:
    if db.dialect != "postgresql":
        pytest.skip("PostgreSQL's one-statement completion and claim")
    slot = worker.slots[0]
    attempt = claim(worker, db, settings)
    with db.session() as session:
        tasks.create_task(session, settings, {"title": "next"}, actor="admin:test")
    rep = DbReporter(
        db, settings.orchestrator, attempt, started=True, then_claim=lambda: slot.reading
    )
    with db.engine.connect() as heartbeat:  # a heartbeat's order: the agent, then its tasks
        heartbeat.execute(
            sql("UPDATE agents SET updated_at = now() WHERE id = :a"), {"a": slot.agent_id}
        )
        finishing = threading.Thread(target=rep.finish, args=(Outcome("complete"),))
        finishing.start()
        time.sleep(0.5)  # the completion waits for the agent's row, holding no task's row
        locked = sql("SELECT id FROM tasks WHERE id = :t FOR UPDATE NOWAIT")
        assert heartbeat.execute(locked, {"t": attempt.task_id}).scalar() == attempt.task_id
        heartbeat.commit()
    finishing.join(10)
    assert not finishing.is_alive()
    assert rep.next_claim is not None
    assert state(db, attempt.task_id)[0].status == "completed"


def test_a_slot_whose_agent_is_resumed_wakes_itself_once(
    worker: HostWorker, db: Database, settings: Settings
) -> None:
    # Tasks queued while the agent was drained had their wake-ups turned away: on resume the
    # worker wakes the slot at once instead of leaving them to the relay.
    resumed: list[Any] = []
    worker.on_resume = resumed.append
    slot = worker.slots[0]
    with db.session() as session:
        agents.update_agent(session, slot.agent_id, {"desired_state": "draining"}, actor="a:t")
    worker.heartbeat()
    worker.heartbeat()
    assert slot.desired_state == "draining" and resumed == []
    with db.session() as session:
        agents.update_agent(session, slot.agent_id, {"desired_state": "active"}, actor="a:t")
    worker.heartbeat()
    worker.heartbeat()
    assert slot.desired_state == "active" and resumed == [slot]


def test_the_completion_finds_the_task_by_primary_key_whatever_the_statistics(
    worker: HostWorker, db: Database, settings: Settings
) -> None:
    # A table never analyzed (a new install's first burst): the completion's row is found by
    # its primary key, never by walking the lease index, whose entries for finished tasks
    # stay until a vacuum.
    if db.dialect != "postgresql":
        pytest.skip("PostgreSQL's plan")
    import json

    from psycopg import RawCursor

    from fleet_common.db import _OnDriver
    from fleet_common.tasks import lease_sql

    attempt = claim(worker, db, settings)
    with db.engine.connect() as connection:
        dialect = connection.dialect
        # Without the next claim (its CTEs need a reading; the row lookup is the same).
        for log in (False, True):
            statement = lease_sql._completion(log, None)
            driver = _OnDriver(statement.on(dialect), dialect)
            params: dict[str, Any] = {
                "task_id": attempt.task_id,
                "agent_id": attempt.agent_id,
                "lease_digest": tokens.digest(attempt.lease_token),
                "now": utcnow(),
                "actor": "agent:x",
                "receipt": json.dumps({"exit_code": 0}),
                "size": 3,
                **({"seq": 0, "data": "ok\n", "max_bytes": 1_000_000} if log else {}),
            }
            cursor = RawCursor(connection.connection.driver_connection)
            cursor.execute("EXPLAIN (FORMAT JSON) " + driver.raw_sql, driver.parameters(params))
            plan = json.dumps(cursor.fetchone()[0])
            assert "pk_tasks" in plan and "ix_tasks_active_lease" not in plan, plan
