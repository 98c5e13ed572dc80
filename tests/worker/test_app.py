"""The app factory, the schedule and the task registry, checked without a running worker."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from celery import Celery

from fleet_common.db import Database
from fleet_common.migrate import upgrade
from fleet_common.settings import Settings, load_settings
from fleet_common.sweeps import SWEEPS
from fleet_common.tasks import service as tasks
from fleet_worker.celery_app import _schedule_file, make_celery
from fleet_worker.publisher import DISPATCH_TASK, wake_queue
from fleet_worker.runtime import runtime_of
from fleet_worker.schedule import RELAY_TASK, SWEEPS_QUEUE
from fleet_worker.tasks.sweeps import prune_processed
from tests import services
from tests.api_helpers import worker_agent

SWEEP_TASKS = {
    "fleet.sweep.heartbeats",
    "fleet.sweep.leases",
    "fleet.sweep.timeouts",
    "fleet.sweep.no_capable_agent",
    "fleet.sweep.commands",
    "fleet.sweep.logs",
    "fleet.sweep.relay",
    "fleet.sweep.deliveries",
}


def settings_for(tmp_path: Path, **env: str) -> Settings:
    return load_settings(env={"FLEET_ORCHESTRATOR_STATE_DIR": str(tmp_path / "state"), **env})


def test_the_filesystem_broker_lives_in_the_state_dir(tmp_path: Path) -> None:
    app = make_celery(settings_for(tmp_path))
    options = app.conf.broker_transport_options
    broker = (tmp_path / "state" / "broker").resolve()
    # One folder for in and out, or producers and consumers in other processes never meet.
    assert options["data_folder_in"] == options["data_folder_out"] == str(broker / "queue")
    for key in ("data_folder_in", "processed_folder", "control_folder"):
        assert Path(options[key]).is_dir() and Path(options[key]).parent == broker
    assert options["store_processed"] is True
    assert app.conf.broker_url == "filesystem://localhost/"


def test_redis_fails_fast_and_outlives_the_longest_task(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path,
        FLEET_BROKER_URL="redis://redis:6379/0",
        FLEET_ORCHESTRATOR_TASK_TIMEOUT_SECS="7200",
    )
    app = make_celery(settings)
    options = app.conf.broker_transport_options
    assert options["visibility_timeout"] > 7200
    assert options["socket_connect_timeout"] <= 5
    assert app.conf.broker_connection_timeout <= 5
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1
    # Off unless asked for, as in Celery: Flower turns the workers' on while it runs.
    assert not app.conf.worker_send_task_events and not app.conf.task_send_sent_event
    assert not (tmp_path / "state" / "broker").exists()
    events = make_celery(settings_for(tmp_path, FLEET_ORCHESTRATOR_TASK_EVENTS="true"))
    assert events.conf.worker_send_task_events and events.conf.task_send_sent_event


def test_building_the_app_connects_to_nothing(tmp_path: Path) -> None:
    closed = services.free_port()
    started = time.monotonic()
    app = make_celery(
        settings_for(
            tmp_path,
            FLEET_BROKER_URL=f"redis://127.0.0.1:{closed}/0",
            FLEET_DATABASE_URL=f"postgresql://nobody@127.0.0.1:{closed}/none",
        )
    )
    assert set(app.tasks) >= SWEEP_TASKS
    assert time.monotonic() - started < 1
    assert runtime_of(app).settings.broker_url.endswith(f":{closed}/0")


def test_only_apps_from_the_factory_have_a_runtime() -> None:
    with pytest.raises(TypeError):
        runtime_of(Celery(set_as_current=False))


def test_sweep_tasks_go_to_the_sweeps_queue_and_expire(tmp_path: Path) -> None:
    app = make_celery(settings_for(tmp_path, FLEET_ORCHESTRATOR_SWEEP_INTERVAL_SECS="7"))
    assert {name for name in app.tasks if name.startswith("fleet.sweep.")} >= SWEEP_TASKS
    for name in SWEEP_TASKS:
        task = app.tasks[name]
        assert (task.expires, task.ignore_result) == (7.0, True)
        assert app.amqp.router.route({}, name)["queue"].name == SWEEPS_QUEUE


def test_beat_runs_every_sweep_and_the_relay_each_interval(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, FLEET_ORCHESTRATOR_SWEEP_INTERVAL_SECS="3")
    schedule = make_celery(settings).conf.beat_schedule
    by_task = {entry["task"]: entry for entry in schedule.values()}
    assert set(by_task) >= {f"fleet.sweep.{key}" for key in SWEEPS} | {RELAY_TASK}
    for name in SWEEP_TASKS:
        entry = by_task[name]
        assert entry["schedule"] == 3.0
        assert entry["options"] == {"expires": 3.0, "queue": SWEEPS_QUEUE}
    assert "fleet.sweep.broker_files" in by_task  # the filesystem broker's cleanup
    redis = make_celery(settings_for(tmp_path, FLEET_BROKER_URL="redis://r/0")).conf.beat_schedule
    assert "fleet.sweep.broker_files" not in {e["task"] for e in redis.values()}


def test_queues_named_after_requirements_work_on_the_filesystem_broker(tmp_path: Path) -> None:
    """Celery's auto-created queue (``--queues`` of a worker) and the publisher's declaration
    both route to the same place, with ``:`` and ``+`` in the name."""
    app = make_celery(settings_for(tmp_path))
    name = "fleet.cap.code:python+tests"
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        consumed = app.amqp.queues[name](channel)
        consumed.declare()
        app.send_task(DISPATCH_TASK, args=["tsk_1"], queue=wake_queue(name), connection=connection)
        message = consumed.get(no_ack=True)
        assert message is not None and message.decode()[0] == ["tsk_1"]


def test_a_second_beat_does_not_share_the_schedule_file(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    first, lock = _schedule_file(settings)
    assert first == (tmp_path / "state" / "beat" / "schedule").resolve() and lock is not None
    try:
        assert _schedule_file(settings) == (None, None)
    finally:
        lock.close()
    again, lock = _schedule_file(settings)
    assert again == first and lock is not None
    lock.close()


def test_prune_processed_removes_only_old_message_files(tmp_path: Path) -> None:
    old, fresh, other = tmp_path / "1_a.q.msg", tmp_path / "2_b.q.msg", tmp_path / "notes.txt"
    for path in (old, fresh, other):
        path.write_text("{}")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    os.utime(other, (an_hour_ago, an_hour_ago))
    assert prune_processed(tmp_path, 300, limit=100) == 1
    assert not old.exists() and fresh.exists() and other.exists()
    assert prune_processed(tmp_path / "missing", 300, limit=100) == 0


def test_the_relay_task_marks_then_publishes(tmp_path: Path) -> None:
    """The relay's body in this process (``apply``): one unit of work, then the wake-up."""
    settings = settings_for(tmp_path)
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    with db.session() as session:
        worker_agent(session, ["relay-here"])  # a place free to claim the task
        task = tasks.create_task(
            session, settings, {"title": "t", "labels": ["agent:relay-here"]}, actor="test"
        ).task
        # The API's own wake-up after commit was lost: the relay must send another.
        task.last_published_at = None
        task_id = task.id
    app = make_celery(settings)
    try:
        app.tasks[RELAY_TASK].apply().get()
        with app.connection_for_read() as connection:
            message = wake_queue("fleet.cap.relay-here")(connection.default_channel).get(
                no_ack=True
            )
        assert message is not None and message.decode()[0] == [task_id]
        app.tasks[RELAY_TASK].apply().get()  # published just now: nothing more to send
        assert runtime_of(app).publisher.sent == 1
    finally:
        app.runtime.close()
        db.dispose()


