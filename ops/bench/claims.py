"""Pull claims per second: 32 agents dequeuing through the real HTTP stack, against a bare
SQL claim loop doing the least a correct claim can do.

Fleet: gunicorn serving ``fleet_api.wsgi:app`` (gthread workers); each client process
registers its own agent with a join token minted in the database, then loops
``POST /api/v1/tasks/dequeue`` with ``wait_secs=0`` on a keep-alive connection until the queue
is empty. Agents have a high max_concurrency and complete nothing, so every request is one
claim (the baseline completes nothing either).

Baseline: the same number of processes, each with one psycopg connection, looping
``SELECT id ... FOR UPDATE SKIP LOCKED LIMIT 1`` + ``UPDATE ... SET status = 'dispatched'`` in
one transaction per claim, on the same schema and the same claim index.

Reference (not a target): ``bare_app()`` below, the baseline's two statements behind a bare
Flask endpoint in the same gunicorn layout, driven by the same HTTP clients. It shows what any
Flask + gunicorn implementation can reach on this machine, next to the raw SQL loop.

All claim the same number of queued tasks (no requirements, priority 0). Afterwards the
database is checked for double claims. Run: ``.venv/bin/python ops/bench/claims.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
from harness import Outcome

BASELINE_CLAIM = """
    SELECT id FROM tasks
    WHERE status = 'queued' AND assigned_agent_id IS NULL AND req_key = '_'
    ORDER BY priority DESC, created_at, id
    LIMIT 1 FOR UPDATE SKIP LOCKED
"""
BASELINE_UPDATE = """
    UPDATE tasks SET status = 'dispatched', agent_id = %s, dispatched_at = now(),
        updated_at = now()
    WHERE id = %s
