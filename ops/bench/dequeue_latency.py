"""Dequeue latency on an empty database vs one with 100,000 finished and 10,000 queued tasks.

One client (one process, one keep-alive connection, one registered agent of capacity 1) runs
sequential ``POST /api/v1/tasks/dequeue`` (wait_secs=0) + ``POST /api/v1/tasks/{id}/complete``
through the real HTTP stack (gunicorn serving ``fleet_api.wsgi:app``); the latency measured is
the dequeue request's, seen by the client. "Empty" holds only the tasks the run dequeues;
"loaded" adds 100,000 finished tasks and keeps 10,000 queued (bulk-inserted with one
INSERT ... SELECT, then ANALYZE; no events, which the claim never reads). Then EXPLAIN ANALYZE
shows the plan of the claim query on the loaded database.

Run: ``.venv/bin/python ops/bench/dequeue_latency.py``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import harness


def measure(base_url: str, join_token: str, name: str, warmup: int, count: int) -> list[float]:
    http = harness.JsonClient(base_url)
    status, reply = http.post(
        "/api/v1/agents/register",
        {"join_token": join_token, "name": name, "host_uid": name, "capabilities": []},
    )
    assert status == 201, reply
    http.token = reply["agent_token"]
    latencies = []
    for n in range(warmup + count):
        started = time.perf_counter()
        status, reply = http.post("/api/v1/tasks/dequeue", {"wait_secs": 0})
        elapsed = time.perf_counter() - started
        assert status == 200, (status, reply)
        if n >= warmup:
            latencies.append(elapsed)
        task_id, lease = reply["task"]["id"], reply["lease"]["token"]
        receipt = {"lease_token": lease, "receipt": {"exit_code": 0}}
        status, reply = http.post(f"/api/v1/tasks/{task_id}/complete", receipt)
        assert status == 200 and reply["status"] == "completed", (status, reply)
    http.close()
    return latencies


def explain_claim(db_url: str, agent_id: str) -> str:
    """EXPLAIN ANALYZE of the claim statement, as ``claim_for_reply`` sends it (captured from
    a real claim on its way to psycopg, then explained; both rolled back)."""
    from psycopg import RawCursor

    from fleet_common import db as fleet_db
    from fleet_common.dispatch.claim import claim_for_reply
    from fleet_common.settings import OrchestratorSettings

    sent: list[tuple[str, Any]] = []

    class Capturing(RawCursor):  # type: ignore[type-arg]
        def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
            if str(query).lstrip().startswith("WITH"):
                sent.append((str(query), params))
            return super().execute(query, params, **kwargs)

    db = fleet_db.Database(db_url, pool_size=1)
    original, fleet_db.RawCursor = fleet_db.RawCursor, Capturing  # type: ignore[misc]
    try:
        with db.engine.connect() as conn:
            with db.sessions(bind=conn) as session:
                claim_for_reply(session, OrchestratorSettings(), agent_id)
                session.rollback()
            if not sent:
                raise RuntimeError("the claim statement did not go through psycopg's RawCursor")
            statement, params = sent[0]
            cursor = RawCursor(conn.connection.driver_connection)
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, params)
            plan = "\n".join(f"     {row[0]}" for row in cursor.fetchall())
            conn.rollback()
        return plan
    finally:
        fleet_db.RawCursor = original  # type: ignore[misc]
        db.dispose()


def _agent_id(db_url: str, name: str) -> str:
    with harness.connect(db_url) as conn:
        return str(harness.scalar(conn, "SELECT id FROM agents WHERE name = %s", (name,)))


def run_phase(
    label: str, args: argparse.Namespace, db_url: str, server: Any, finished: int, queued: int
) -> list[float]:
    harness.reset_tasks(db_url)
    if finished:
        old_agent = _agent_id(db_url, "bench-old")
        harness.insert_tasks(db_url, finished, status="completed", agent_id=old_agent)
    harness.insert_tasks(db_url, queued, start=finished)
    join = harness.mint_tokens(db_url, "join", 1)[0]
    name = f"latency-{label}-{time.monotonic_ns()}"
    cpu = server.workers_cpu()
    started = time.monotonic()
    latencies = measure(server.url, join, name, args.warmup, args.count)
    cpu, wall = server.workers_cpu() - cpu, time.monotonic() - started
    requests = 2 * (args.warmup + args.count)
    p50, p99 = harness.percentile(latencies, 50), harness.percentile(latencies, 99)
    print(
        f"   {label}: {finished} finished + {queued} queued tasks: dequeue p50 "
        f"{1000 * p50:.2f} ms, p99 {1000 * p99:.2f} ms, mean "
        f"{1000 * sum(latencies) / len(latencies):.2f} ms ({len(latencies)} dequeues)"
    )
    print(
        f"     API workers: {1000 * cpu / requests:.1f} ms CPU per request (dequeue or complete), "
        f"{1000 * wall / requests:.1f} ms wall per request"
    )
    if finished:
        print("   EXPLAIN ANALYZE of the claim statement, loaded database:")
        print(explain_claim(db_url, _agent_id(db_url, name)))
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="measured dequeues per phase")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--finished", type=int, default=100_000)
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=8, help="threads per gunicorn worker")
    args = parser.parse_args()
    if args.queued < args.count + args.warmup:
        parser.error("--queued must be at least --count + --warmup")
    harness.banner(
        "dequeue_latency: dequeue latency, empty vs loaded database (HTTP stack)",
        {
            "client": "1 process, sequential dequeue (timed) + complete, keep-alive",
            "server": (
                f"gunicorn fleet_api.wsgi:app, {args.workers} gthread workers x "
                f"{args.threads} threads"
            ),
            "empty": f"{args.count + args.warmup} queued tasks only",
            "loaded": f"{args.finished} completed + {args.queued} queued tasks",
            "measured": f"{args.count} dequeues per phase after {args.warmup} warm-up ones",
        },
    )
    with harness.scratch_database("fleet_bench_latency") as db_url:
        _old_agent(db_url)
        state_dir = tempfile.mkdtemp(prefix="bench-state-")
        env = {"FLEET_DATABASE_URL": db_url, "FLEET_ORCHESTRATOR_STATE_DIR": state_dir}
        with harness.Gunicorn(
            "fleet_api.wsgi:app", env=env, workers=args.workers, threads=args.threads
        ) as server:
            empty = run_phase("empty", args, db_url, server, 0, args.count + args.warmup)
            loaded = run_phase("loaded", args, db_url, server, args.finished, args.queued)
    print("== result")
    for p in (50, 99):
        e, f = harness.percentile(empty, p), harness.percentile(loaded, p)
        print(
            f"   p{p}: empty {1000 * e:.2f} ms, loaded {1000 * f:.2f} ms, "
            f"ratio loaded/empty {f / e:.2f}  (target <= 1.5)"
        )


def _old_agent(db_url: str) -> None:
    """The agent the finished tasks ran on."""
    from fleet_common.agents import service as agents
    from fleet_common.db import Database

    db = Database(db_url, pool_size=1)
    try:
        with db.session() as session:
            agents.ensure_configured(
                session,
                host_uid="bench-old",
                name="bench-old",
                host_id="bench",
                hostname="bench",
                agent_type="none",
                capabilities=[],
                max_concurrency=1,
            )
    finally:
        db.dispose()


if __name__ == "__main__":
    main()
