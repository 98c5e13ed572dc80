"""Prometheus metrics. Gauges are read from the database at scrape time, so every API process
reports the same numbers; counters and histograms are per process (set
``PROMETHEUS_MULTIPROC_DIR`` under gunicorn to aggregate them)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from fleet_common.agents.models import Agent
from fleet_common.db import Database
from fleet_common.tasks.models import Task, TaskStatus

DISPATCH_LATENCY = Histogram(
    "fleet_dispatch_latency_seconds",
    "From a task being queued (or its backoff ending) to an agent claiming it",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
WEBHOOKS = Counter("fleet_webhooks_total", "Forgejo deliveries received", ["event", "outcome"])
HTTP_REQUESTS = Counter("fleet_http_requests_total", "API requests", ["method", "endpoint", "code"])


class DatabaseCollector(Collector):
    """Tasks by status, queue depth by requirement key, agents by status."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Any]:
        tasks = GaugeMetricFamily("fleet_tasks", "Tasks by status", labels=["status"])
        depth = GaugeMetricFamily(
            "fleet_queue_depth", "Queued tasks by requirement key", labels=["requirements"]
        )
        agents = GaugeMetricFamily(
            "fleet_agents",
            "Live agents by status and desired state",
            labels=["status", "desired_state"],
        )
        with self.db.session() as session:
            # .all(), not the Result itself: dict() would take a Result (it has keys()) for a
            # mapping and fail.
            counts = dict(
                session.execute(select(Task.status, func.count()).group_by(Task.status)).all()
            )
            for task_status in TaskStatus:
                tasks.add_metric([task_status.value], counts.get(task_status.value, 0))
            queued = (
                select(Task.req_key, func.count())
                .where(Task.status == TaskStatus.QUEUED)
                .group_by(Task.req_key)
            )
            for key, count in session.execute(queued):
                depth.add_metric([key], count)
            live = (
                select(Agent.status, Agent.desired_state, func.count())
                .where(Agent.deleted_at.is_(None))
                .group_by(Agent.status, Agent.desired_state)
            )
            for status, desired, count in session.execute(live):
                agents.add_metric([status, desired], count)
        yield tasks
        yield depth
        yield agents


def render(db: Database) -> tuple[bytes, str]:
    """The exposition text for one scrape: this process's (or all processes') counters, then
    the database gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        shared = CollectorRegistry()
        multiprocess.MultiProcessCollector(shared)
        base = generate_latest(shared)
    else:
        base = generate_latest(REGISTRY)
    gauges = CollectorRegistry(auto_describe=False)
    gauges.register(DatabaseCollector(db))
    return base + generate_latest(gauges), CONTENT_TYPE_LATEST