"""
HERE = Path(__file__).resolve().parent


def bare_app() -> Any:
    """The reference: the baseline's claim behind a bare Flask endpoint, one psycopg
    connection per server thread."""
    from flask import Flask, jsonify, request

    connection = harness.thread_connection(os.environ["BENCH_DATABASE_URL"])
    app = Flask("bare")

    @app.post("/claim")
    def claim() -> Any:
        conn = connection()
        agent_id = request.get_json()["agent_id"]
        with conn.transaction():
            row = conn.execute(BASELINE_CLAIM).fetchone()
            if row is not None:
                conn.execute(BASELINE_UPDATE, (agent_id, row[0]))
        if row is None:
            return "", 204
        return jsonify(task={"id": row[0]})

    return app


def _queued_left(conn: Any) -> int:
    return int(harness.scalar(conn, "SELECT count(*) FROM tasks WHERE status = 'queued'"))


def baseline_client(db_url: str, agent_id: str, barrier: Any, results: Any) -> None:
    import psycopg

    outcome = Outcome([], [], [])
    try:
        conn = psycopg.connect(db_url, autocommit=True)
        barrier.wait(600)
        while True:
            started = time.perf_counter()
            with conn.transaction():
                row = conn.execute(BASELINE_CLAIM).fetchone()
                if row is not None:
                    conn.execute(BASELINE_UPDATE, (agent_id, row[0]))
            outcome.latencies.append(time.perf_counter() - started)
            outcome.requests += 1
            if row is not None:
                outcome.ids.append(row[0])
            elif _queued_left(conn) == 0:
                break
        conn.close()
    except Exception as error:
        barrier.abort()
        outcome.errors.append(repr(error))
    results.put(outcome)


def http_client(
    base_url: str,
    db_url: str,
    credential: str,
    name: str,
    complete: bool,
    barrier: Any,
    results: Any,
) -> None:
    """``name`` set: Fleet, ``credential`` is a join token; empty: the bare Flask reference,
    ``credential`` is an agent id."""
    import psycopg

    outcome = Outcome([], [], [])
    try:
        http = harness.JsonClient(base_url)
        if name:
            status, reply = http.post(
                "/api/v1/agents/register",
                {
                    "join_token": credential,
                    "name": name,
                    "host_uid": name,
                    "capabilities": [],
                    "max_concurrency": 256,
                },
            )
            if status != 201:
                raise RuntimeError(f"register: {status} {reply}")
            http.token = reply["agent_token"]
            path, body = "/api/v1/tasks/dequeue", {"wait_secs": 0}
        else:
            path, body = "/claim", {"agent_id": credential}
        db = psycopg.connect(db_url, autocommit=True)
        barrier.wait(600)
        while True:
            started = time.perf_counter()
            status, reply = http.post(path, body)
            outcome.latencies.append(time.perf_counter() - started)
            outcome.requests += 1
            if status == 200:
                task_id = reply["task"]["id"]
                outcome.ids.append(task_id)
                if complete:
                    lease = reply["lease"]["token"]
                    receipt = {"lease_token": lease, "receipt": {"exit_code": 0}}
                    status, reply = http.post(f"/api/v1/tasks/{task_id}/complete", receipt)
                    outcome.requests += 1
                    if status != 200:
                        outcome.errors.append(f"complete: {status} {reply}")
            elif status == 204:
                if _queued_left(db) == 0:
                    break
            else:
                outcome.errors.append(f"dequeue: {status} {reply}")
                break
        db.close()
        http.close()
    except Exception as error:
        barrier.abort()
        outcome.errors.append(repr(error))
    results.put(outcome)


def check_claims(db_url: str, outcomes: list[Outcome], tasks: int, fleet: bool) -> str:
    """Double claims, from the clients and from the database. Returns a one-line verdict."""
    claimed = [i for o in outcomes for i in o.ids]
    duplicates = len(claimed) - len(set(claimed))
    with harness.connect(db_url) as conn:
        dispatched_count = int(
            harness.scalar(conn, "SELECT count(*) FROM tasks WHERE status = 'dispatched'")
        )
        queued = _queued_left(conn)
        multi = 0
        if fleet:
            multi = int(
                harness.scalar(
                    conn,
                    "SELECT count(*) FROM (SELECT task_id FROM task_events WHERE type = "
                    "'dispatched' GROUP BY task_id HAVING count(*) > 1) AS d",
                )
            )
    ok = duplicates == 0 and multi == 0 and queued == 0 and len(set(claimed)) == tasks
    verdict = (
        f"{len(claimed)} claims by clients, {duplicates} duplicates; database: "
        f"{dispatched_count} dispatched, {queued} still queued"
    )
    if fleet:
        verdict += f", {multi} tasks with more than one dispatched event"
    if not ok:
        raise SystemExit(f"DOUBLE OR MISSED CLAIMS: {verdict}")
    return verdict + " -> no double claims"


def report(label: str, outcomes: list[Outcome], seconds: float, tasks: int) -> float:
    latencies = [x for o in outcomes for x in o.latencies]
    rate = tasks / seconds
    print(
        f"   {label}: {tasks} claims in {seconds:.2f}s = {rate:.0f} claims/s; "
        f"per call p50 {1000 * harness.percentile(latencies, 50):.1f} ms, "
        f"p99 {1000 * harness.percentile(latencies, 99):.1f} ms, "
        f"{sum(o.requests for o in outcomes)} calls"
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=8, help="threads per gunicorn worker")
    parser.add_argument("--rounds", type=int, default=2, help="baseline/Fleet pairs to run")
    parser.add_argument("--complete", action="store_true", help="also complete each claim")
    parser.add_argument("--profile", action="store_true", help="py-spy the workers (extra run)")
    args = parser.parse_args()
    if args.tasks > args.clients * 256 and not args.complete:
        parser.error("at most clients x 256 tasks (each agent's max_concurrency is 256)")

    harness.banner(
        "claims: pull claims/s, Fleet over HTTP vs a bare SQL claim loop",
        {
            "clients": f"{args.clients} processes (spawn), one agent / one connection each",
            "tasks": f"{args.tasks} queued, no requirements, priority 0",
            "fleet": (
                f"gunicorn fleet_api.wsgi:app, {args.workers} gthread workers x "
                f"{args.threads} threads, keep-alive; POST /api/v1/tasks/dequeue wait_secs=0"
                + (" then /complete" if args.complete else " (no complete)")
            ),
            "baseline": "psycopg, SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1 + UPDATE, 1 tx/claim",
            "reference": "the baseline tx behind a bare Flask POST /claim, same gunicorn",
            "rounds": args.rounds,
        },
    )
    with harness.scratch_database("fleet_bench_claims") as db_url:
        agent_ids = harness.configured_agents(db_url, "baseline", args.clients, 1_000_000)
        state_dir = tempfile.mkdtemp(prefix="bench-state-")
        env = {"FLEET_DATABASE_URL": db_url, "FLEET_ORCHESTRATOR_STATE_DIR": state_dir}
        bare_env = {"BENCH_DATABASE_URL": db_url}
        config = {"workers": args.workers, "threads": args.threads}
        base_rates, flask_rates, fleet_rates = [], [], []
        with (
            harness.Gunicorn("fleet_api.wsgi:app", env=env, **config) as server,
            harness.Gunicorn("claims:bare_app()", env=bare_env, chdir=HERE, **config) as bare,
        ):
            for round_no in range(1, args.rounds + 1):
                print(f"-- round {round_no}")
                harness.reset_tasks(db_url)
                harness.insert_tasks(db_url, args.tasks)
                outcomes, seconds = harness.run_clients(
                    baseline_client, [(db_url, a) for a in agent_ids], timeout=600
                )
                base_rates.append(report("baseline", outcomes, seconds, args.tasks))
                print("   " + check_claims(db_url, outcomes, args.tasks, fleet=False))

                flask_rates.append(_flask_round(args, db_url, bare, agent_ids))
                fleet_rates.append(_fleet_round(args, db_url, server, profile=False))
            if args.profile:
                print("-- profiled Fleet round (figures not counted)")
                _fleet_round(args, db_url, server, profile=True)

    base, fleet = statistics.median(base_rates), statistics.median(fleet_rates)
    flask = statistics.median(flask_rates)
    print("== result")
    print(f"   baseline (bare SQL):   {base:.0f} claims/s  (rounds: {_fmt(base_rates)})")
    print(f"   reference (bare Flask): {flask:.0f} claims/s  (rounds: {_fmt(flask_rates)})")
    print(f"   Fleet (HTTP):          {fleet:.0f} claims/s  (rounds: {_fmt(fleet_rates)})")
    print(f"   ratio bare Flask/baseline: {flask / base:.2f}  (the HTTP stack's own ceiling)")
    print(f"   ratio Fleet/baseline: {fleet / base:.2f}  (target >= 0.7)")


def _flask_round(args: argparse.Namespace, db_url: str, bare: Any, agent_ids: list[str]) -> float:
    harness.reset_tasks(db_url)
    harness.insert_tasks(db_url, args.tasks)
    cpu_before, pg_before = bare.workers_cpu(), harness.backends_cpu(db_url)
    outcomes, seconds = harness.run_clients(
        http_client, [(bare.url, db_url, a, "", False) for a in agent_ids], timeout=600
    )
    rate = report("bare Flask", outcomes, seconds, args.tasks)
    _cpu_line(bare.workers_cpu() - cpu_before, harness.backends_cpu(db_url) - pg_before, outcomes)
    print("   " + check_claims(db_url, outcomes, args.tasks, fleet=False))
    return rate


def _fleet_round(args: argparse.Namespace, db_url: str, server: Any, *, profile: bool) -> float:
    harness.reset_tasks(db_url)
    harness.insert_tasks(db_url, args.tasks)
    joins = harness.mint_tokens(db_url, "join", args.clients)
    suffix = time.monotonic_ns()
    profilers: list[harness.Profiler] = []

    def start_profiler() -> None:
        profilers.append(harness.Profiler(server.worker_pids(), seconds=10))

    cpu_before, pg_before = server.workers_cpu(), harness.backends_cpu(db_url)

    outcomes, seconds = harness.run_clients(
        http_client,
        [
            (server.url, db_url, join, f"bench-{suffix}-{n}", args.complete)
            for n, join in enumerate(joins)
        ],
        timeout=900,
        on_start=start_profiler if profile else None,
    )
    rate = report("Fleet", outcomes, seconds, args.tasks)
    _cpu_line(server.workers_cpu() - cpu_before, harness.backends_cpu(db_url) - pg_before, outcomes)
    print("   " + check_claims(db_url, outcomes, args.tasks, fleet=True))
    for profiler in profilers:
        print(profiler.summary())
    return rate


def _cpu_line(cpu: float, backends: float, outcomes: list[Outcome]) -> None:
    """The API workers' CPU and their PostgreSQL backends' (those still connected: the
    servers' pools), per request."""
    requests = sum(o.requests for o in outcomes)
    print(
        f"   API workers used {cpu:.1f} CPU-s = {1000 * cpu / requests:.2f} ms per request; "
        f"their PostgreSQL backends {1000 * backends / requests:.2f} ms"
    )


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


if __name__ == "__main__":
    main()
