#!/usr/bin/env python3
"""Dispatch benchmark: bare Celery against Fleet, on the same machine in the same run.

Three figures, each against its target (see ops/bench/DISPATCH.md):

1. Dispatch latency on Redis + PostgreSQL: from the client having the answer to
   ``POST /tasks`` to the agent process running on a worker (the agent's first statement
   records ``time.time()`` in a file named after the task), over ``--latency-tasks`` tasks
   submitted one at a time. Baseline: ``send_task`` to a bare Celery worker (thread pool,
   same concurrency) whose task body starts the same recording subprocess. Fleet and bare
   tasks alternate, so both see the same machine load.
2. Throughput of trivial tasks (agent command ``true``): ``--throughput-tasks`` submitted at
   once, tasks/s until the last one completed; the baseline runs the same subprocess.
3. The embedded default (SQLite + kombu's filesystem broker): tasks/s and p50 latency.

Fleet runs as its users run it: ``fleet up`` (API under gunicorn, one ``fleet worker``,
``fleet beat``) with a settings file of its own. Needs PostgreSQL and Redis for 1 and 2:
``FLEET_BENCH_PG_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``) and
``FLEET_BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379``).

    .venv/bin/python ops/bench/dispatch.py [--latency-tasks 200] [--throughput-tasks 500]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
import requests

#: The agent: its first statement records when it runs (no shell, no site packages).
STAMP = "import sys,time;t=repr(time.time());open(sys.argv[1],'w').write(t)"
BARE_QUEUE = "bench.bare"
WARM_UP = 5
#: Tasks of a throughput round run first and not counted (both systems): each agent slot's
#: thread, database connection and first spawn ready, the API's connections opened.
THROUGHPUT_WARM_UP = 100


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_for(condition: Callable[[], Any], timeout: float, what: str, poll: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def read_stamp(path: Path) -> float | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return float(text)
    except ValueError:  # being written
        return None


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:  # one sample (--embedded-latency-tasks 1): it is every percentile
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


#: What a process of ``fleet up`` is, from its command line (the rest count as "other").
ROLES = ("api", "worker", "beat")


def group_cpu(pgid: int) -> dict[str, float]:
    """CPU seconds used by the processes of group ``pgid`` and the children they reaped (the
    agents): a figure the machine's load does not inflate, unlike wall time. By role (the
    ``fleet`` subcommand in the command line), plus ``total`` and ``children`` (reaped)."""
    cpu = {"total": 0.0, "children": 0.0}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields[2]) != pgid:  # pgrp; then utime, stime, cutime, cstime
            continue
        used = sum(int(x) for x in fields[11:15]) / tick
        role = next((r for r in ROLES if r.encode() in argv), "other")
        cpu[role] = cpu.get(role, 0.0) + used
        cpu["total"] += used
        cpu["children"] += sum(int(x) for x in fields[13:15]) / tick
    return cpu


def cpu_since(before: dict[str, float], pgid: int, count: int) -> dict[str, float]:
    """CPU ms per task of group ``pgid`` since ``before`` (a :func:`group_cpu` reading)."""
    after = group_cpu(pgid)
    return {k: (v - before.get(k, 0.0)) / count * 1000 for k, v in after.items()}


@dataclass
class Throughput:
    tasks_per_sec: float
    cpu: dict[str, float]  # CPU ms per task: total, children (reaped) and by role

    @property
    def cpu_ms_per_task(self) -> float:
        return self.cpu["total"]


# -- services ----------------------------------------------------------------------------------


class Process:
    """A subprocess in its own process group, its output in a file."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"{self.log_path.name} exited with {self.proc.returncode}\n{tail}")

    def stop(self, grace: float = 45) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


# -- Fleet -------------------------------------------------------------------------------------


