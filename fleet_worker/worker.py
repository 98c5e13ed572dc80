"""``fleet worker --host HOST_ID``: a Celery worker that serves one configured host.

It consumes exactly the queues its agent slots can serve, runs at most ``max_concurrency``
attempts per slot (a thread pool as large as the host's total capacity), heartbeats for its
slots, and on SIGTERM takes nothing new, lets running attempts finish for a grace period, then
stops them and reports them lost so they are retried elsewhere.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from typing import Any

from celery import bootsteps, signals

from fleet_common.dispatch.routing import NO_REQUIREMENTS
from fleet_common.settings import AgentSlotSettings, HostSettings, Settings
from fleet_common.sweeps import Publish
from fleet_worker.celery_app import make_celery
from fleet_worker.host import HostWorker, Slot
from fleet_worker.host_lock import HostLock, HostTaken
from fleet_worker.tasks import dispatch

log = logging.getLogger("fleet.worker")

#: Celery's own lines per message ("Task ... received", "... succeeded"): a wake-up is not a
#: task to the operator, whose attempt's outcome Fleet logs once (``fleet.worker``); shown at
#: DEBUG. Their errors and warnings are always shown.
PER_MESSAGE_LOGGERS = ("celery.worker.strategy", "celery.app.trace")

#: What a worker's wake-up to itself carries instead of a task id (a wake-up is only a hint).
CONNECTED_HINT = "(broker connected)"
RESUMED_HINT = "(agent resumed)"


def self_wake_ups(host: HostWorker) -> list[Publish]:
    """One wake-up per unit of the host's capacity, each on its slot's own agent queue."""
    return [wake_up for slot in host.slots for wake_up in slot_wake_ups(slot)]


def slot_wake_ups(slot: Slot, hint: str = CONNECTED_HINT) -> list[Publish]:
    """One wake-up per place of ``slot``, on its agent's queue (sent as one message)."""
    return [Publish(hint, NO_REQUIREMENTS, slot.agent_id)] * slot.config.max_concurrency


class WakeOnConnect(bootsteps.StartStopStep):
    """Each time the worker (re)connects to the broker it wakes itself: tasks queued while it
    could hear no wake-up (the broker was down, the worker was starting) are claimed at once,
    not when the relay next re-sends them (up to relay_after_secs + sweep_interval_secs)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent: Any) -> None:
        host = getattr(parent.app, "fleet_host", None)
        if isinstance(host, HostWorker) and not host.stopping:
            parent.app.runtime.publisher.publish(self_wake_ups(host))


def host_for(settings: Settings, host_id: str | None) -> HostSettings:
    """The configured host, or — with none named and none configured under this name — a local
    host named after this machine (one per ``docker compose --scale worker=N`` replica)."""
    if host_id:
        return settings.host(host_id)
    if len(settings.hosts) == 1:
        return settings.hosts[0]
    name = os.environ.get("FLEET_WORKER_HOST") or socket.gethostname()
    for host in settings.hosts:
        if host.host_id == name:
            return host
    return HostSettings(
        host_id=name,
        transport="local",
        work_dir=str((settings.state_dir / "work" / name).resolve()),
        agents=(AgentSlotSettings(agent_type="demo", max_concurrency=4),),
    )


def run_worker(settings: Settings, host_id: str | None = None, *, loglevel: str = "INFO") -> int:
    """Run the worker for one host until it is stopped; returns the exit code."""
    host = host_for(settings, host_id)
    app = make_celery(settings)
    dispatch.register(app)
    # One connection per attempt thread, the heartbeat's, and one to spare.
    app.runtime.pool_size = sum(slot.max_concurrency for slot in host.agents) + 2
    db = app.runtime.database
    host_lock = HostLock(db, host.host_id)
    try:
        host_lock.acquire()  # before register(), which fails what the host left running
    except HostTaken as error:
        log.error("%s", error)
        app.runtime.close()
        return 1
    worker = HostWorker(
        settings,
        host,
        db,
        on_restart=lambda: os.kill(os.getpid(), signal.SIGTERM),
        on_resume=lambda slot: app.runtime.publisher.publish(slot_wake_ups(slot, RESUMED_HINT)),
        host_lock=host_lock,
    )
    worker.register()
    app.fleet_host = worker
    app.steps["consumer"].add(WakeOnConnect)
    grace = settings.orchestrator.worker_shutdown_grace_secs

    @signals.after_setup_logger.connect(weak=False)
    def _per_message_lines(**_: Any) -> None:
        if logging.getLevelName(loglevel.upper()) != logging.DEBUG:
            for name in PER_MESSAGE_LOGGERS:
                logging.getLogger(name).setLevel(logging.WARNING)

    @signals.worker_shutting_down.connect(weak=False)
    def _shutting_down(**_: Any) -> None:
        log.info("shutting down: no new tasks; running ones get %ss", grace)
        worker.begin_shutdown(grace)

    worker.start_heartbeats()
    queues = worker.queues()
    log.info("host %s serves %d queue(s): %s", host.host_id, len(queues), ", ".join(queues[:8]))
    argv = [
        "worker",
        "--queues",
        ",".join(queues),
        "--pool",
        "threads",
        "--concurrency",
        str(max(worker.capacity, 1)),
        "--hostname",
        f"fleet-{host.host_id}@%h",
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    ]
    try:
        code = app.start(argv=argv)
    finally:
        worker.close()
        host_lock.release()
        app.runtime.close()
    return int(code or 0)
