"""CPU per ``POST /api/v1/tasks`` in process: the Flask test client (no HTTP server) on a scratch
PostgreSQL database, one registered agent that can serve the tasks.

Submits ``--requests`` tasks one after another (after ``--warm-up`` more, not counted) with the
dispatch benchmark's body (``title``, two labels, ``max_retries``) and prints the process's CPU
time per request. Wake-ups are recorded, not sent, unless ``--publish`` (then the Celery
publisher sends them to an empty Redis database of our own; its thread's CPU is counted too).
``--profile`` adds a cProfile pass (CPU time, the main thread only) and prints its top.

Run: ``.venv/bin/python ops/bench/post_tasks.py``. ``harness`` puts the checkout the script is
in first on ``sys.path``: to measure another one, run a copy of this file from that
checkout's ``ops/bench``, and alternate the two (the figure moves with the machine's load).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

import harness

import fleet_api
from fleet_api.app import create_app
from fleet_common.auth import service as auth
from fleet_common.auth.models import TokenKind
from fleet_common.db import Database
from fleet_common.settings import load_settings

BODY = {"title": "bench", "labels": ["agent:noop", "bench-x"], "max_retries": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warm-up", type=int, default=200)
    parser.add_argument("--publish", action="store_true", help="send the wake-ups (Redis)")
    parser.add_argument("--profile", action="store_true", help="a cProfile pass after")
    args = parser.parse_args()
    print(f"code: {Path(fleet_api.__file__).resolve().parent.parent}")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(harness.scratch_database("fleet_bench_post"))
        env = {
            "FLEET_DATABASE_URL": url,
            "FLEET_ORCHESTRATOR_STATE_DIR": tempfile.mkdtemp(prefix="fleet-bench-post-"),
        }
        if args.publish:
            env["FLEET_BROKER_URL"] = stack.enter_context(harness.scratch_redis())
        settings = load_settings(env=env)
        db = Database(url)
        stack.callback(db.dispose)
        app = create_app(settings, db=db, publisher=None if args.publish else False)
        if not args.publish:
            app.extensions["fleet"].publish = lambda items: None
        client = app.test_client()
        with db.session() as session:
            _, secret = auth.mint(session, TokenKind.ADMIN, actor="bench", name="bench")
        headers = {"Authorization": f"Bearer {secret}"}
        join = client.post("/api/v1/join-tokens", json={}, headers=headers).get_json()["token"]
        agent = {"join_token": join, "name": "a", "host_uid": "a", "capabilities": ["noop"]}
        assert client.post("/api/v1/agents/register", json=agent).status_code == 201

        def submit(count: int) -> None:
            for _ in range(count):
                reply = client.post("/api/v1/tasks", json=BODY, headers=headers)
                assert reply.status_code == 201, reply.get_data()

        submit(args.warm_up)
        cpu, wall = time.process_time(), time.perf_counter()
        submit(args.requests)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        print(
            f"POST /tasks: {cpu / args.requests * 1e3:.3f} ms of CPU per request "
            f"({wall / args.requests * 1e3:.3f} ms wall), {args.requests} requests"
        )
        if args.profile:
            profile: Any = cProfile.Profile(time.process_time)
            profile.runcall(submit, min(args.requests, 1000))
            pstats.Stats(profile).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
