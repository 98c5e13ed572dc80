"""Heartbeats per second through the real HTTP stack, against a bare Flask endpoint that does
one UPDATE per request.

Fleet: gunicorn serving ``fleet_api.wsgi:app``; each client process registers its own agent
(join token minted in the database) and loops ``POST /api/v1/agents/heartbeat`` with no leases
on a keep-alive connection for a fixed time. Baseline: ``bare_app()`` below, served by the same
gunicorn configuration: parse the JSON body, one ``UPDATE agents ... WHERE id = %s`` on a
per-thread psycopg connection, answer JSON. Same number of clients, same duration.

Run: ``.venv/bin/python ops/bench/heartbeats.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
from harness import Outcome

HERE = Path(__file__).resolve().parent


def bare_app() -> Any:
    """The baseline: the least a heartbeat endpoint can do on PostgreSQL."""
    from flask import Flask, jsonify, request

    connection = harness.thread_connection(os.environ["BENCH_DATABASE_URL"])
    app = Flask("bare")

    @app.post("/heartbeat")
    def heartbeat() -> Any:
        agent_id = request.get_json()["agent_id"]
        connection().execute(
            "UPDATE agents SET status = 'online', last_heartbeat_at = now(), updated_at = now() "
            "WHERE id = %s",
            (agent_id,),
        )
        return jsonify(ok=True)

    return app


def client(
    base_url: str,
    mode: str,
    credential: str,
    name: str,
    seconds: float,
    barrier: Any,
    results: Any,
) -> None:
    """``mode`` "fleet": ``credential`` is a join token; "bare": it is an agent id."""
    outcome = Outcome([], [], [])
    body: dict[str, Any]
    try:
        http = harness.JsonClient(base_url)
        if mode == "fleet":
            status, reply = http.post(
                "/api/v1/agents/register",
                {"join_token": credential, "name": name, "host_uid": name, "capabilities": []},
            )
            if status != 201:
                raise RuntimeError(f"register: {status} {reply}")
            http.token = reply["agent_token"]
            path, body = "/api/v1/agents/heartbeat", {"leases": []}
        else:
            path, body = "/heartbeat", {"agent_id": credential}
        barrier.wait(600)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            status, reply = http.post(path, body)
            outcome.latencies.append(time.perf_counter() - started)
            outcome.requests += 1
            if status != 200:
                outcome.errors.append(f"{status} {reply}")
                break
        http.close()
    except Exception as error:
        barrier.abort()
        outcome.errors.append(repr(error))
    results.put(outcome)


def report(label: str, outcomes: list[Outcome], seconds: float) -> tuple[float, float, float]:
    latencies = [x for o in outcomes for x in o.latencies]
    rate = len(latencies) / seconds
    p50, p99 = harness.percentile(latencies, 50) * 1000, harness.percentile(latencies, 99) * 1000
    print(
        f"   {label}: {len(latencies)} heartbeats in {seconds:.1f}s = {rate:.0f}/s; "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"
    )
    return rate, p50, p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each run")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=8, help="threads per gunicorn worker")
    parser.add_argument("--rounds", type=int, default=2, help="baseline/Fleet pairs to run")
    parser.add_argument("--profile", action="store_true", help="py-spy the workers (extra run)")
    args = parser.parse_args()
    harness.banner(
        "heartbeats: Fleet heartbeat endpoint vs a bare Flask UPDATE endpoint",
        {
            "clients": f"{args.clients} processes (spawn), an agent and a connection each",
            "duration": f"{args.seconds:.0f}s per run, back to back",
            "servers": (
                f"gunicorn, {args.workers} gthread workers x {args.threads} threads, "
                "keep-alive, for both"
            ),
            "fleet": "POST /api/v1/agents/heartbeat {'leases': []} with the agent's token",
            "baseline": "POST /heartbeat: JSON body, one UPDATE agents ... WHERE id (psycopg)",
            "rounds": args.rounds,
        },
    )
    results: dict[str, list[tuple[float, float, float]]] = {"bare": [], "fleet": []}
    with harness.scratch_database("fleet_bench_heartbeats") as db_url:
        agent_ids = harness.configured_agents(db_url, "bare", args.clients, 1)
        state_dir = tempfile.mkdtemp(prefix="bench-state-")
        fleet_env = {"FLEET_DATABASE_URL": db_url, "FLEET_ORCHESTRATOR_STATE_DIR": state_dir}
        bare_env = {"BENCH_DATABASE_URL": db_url}
        config = {"workers": args.workers, "threads": args.threads}
        with (
            harness.Gunicorn("fleet_api.wsgi:app", env=fleet_env, **config) as fleet,
            harness.Gunicorn("heartbeats:bare_app()", env=bare_env, chdir=HERE, **config) as bare,
        ):
            for round_no in range(1, args.rounds + 1):
                print(f"-- round {round_no}")
                cpu = bare.workers_cpu()
                outcomes, seconds = harness.run_clients(
                    client,
                    [(bare.url, "bare", a, "", args.seconds) for a in agent_ids],
                    timeout=args.seconds + 120,
                )
                results["bare"].append(report("baseline", outcomes, seconds))
                _cpu_line(bare.workers_cpu() - cpu, outcomes)
                cpu = fleet.workers_cpu()
                outcomes = []
                results["fleet"].append(_fleet_round(args, db_url, fleet.url, round_no, outcomes))
                _cpu_line(fleet.workers_cpu() - cpu, outcomes)
            if args.profile:
                print("-- profiled Fleet round (figures not counted)")
                profilers: list[harness.Profiler] = []
                seconds = max(int(args.seconds) - 2, 1)
                _fleet_round(
                    args,
                    db_url,
                    fleet.url,
                    0,
                    [],
                    lambda: profilers.append(harness.Profiler(fleet.worker_pids(), seconds)),
                )
                print(profilers[0].summary())

    print("== result")
    medians = {}
    for key, label in (("bare", "baseline (bare Flask)"), ("fleet", "Fleet")):
        rows = results[key]
        medians[key] = rate, p50, p99 = tuple(
            statistics.median(r[i] for r in rows) for i in range(3)
        )
        print(f"   {label}: {rate:.0f}/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms (median of rounds)")
    ratio = medians["fleet"][0] / medians["bare"][0]
    print(f"   ratio Fleet/baseline heartbeats/s: {ratio:.2f}  (target >= 0.6)")


def _fleet_round(
    args: argparse.Namespace,
    db_url: str,
    url: str,
    round_no: int,
    outcomes_out: list[Outcome],
    on_start: Callable[[], Any] | None = None,
) -> Any:
    joins = harness.mint_tokens(db_url, "join", args.clients)
    outcomes, seconds = harness.run_clients(
        client,
        [
            (url, "fleet", join, f"bench-{round_no}-{time.monotonic_ns()}-{n}", args.seconds)
            for n, join in enumerate(joins)
        ],
        timeout=args.seconds + 120,
        on_start=on_start,
    )
    outcomes_out.extend(outcomes)
    return report("Fleet", outcomes, seconds)


def _cpu_line(cpu: float, outcomes: list[Outcome]) -> None:
    requests = sum(o.requests for o in outcomes)
    print(f"     server workers used {cpu:.1f} CPU-s = {1000 * cpu / requests:.2f} ms per request")


if __name__ == "__main__":
    main()
