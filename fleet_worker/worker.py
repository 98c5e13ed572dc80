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

from celery import signals

from fleet_common.settings import AgentSlotSettings, HostSettings, Settings
from fleet_worker.celery_app import make_celery
from fleet_worker.host import HostWorker
from fleet_worker.tasks import dispatch

log = logging.getLogger("fleet.worker")


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
    db = app.runtime.database
    worker = HostWorker(settings, host, db, on_restart=lambda: os.kill(os.getpid(), signal.SIGTERM))
    worker.register()
    app.fleet_host = worker
    grace = settings.orchestrator.worker_shutdown_grace_secs

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
        "--task-events",
    ]
    try:
        code = app.start(argv=argv)
    finally:
        worker.close()
        app.runtime.close()
    return int(code or 0)