class Fleet:
    """``fleet up`` with a host ``bench`` whose slots run the stamp agent (latency) and
    ``true`` (throughput), ``concurrency`` each."""

    def __init__(self, name: str, root: Path, concurrency: int, **env: str) -> None:
        self.name = name
        self.root = root
        self.database_url = env.get("FLEET_DATABASE_URL", "")  # PostgreSQL's, else embedded
        self.stamps = root / "stamps"
        self.stamps.mkdir(parents=True)
        config = root / "fleet.toml"
        stamp = [sys.executable, "-S", "-E", "-c", STAMP, f"{self.stamps}/{{task_id}}"]
        config.write_text(
            f"""
[agent_types.stamp]
command = {json.dumps(stamp)}
[agent_types.noop]
command = ["true"]

[[hosts]]
host_id = "bench"
transport = "local"
work_dir = {json.dumps(str(root / "work"))}
agents = [
  {{ agent_type = "stamp", capabilities = ["stamp"], max_concurrency = {concurrency} }},
  {{ agent_type = "noop", capabilities = ["noop"], max_concurrency = {concurrency} }},
]
"""
        )
        self.port = harness.free_port()
        state = root / "state"
        self.process = Process(
            [sys.executable, "-m", "fleet_api.cli", "up", "--port", str(self.port)],
            base_env(FLEET_CONFIG=str(config), FLEET_ORCHESTRATOR_STATE_DIR=str(state), **env),
            root,
            root / "fleet-up.log",
        )
        self.url = f"http://127.0.0.1:{self.port}/api/v1"
        token_file = state / "admin-token"
        wait_for(lambda: self._alive() and token_file.exists(), 120, "fleet up", 0.2)
        self.token = token_file.read_text().strip()
        self.headers = {"Authorization": f"Bearer {self.token}"}
        self.http = requests.Session()
        self._local = threading.local()
        #: Per latency sample: created->dispatched, dispatched->started, started->agent running.
        self.phases: list[tuple[float, float, float]] = []
        wait_for(self._workers_online, 180, f"{name}: the worker's agents online", 0.2)
        for _ in range(WARM_UP):  # every process connected and warm
            self.latency_sample()
        self.phases.clear()

    def _alive(self) -> bool:
        self.process.check()
        return True

    def _get(self, path: str, **params: Any) -> requests.Response:
        self.process.check()
        return self.http.get(f"{self.url}{path}", headers=self.headers, params=params, timeout=30)

    def _workers_online(self) -> bool:
        with contextlib.suppress(requests.ConnectionError):
            agents = self._get("/agents", status="online").json()
            return len(agents) == 2
        return False

    def submit(self, labels: list[str], http: requests.Session | None = None) -> tuple[str, float]:
        """Queue a task; returns its id and when the answer was in hand."""
        body = {"title": "bench", "labels": labels, "max_retries": 0}
        reply = (http or self.http).post(
            f"{self.url}/tasks", json=body, headers=self.headers, timeout=30
        )
        answered = time.time()
        assert reply.status_code == 201, reply.text
        return str(reply.json()["id"]), answered

    def latency_sample(self) -> float:
        task_id, answered = self.submit(["agent:stamp"])
        started = wait_for(lambda: read_stamp(self.stamps / task_id), 60, f"{self.name} agent")
        wait_for(
            lambda: self._get(f"/tasks/{task_id}").json()["status"] == "completed",
            60,
            f"{self.name} task {task_id} completed",
        )
        # Where the time went, from the event log (server clock = this machine's clock).
        at = {e["type"]: _epoch(e["at"]) for e in self._get(f"/tasks/{task_id}/events").json()}
        self.phases.append(
            (
                at["dispatched"] - at["created"],
                at["started"] - at["dispatched"],
                float(started) - at["started"],
            )
        )
        return float(started - answered)

    def throughput(self, count: int, clients: int = 8) -> Throughput:
        """Submit ``count`` trivial tasks from ``clients`` threads; tasks/s to the last done."""
        label = f"bench-{uuid.uuid4().hex[:8]}"

        # The clients share the machine with Fleet: one lean keep-alive connection per thread
        # (http.client, as the other benchmarks use), not requests' per-call machinery.
        body = {"title": "bench", "labels": ["agent:noop", label], "max_retries": 0}

        def submit_one(_: int) -> None:
            if not hasattr(self._local, "json"):
                self._local.json = harness.JsonClient(self.url, self.token)
            status, reply = self._local.json.post("/api/v1/tasks", body)
            assert status == 201, reply

        cpu = group_cpu(self.process.proc.pid)
        database = harness.backends_cpu(self.database_url) if self.database_url else 0.0
        began = time.time()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(submit_one, range(count)))
        submitted = time.time() - began

        def done() -> bool:
            reply = self._get("/tasks", label=label, status="completed", page_size=1)
            return int(json.loads(reply.headers["X-Pagination"])["total"]) >= count

        wait_for(done, 60 + count, f"{self.name}: {count} tasks completed", 0.25)
        cpu = cpu_since(cpu, self.process.proc.pid, count)
        if self.database_url:
            database = harness.backends_cpu(self.database_url) - database
            cpu["postgresql"] = database / count * 1000
        finished = []
        for page in range(1, count // 500 + 2):
            rows = self._get("/tasks", label=label, page=page, page_size=500).json()
            finished += [row["finished_at"] for row in rows]
        end = max(_epoch(f) for f in finished)
        log(f"{self.name}: submitted {count} in {submitted:.2f}s, done after {end - began:.2f}s")
        return Throughput(count / (end - began), cpu)

    def close(self) -> None:
        self.process.stop()


def _epoch(rfc3339: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


# -- bare Celery -------------------------------------------------------------------------------


def bare_app(broker: str) -> Any:
    from celery import Celery

    app = Celery("bench", broker=broker)
    # Fleet's own reliability settings, so the difference is Fleet's work, not the config.
    app.conf.update(
        task_ignore_result=True,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_default_queue=BARE_QUEUE,
        broker_connection_retry_on_startup=True,
    )
    return app


def run_bare_worker(broker: str, concurrency: int) -> None:
    """The baseline worker: the task starts ``argv`` and waits for it, then marks it done."""
    app = bare_app(broker)

    @app.task(name="bench.run")
    def run(argv: list[str], done: str) -> None:
        subprocess.run(argv, stdin=subprocess.DEVNULL, check=False)
        Path(done).touch()

    pool = ["--pool", "threads", "--concurrency", str(concurrency), "--queues", BARE_QUEUE]
    app.worker_main(["worker", *pool, "--without-gossip", "--without-mingle", "-l", "WARNING"])


class Bare:
    def __init__(self, root: Path, broker: str, concurrency: int) -> None:
        self.root = root
        for name in ("stamps", "done"):
            (root / name).mkdir(parents=True)
        self.process = Process(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--bare-worker",
                broker,
                str(concurrency),
            ],
            base_env(),
            root,
            root / "bare-worker.log",
        )
        self.app = bare_app(broker)
        for _ in range(WARM_UP):
            self.latency_sample(timeout=120)

    def submit(self, argv: list[str], name: str) -> float:
        done = str(self.root / "done" / name)
        self.app.send_task("bench.run", args=[argv, done], queue=BARE_QUEUE)
        return time.time()

    def latency_sample(self, timeout: float = 60) -> float:
        name = uuid.uuid4().hex
        stamp = self.root / "stamps" / name
        answered = self.submit([sys.executable, "-S", "-E", "-c", STAMP, str(stamp)], name)
        self.process.check()
        started = wait_for(lambda: read_stamp(stamp), timeout, "the bare agent")
        wait_for((self.root / "done" / name).exists, timeout, "the bare task done", 0.005)
        return float(started - answered)

    def throughput(self, count: int) -> Throughput:
        batch = uuid.uuid4().hex[:8]
        cpu = group_cpu(self.process.proc.pid)
        began = time.time()
        for n in range(count):
            self.submit(["true"], f"{batch}-{n}")
        done = self.root / "done"
        wait_for(
            lambda: len(list(done.glob(f"{batch}-*"))) >= count, 60 + count, "bare tasks", 0.25
        )
        cpu = cpu_since(cpu, self.process.proc.pid, count)
        end = max(p.stat().st_mtime for p in done.glob(f"{batch}-*"))
        return Throughput(count / (end - began), cpu)

    def close(self) -> None:
        self.process.stop()
        self.app.close()


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Latency:
    samples: list[float]

    @property
    def p50(self) -> float:
        return pct(self.samples, 50) * 1000

    @property
    def p99(self) -> float:
        return pct(self.samples, 99) * 1000

    def row(self, name: str) -> str:
        mean, most = statistics.fmean(self.samples) * 1000, max(self.samples) * 1000
        return f"  {name:<34} {self.p50:8.1f} {self.p99:8.1f} {mean:8.1f} {most:8.1f}"


def interpreter_start(samples: int = 30) -> float:
    """p50 of launching the stamp agent directly (its share of every latency), in ms."""
    with tempfile.TemporaryDirectory() as tmp:
        times = []
        for n in range(samples):
            path = Path(tmp) / str(n)
            before = time.time()
            subprocess.run([sys.executable, "-S", "-E", "-c", STAMP, str(path)], check=True)
            times.append(float(path.read_text()) - before)
    return pct(times, 50) * 1000


def verdict(ok: bool, text: str) -> str:
    return f"  [{'PASS' if ok else 'MISS'}] {text}"


def run_on_postgres(args: argparse.Namespace, root: Path, r: dict[str, Any]) -> None:
    """Bare Celery and Fleet on Redis + PostgreSQL: latency (unless --throughput-only), then
    throughput; the results go in ``r``."""
    with (
        harness.scratch_postgres() as pg,
        harness.scratch_redis() as fleet_broker,
        harness.scratch_redis() as bare_b,
    ):
        log("starting bare Celery and Fleet (redis + postgresql)")
        bare = Bare(root / "bare", bare_b, args.concurrency)
        fleet = Fleet(
            "fleet", root / "fleet", args.concurrency,
            FLEET_DATABASE_URL=pg, FLEET_BROKER_URL=fleet_broker,
        )  # fmt: skip
        try:
            if not args.throughput_only:
                fleet_lat, bare_lat = [], []
                log(f"latency: {args.latency_tasks} tasks each")
                for n in range(args.latency_tasks):
                    pair = [(fleet.latency_sample, fleet_lat), (bare.latency_sample, bare_lat)]
                    for sample, into in pair if n % 2 else pair[::-1]:
                        into.append(sample())
                r["fleet_lat"], r["bare_lat"] = Latency(fleet_lat), Latency(bare_lat)
                r["fleet_phases"] = fleet.phases
            log(f"throughput: {THROUGHPUT_WARM_UP} tasks each to warm up, not counted")
            bare.throughput(THROUGHPUT_WARM_UP)
            fleet.throughput(THROUGHPUT_WARM_UP)
            log(f"throughput: {args.throughput_tasks} tasks each")
            r["bare_tps"] = bare.throughput(args.throughput_tasks)
            r["fleet_tps"] = fleet.throughput(args.throughput_tasks)
        finally:
            fleet.close()
            bare.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-tasks", type=int, default=200)
    parser.add_argument("--throughput-tasks", type=int, default=500)
    parser.add_argument("--embedded-latency-tasks", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4, help="agents per worker")
    parser.add_argument("--skip-embedded", action="store_true")
    parser.add_argument(
        "--throughput-only",
        action="store_true",
        help="only the throughput phase on redis + postgresql (no latency, no embedded)",
    )
    parser.add_argument(
        "--embedded-only",
        action="store_true",
        help="only the embedded default (sqlite + filesystem broker): its latency and throughput",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--bare-worker", nargs=2, metavar=("BROKER", "CONCURRENCY"))
    args = parser.parse_args(argv)
    if args.bare_worker:
        run_bare_worker(args.bare_worker[0], int(args.bare_worker[1]))
        return 0

    root = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    load = os.getloadavg()
    print("Fleet dispatch benchmark")
    print(
        f"  machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} "
        f"{load[2]:.1f}; Python {sys.version.split()[0]}"
    )
    print(
        f"  latency: {args.latency_tasks} tasks each, one at a time, Fleet and bare alternating"
        f" (embedded: {args.embedded_latency_tasks}); throughput: {args.throughput_tasks} tasks"
        f" each; {args.concurrency} agents per worker (thread pools); work dir {root}"
    )
    start_ms = interpreter_start()
    print(f"  the stamp agent's own start (python -S, launched directly): p50 {start_ms:.1f} ms")
    r: dict[str, Any] = {}
    try:
        if not args.embedded_only:
            run_on_postgres(args, root, r)
        if not (args.skip_embedded or args.throughput_only):
            log("embedded default (sqlite + filesystem broker)")
            embedded = Fleet("embedded", root / "embedded", args.concurrency)
            try:
                samples = [embedded.latency_sample() for _ in range(args.embedded_latency_tasks)]
                r["emb_lat"], r["emb_phases"] = Latency(samples), embedded.phases
                r["emb_tps"] = embedded.throughput(args.throughput_tasks)
            finally:
                embedded.close()
    finally:
        if not args.keep:
            subprocess.run(["rm", "-rf", str(root)], check=False)
    load = os.getloadavg()
    print(f"  load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    report(r)
    return 0


def phases_row(name: str, phases: list[tuple[float, float, float]]) -> str:
    cells = [statistics.median(p[i] for p in phases) * 1000 for i in range(3)]
    return f"  {name:<34} " + " ".join(f"{c:16.1f}" for c in cells)


def report(r: dict[str, Any]) -> None:
    if "fleet_lat" in r:
        report_latency(r)
    elif "emb_lat" in r:
        print("\nDispatch latency (ms): POST /tasks answered -> agent process running")
        print(f"  {'':<34} {'p50':>8} {'p99':>8} {'mean':>8} {'max':>8}")
        print(r["emb_lat"].row("Fleet embedded (sqlite + filesystem)"))
    report_throughput(r)


def report_latency(r: dict[str, Any]) -> None:
    print("\nDispatch latency (ms): POST /tasks answered -> agent process running")
    print(f"  {'':<34} {'p50':>8} {'p99':>8} {'mean':>8} {'max':>8}")
    print(r["bare_lat"].row("bare Celery (redis, send_task)"))
    print(r["fleet_lat"].row("Fleet (redis + postgresql)"))
    if "emb_lat" in r:
        print(r["emb_lat"].row("Fleet embedded (sqlite + filesystem)"))
    print("\nWhere Fleet's time goes, p50 ms (event log): created -> dispatched (publish, broker,")
    print("worker, claim), dispatched -> started (the rest of the claim's transaction, which")
    print("records both), started -> agent running (commit, workspace steps, the agent's spawn)")
    print(phases_row("Fleet (redis + postgresql)", r["fleet_phases"]))
    if "emb_phases" in r:
        print(phases_row("Fleet embedded", r["emb_phases"]))


def report_throughput(r: dict[str, Any]) -> None:
    print("\nThroughput of trivial tasks (agent `true`)")
    print(f"  {'':<34} {'tasks/s':>8} {'CPU ms/task':>12}")
    rows = []
    if "fleet_tps" in r:
        rows += [
            ("bare Celery (redis)", r["bare_tps"]),
            ("Fleet (redis + postgresql)", r["fleet_tps"]),
        ]
    if "emb_tps" in r:
        rows.append(("Fleet embedded (sqlite + filesystem)", r["emb_tps"]))
    for name, t in rows:
        print(f"  {name:<34} {t.tasks_per_sec:8.1f} {t.cpu_ms_per_task:12.1f}")
    print("\nCPU ms per task by process (agents and other children: reaped by their parent)")
    for name, t in rows[1:] if "fleet_tps" in r else rows:
        split = ", ".join(f"{role} {t.cpu[role]:.1f}" for role in ROLES if role in t.cpu)
        print(f"  {name:<34} {split}; reaped children {t.cpu['children']:.1f}")
        if "postgresql" in t.cpu:
            print(f"  {'':<34} + PostgreSQL backends {t.cpu['postgresql']:.1f} (not in the total)")
    checks = []
    if "fleet_tps" in r:
        ratio = r["fleet_tps"].tasks_per_sec / r["bare_tps"].tasks_per_sec
        checks.append((ratio >= 0.5, f"Fleet throughput {ratio:.2f}x bare >= 0.5x"))
    if "fleet_lat" in r:
        fleet, bare = r["fleet_lat"], r["bare_lat"]
        checks[:0] = [
            (
                fleet.p50 <= bare.p50 + 10,
                f"Fleet p50 {fleet.p50:.1f} ms <= bare p50 {bare.p50:.1f} ms + 10 ms",
            ),
            (fleet.p99 < 50, f"Fleet p99 {fleet.p99:.1f} ms < 50 ms"),
        ]
    if "emb_tps" in r:
        emb_tps, emb_p50 = r["emb_tps"].tasks_per_sec, r["emb_lat"].p50
        checks += [
            (emb_tps >= 50, f"embedded {emb_tps:.1f} tasks/s >= 50"),
            (emb_p50 < 100, f"embedded p50 {emb_p50:.1f} ms < 100 ms"),
        ]
    print("\nTargets")
    for ok, text in checks:
        print(verdict(ok, text))


if __name__ == "__main__":
    sys.exit(main())