def test_a_forked_child_builds_its_own_database_and_publisher(tmp_path: Path) -> None:
    """A prefork pool process must not reuse its parent's pooled connections or thread."""
    settings = settings_for(tmp_path)
    upgrade(settings.database_url)
    runtime = runtime_of(make_celery(settings))
    parent_db, parent_publisher = runtime.database, runtime.publisher
    runtime.database.ping()
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code only, never return into pytest
        code = 1
        try:
            fresh = runtime.database is not parent_db and runtime.publisher is not parent_publisher
            runtime.database.ping()
            code = 0 if fresh else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert runtime.database is parent_db and runtime.publisher is parent_publisher
    runtime.database.ping()  # the parent's pool survived the child
    runtime.close()


def test_a_slots_own_wake_ups_are_one_per_place_on_its_agent_queue() -> None:
    from fleet_common.dispatch.routing import agent_queue
    from fleet_common.settings import AgentSlotSettings
    from fleet_worker.host import Slot
    from fleet_worker.publisher import coalesce, queue_name
    from fleet_worker.worker import RESUMED_HINT, slot_wake_ups

    slot = Slot(0, AgentSlotSettings(agent_type="a", max_concurrency=3), agent_id="agt_1")
    wake_ups = slot_wake_ups(slot, RESUMED_HINT)
    assert len(wake_ups) == 3
    assert {queue_name(w) for w in wake_ups} == {agent_queue("agt_1")}
    assert [count for _, count in coalesce(wake_ups)] == [3]  # sent as one message
