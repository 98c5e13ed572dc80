"""The Celery app factory and the ``fleet beat`` process.

``make_celery(settings)`` builds the one Celery app every Fleet process uses (API, worker, beat,
Flower), from the same validated settings as the API. Building it connects to nothing; the
broker is reached on first use and a down broker never hangs a caller (short connect timeouts).

Brokers: Redis in production; kombu's ``filesystem://`` transport for the embedded default, with
every folder under ``<state_dir>/broker`` so processes sharing a state dir share the broker.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import IO, Any

from celery import Celery
from celery.app.amqp import AMQP
from kombu import Connection

from fleet_common.settings import Settings
from fleet_worker.filesystem_broker import TRANSPORT as FILESYSTEM_TRANSPORT
from fleet_worker.redis_broker import TRANSPORT as REDIS_TRANSPORT
from fleet_worker.runtime import Runtime
from fleet_worker.schedule import FORGEJO_QUEUE, SWEEPS_QUEUE, beat_schedule
from fleet_worker.tasks import forgejo, reconcile, sweeps

log = logging.getLogger(__name__)

#: Tasks routed nowhere in particular; no Fleet task should land here.
DEFAULT_QUEUE = "fleet.default"
#: Seconds to wait for the broker before an operation fails (publishing, a worker's reconnect).
BROKER_CONNECT_TIMEOUT_SECS = 2
#: Redis read timeout; above kombu's 1 s BRPOP so an idle consumer never times out.
BROKER_SOCKET_TIMEOUT_SECS = 10
#: Redis redelivers a message unacknowledged for this long (acks are late: after the task ran),
#: so it must exceed the longest task; below the longest task, a running task gets a twin.
MIN_VISIBILITY_TIMEOUT_SECS = 3600
#: How often an idle consumer of the filesystem broker looks for messages: half of it is the
#: mean wait of a wake-up. kombu's default (1 s) also paces a busy one: with prefetch 1, each
#: message after the first waits for the next poll. A poll is one folder listing
#: (fleet_worker.filesystem_broker), so polling this often costs little.
FILESYSTEM_POLLING_INTERVAL_SECS = 0.02
#: Longest pause between two attempts to reach a lost broker. kombu's grows by 2 s per attempt
#: up to 30 s, so after a minute's outage a worker could stay deaf 10 s and more once the broker
#: is back; retried this often, it hears wake-ups again within seconds.
BROKER_RECONNECT_MAX_SECS = 2


class FleetConnection(Connection):
    """A broker connection that retries a lost broker at least every BROKER_RECONNECT_MAX_SECS
    (Celery's consumer and beat pass no intervals to ``ensure_connection``)."""

    def ensure_connection(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) <= 2:  # (errback, max_retries): the intervals come next
            kwargs.setdefault("interval_start", 1)
            kwargs.setdefault("interval_step", 1)
            kwargs.setdefault("interval_max", BROKER_RECONNECT_MAX_SECS)
        return super().ensure_connection(*args, **kwargs)


class FleetAMQP(AMQP):
    """Queues Celery creates on demand (``--queues fleet.cap.code:python``) get no exchange of
    their own: Celery binds them to the app's default exchange by routing key, and messages
    reach them through the anonymous exchange by queue name, as the publisher sends them.
    Celery's default names an exchange after each queue, and the filesystem transport refuses
    ``:`` and ``+`` in exchange names."""

    autoexchange = staticmethod(lambda _name: None)
    Connection = FleetConnection


class FleetCelery(Celery):
    """A Celery app that carries Fleet's settings and per-process resources."""

    amqp_cls = FleetAMQP
    runtime: Runtime

    def __init__(self, *args: Any, fleet_settings: Settings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runtime = Runtime(fleet_settings, self)

    @property
    def fleet_settings(self) -> Settings:
        return self.runtime.settings

    def __reduce_keys__(self) -> dict[str, Any]:
        # Keep the settings when the app is pickled (a spawn-started pool, for instance).
        return {**super().__reduce_keys__(), "fleet_settings": self.runtime.settings}


def broker_dir(settings: Settings) -> Path:
    """Where the filesystem broker keeps its messages."""
    return (settings.state_dir / "broker").resolve()


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """kombu transport options for the configured broker (creates the filesystem folders)."""
    url = settings.broker_url
    if url.startswith("filesystem:"):
        base = broker_dir(settings)
        folders = {
            # in == out: a producer writes where every consumer reads, across processes.
            "data_folder_in": base / "queue",
            "data_folder_out": base / "queue",
            "processed_folder": base / "processed",
            # kombu's default is "control" relative to the working directory.
            "control_folder": base / "control",
        }
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        # store_processed: a consumer takes a message by renaming it into processed_folder,
        # atomic on one file system, so two consumers never both take it (kombu's default
        # moves it to the temp dir, a copy when /tmp is another file system). The
        # fleet.sweep.broker_files sweep removes what is left there.
        return {
            **{key: str(folder) for key, folder in folders.items()},
            "store_processed": True,
            "polling_interval": FILESYSTEM_POLLING_INTERVAL_SECS,
        }
    if url.startswith(("redis:", "rediss:")):
        orch = settings.orchestrator
        longest = orch.task_timeout_secs + orch.lease_secs + 300
        return {
            "visibility_timeout": max(MIN_VISIBILITY_TIMEOUT_SECS, longest),
            "socket_connect_timeout": BROKER_CONNECT_TIMEOUT_SECS,
            "socket_timeout": BROKER_SOCKET_TIMEOUT_SECS,
            "retry_on_timeout": True,
            "health_check_interval": 25,
        }
    return {}


def broker_url(settings: Settings) -> str:
    """The broker URL; a bare ``filesystem://`` gets the host kombu would otherwise warn about."""
    url = settings.broker_url
    if url.rstrip("/") == "filesystem:":
        return "filesystem://localhost/"
    return url


def make_celery(settings: Settings) -> FleetCelery:
    """The Celery app for ``settings``; nothing is connected until first use."""
    app = FleetCelery("fleet", fleet_settings=settings)
    app.conf.update(
        broker_url=broker_url(settings),
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=BROKER_CONNECT_TIMEOUT_SECS,
        # Never give up on the broker: at BROKER_RECONNECT_MAX_SECS, Celery's default of 100
        # retries would stop a worker after a few minutes of outage.
        broker_connection_max_retries=None,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        timezone="UTC",
        enable_utc=True,
        task_default_queue=DEFAULT_QUEUE,
        task_routes={
            "fleet.sweep.*": {"queue": SWEEPS_QUEUE},
            "fleet.forgejo.*": {"queue": FORGEJO_QUEUE},
        },
        # A task is acknowledged after it ran, and requeued if its process dies: a worker
        # lost mid-task loses nothing. Prefetch 1: a busy process hoards no messages.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # Flower shows tasks from their events: it switches the workers' on while it runs;
        # task_events has them sent always, and task-sent events too (queued messages).
        worker_send_task_events=settings.orchestrator.task_events,
        task_send_sent_event=settings.orchestrator.task_events,
        beat_schedule=beat_schedule(settings),
    )
    if settings.broker_url.startswith("filesystem:"):
        # kombu's own lets a consumer read a message half written (fleet_worker.filesystem_broker).
        app.conf.broker_transport = FILESYSTEM_TRANSPORT
    elif settings.broker_url.startswith("redis:"):
        # kombu's own stops the worker when Redis drops during a task (fleet_worker.redis_broker).
        # Not for rediss://: naming a transport skips kombu's check that TLS is configured.
        app.conf.broker_transport = REDIS_TRANSPORT
    sweeps.register(app)
    reconcile.register(app)
    forgejo.register(app)
    return app


def run_beat(settings: Settings, *, loglevel: str = "INFO", hostname: str = "fleet-beat@%h") -> int:
    """``fleet beat``: one Celery worker with embedded beat that consumes the sweeps queue and
    the Forgejo write-back's queue.

    Running only the API and this gets every sweep done. Two at once are harmless: the sweeps
    are ``SKIP LOCKED`` and idempotent, and only the first takes the persistent schedule file
    (the second keeps its schedule in memory). Returns the worker's exit code.
    """
    app = make_celery(settings)
    schedule_file, lock = _schedule_file(settings)
    argv = [
        "worker",
        "--beat",
        "--queues",
        f"{SWEEPS_QUEUE},{FORGEJO_QUEUE}",
        # Two: a sweep need not wait behind a Forgejo write-back (short timeouts bound those).
        "--concurrency",
        "2",
        "--pool",
        "prefork",
        "--hostname",
        hostname,
        "--loglevel",
        loglevel,
        # Gossip and mingle only sync state between task workers; a sweeper needs neither.
        "--without-gossip",
        "--without-mingle",
    ]
    if schedule_file is not None:
        argv += ["--schedule-filename", str(schedule_file)]
    else:
        argv += ["--scheduler", "celery.beat:Scheduler"]
    try:
        code = app.start(argv=argv)
    finally:
        if lock is not None:
            lock.close()
        app.runtime.close()
    return int(code or 0)


def _schedule_file(settings: Settings) -> tuple[Path | None, IO[str] | None]:
    """The persistent schedule file and the lock that makes it ours, or (None, None) when
    another beat on this state dir holds it (a shelve written by two processes corrupts)."""
    beat_dir = (settings.state_dir / "beat").resolve()
    beat_dir.mkdir(parents=True, exist_ok=True)
    lock = (beat_dir / "schedule.lock").open("a")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        log.warning("another fleet beat uses %s; this one keeps its schedule in memory", beat_dir)
        return None, None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return beat_dir / "schedule", lock
