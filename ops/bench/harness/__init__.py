"""What the benchmarks share: a scratch database, gunicorn, tokens, bulk rows, figures.

The benchmark scripts are plain programs (``.venv/bin/python ops/bench/<name>.py``); their
directory is first on ``sys.path``, so ``import harness`` finds this package. Nothing here is
imported by Fleet or its tests.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import platform
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.client import HTTPConnection, RemoteDisconnected
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg

REPO = Path(__file__).resolve().parents[3]
PG_ADMIN_URL = os.environ.get("FLEET_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("FLEET_BENCH_REDIS_URL", "redis://127.0.0.1:6379")

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def banner(title: str, params: dict[str, Any]) -> None:
    """The benchmark's name and every parameter that shapes its figures."""
    print(f"== {title}")
    cpu = os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"   machine: {platform.node()} {cpu} CPUs, load average {load} at start")
    for key, value in params.items():
        print(f"   {key}: {value}")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def scratch_postgres(prefix: str = "fleet_bench") -> Iterator[str]:
    """A new, empty database on the shared server, dropped at the end."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A new database on the shared server, migrated by Alembic, dropped at the end."""
    from fleet_common.migrate import upgrade

    with scratch_postgres(prefix) as url:
        upgrade(url)
        yield url


@contextlib.contextmanager
def scratch_redis() -> Iterator[str]:
    """An empty Redis database (1-15) of our own, locked like the tests' and flushed after."""
    import redis

    token = uuid.uuid4().hex
    for index in range(15, 0, -1):
        client = redis.Redis.from_url(f"{REDIS_URL}/{index}", socket_timeout=5)
        if not client.set("fleet-tests:worker:lock", token, nx=True, ex=3600):
            continue
        if client.dbsize() == 1:
            break
        client.delete("fleet-tests:worker:lock")
    else:
        raise RuntimeError(f"no empty Redis database on {REDIS_URL}")
    try:
        yield f"{REDIS_URL}/{index}"
    finally:
        client.flushdb()


def connect(url: str, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(url, **kwargs)


def scalar(conn: psycopg.Connection[Any], sql: str, params: Sequence[Any] = ()) -> Any:
    """The first column of the first row of ``sql``."""
    row = conn.execute(sql, params).fetchone()
    if row is None:
        raise LookupError(f"no row for {sql!r}")
    return row[0]


def reset_tasks(url: str) -> None:
    """Forget every task and event (agents and tokens stay)."""
    with connect(url) as conn:
        conn.execute("TRUNCATE task_log_chunks, task_events, tasks CASCADE")


def insert_tasks(
    url: str, count: int, *, status: str = "queued", agent_id: str | None = None, start: int = 0
) -> None:
    """``count`` tasks with no requirements in one server-side INSERT ... SELECT.

    Ids ``tsk_bench_<status>_<n>``, oldest first, priority 0; finished ones get an agent and a
    finish time. No ``created`` events: none of the benchmarks replays the log."""
    finished = status in ("completed", "failed", "cancelled")
    with connect(url) as conn:
        conn.execute(
            """
            INSERT INTO tasks (
                id, title, prompt, labels, requirements, req_key, priority, requires_pr, source,
                max_retries, timeout_secs, status, attempt, retry_base, cancel_requested,
                artifacts, event_seq, log_bytes, created_at, updated_at, agent_id, finished_at
            )
            SELECT
                'tsk_bench_' || %(status)s::text || '_' || lpad(n::text, 7, '0'),
                'bench ' || n, '', '[]', '[]', '_', 0, false, 'api', 2, 1800, %(status)s::text,
                1, 0, false, '[]', 0, 0,
                now() - interval '1 day' + n * interval '1 millisecond', now(),
                %(agent)s::text, CASE WHEN %(finished)s::bool THEN now() END
            FROM generate_series(%(first)s::int, %(last)s::int) AS n
            """,
            {
                "status": status,
                "agent": agent_id if finished else None,
                "finished": finished,
                "first": start,
                "last": start + count - 1,
            },
        )
        conn.execute("ANALYZE tasks")


def mint_tokens(url: str, kind: str, count: int) -> list[str]:
    """``count`` tokens of ``kind`` ("admin" or "join") minted directly in the database."""
    from fleet_common.auth import service as auth
    from fleet_common.auth.models import TokenKind
    from fleet_common.db import Database

    db = Database(url, pool_size=1)
    try:
        with db.session() as session:
            return [
                auth.mint(session, TokenKind(kind), actor="bench", ttl_secs=86400)[1]
                for _ in range(count)
            ]
    finally:
        db.dispose()


def configured_agents(url: str, prefix: str, count: int, max_concurrency: int) -> list[str]:
    """``count`` agent rows (``<prefix>-<n>``, no capabilities) for a bare baseline's SQL."""
    from fleet_common.agents import service as agents
    from fleet_common.db import Database

    db = Database(url, pool_size=1)
    try:
        with db.session() as session:
            return [
                agents.ensure_configured(
                    session,
                    host_uid=f"{prefix}-{n}",
                    name=f"{prefix}-{n}",
                    host_id="bench",
                    hostname="bench",
                    agent_type="none",
                    capabilities=[],
                    max_concurrency=max_concurrency,
                ).id
                for n in range(count)
            ]
    finally:
        db.dispose()


def thread_connection(url: str) -> Callable[[], psycopg.Connection[Any]]:
    """A getter of this thread's own autocommit connection to ``url`` (opened on first use):
    what a bare endpoint in a threaded server uses, the least a server can do."""
    local = threading.local()

    def get() -> psycopg.Connection[Any]:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = psycopg.connect(url, autocommit=True)
        return conn

    return get


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def backends_cpu(database_url: str) -> float:
    """CPU seconds of the PostgreSQL backends now connected to ``database_url``'s database
    (the server runs on this machine; a backend that has already exited is not counted)."""
    name = database_url.rsplit("/", 1)[1]
    with connect(PG_ADMIN_URL, autocommit=True) as conn:
        pids = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,)
        ).fetchall()
    return sum(process_cpu(int(pid)) for (pid,) in pids)


class Gunicorn:
    """gunicorn serving ``app`` (a WSGI spec like ``fleet_api.wsgi:app``) as a subprocess."""

    def __init__(
        self,
        app: str,
        *,
        env: dict[str, str],
        workers: int,
        threads: int,
        chdir: Path = REPO,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="bench-gunicorn-", suffix=".log")  # noqa: SIM115
        command = [
            str(Path(sys.executable).parent / "gunicorn"),
            app,
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            str(workers),
            "--worker-class",
            "gthread",
            "--threads",
            str(threads),
            "--keep-alive",
            "5",
            "--backlog",
            "2048",
            "--timeout",
            "120",
            "--chdir",
            str(chdir),
            "--no-control-socket",
        ]
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"gunicorn exited with {code}:\n{self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not listen within {timeout}s:\n{self.tail()}")

    def worker_pids(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        )
        return [int(pid) for pid in out.stdout.split()]

    def workers_cpu(self) -> float:
        """CPU seconds (user + system) the worker processes have used so far."""
        return sum(process_cpu(pid) for pid in self.worker_pids())

    def tail(self, lines: int = 40) -> str:
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.log.close()

    def __enter__(self) -> Gunicorn:
        return self

    def __exit__(self, exc_type: object, *_exc: object) -> None:
        if exc_type is not None:
            print(f"-- gunicorn log (tail):\n{self.tail()}", file=sys.stderr)
        self.stop()


class Profiler:
    """``py-spy record`` of some processes while a phase runs, summarised afterwards."""

    def __init__(self, pids: Sequence[int], seconds: int, *, gil: bool = True) -> None:
        """``gil``: sample only threads holding the GIL, i.e. Python CPU time; without it,
        every thread py-spy does not see idle, including those blocked on PostgreSQL."""
        self.out = Path(tempfile.mkdtemp(prefix="bench-pyspy-"))
        spy = Path(sys.executable).parent / "py-spy"
        self.processes = []
        if not spy.exists():
            print("   (py-spy not installed: no profile)")
            return
        for pid in pids:
            self.processes.append(
                subprocess.Popen(
                    [
                        str(spy),
                        "record",
                        "--pid",
                        str(pid),
                        "--duration",
                        str(seconds),
                        "--rate",
                        "200",
                        "--format",
                        "raw",
                        "--output",
                        str(self.out / f"{pid}.txt"),
                        "--nonblocking",
                        *(["--gil"] if gil else []),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    def summary(self, top: int = 15) -> str:
        for process in self.processes:
            process.wait(timeout=120)
        return summarise_collapsed(list(self.out.glob("*.txt")), top)


# (label, path fragments) in the order they are tried on a frame's file path.
_BUCKETS = (
    ("psycopg (driver, incl. waiting on the socket)", ("psycopg/",)),
    ("SQLAlchemy ORM unit of work (flush)", ("sqlalchemy/orm/unitofwork", "orm/persistence")),
    ("SQLAlchemy ORM (session, loading, attributes)", ("sqlalchemy/orm/",)),
    ("SQLAlchemy Core (compile, execute, results, pool)", ("sqlalchemy/",)),
    ("marshmallow / webargs / apispec", ("marshmallow/", "webargs/", "apispec/")),
    ("flask-smorest", ("flask_smorest/",)),
    ("Flask / Werkzeug", ("flask/", "werkzeug/")),
    ("gunicorn", ("gunicorn/",)),
    ("Fleet's own code", ("fleet_common/", "fleet_api/")),
    ("json", ("json/",)),
    ("random / secrets (token generation)", ("random.py", "secrets.py")),
)


def _path(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"
    return frame.rpartition(" (")[2].rstrip(")")


def summarise_collapsed(files: Sequence[Path], top: int) -> str:
    """Where the sampled time went: each sample is charged to the innermost frame whose file
    belongs to a known library (self time by library), plus the heaviest Fleet functions by
    inclusive time."""
    buckets: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for path in files:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not count_text.isdigit():
                continue
            count = int(count_text)
            frames = stack.split(";")
            total += count
            name = "other (interpreter, stdlib)"
            for frame in reversed(frames):
                where = _path(frame)
                hit = next((b for b, keys in _BUCKETS if any(k in where for k in keys)), None)
                if hit:
                    name = hit
                    break
            buckets[name] = buckets.get(name, 0) + count
            seen = set()
            for frame in frames:
                where = _path(frame)
                if ("fleet_common/" in where or "fleet_api/" in where) and frame not in seen:
                    seen.add(frame)
                    inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        return "   (no samples)"
    lines = [f"   {total} samples; self time by library:"]
    for name, count in sorted(buckets.items(), key=lambda kv: -kv[1]):
        lines.append(f"     {100 * count / total:5.1f}%  {name}")
    lines.append("   heaviest Fleet functions (inclusive):")
    for frame, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"     {100 * count / total:5.1f}%  {_short(frame)}")
    return "\n".join(lines)


def _short(frame: str) -> str:
    function, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("fleet_common/", "fleet_api/"):
        if marker in where:
            where = where[where.index(marker) :]
    return f"{function} ({where})"


class JsonClient:
    """JSON over one keep-alive HTTP connection, reopened when the server has closed it while
    idle (gunicorn's keep-alive timeout); such a request never reached the application, so
    sending it again is safe."""

    def __init__(self, base_url: str, token: str = "") -> None:
        where = urlsplit(base_url)
        self.host, self.port = where.hostname or "127.0.0.1", where.port or 80
        self.token = token
        self.conn = HTTPConnection(self.host, self.port, timeout=120)

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        payload = json.dumps(body)
        for attempt in (1, 2):
            try:
                self.conn.request("POST", path, body=payload, headers=headers)
                reply = self.conn.getresponse()
                data = reply.read()
                return reply.status, (json.loads(data) if data else None)
            except (RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.conn.close()
                if attempt == 2:
                    raise
                self.conn = HTTPConnection(self.host, self.port, timeout=120)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


@dataclass
class Outcome:
    """What one client process reports."""

    ids: list[str]
    latencies: list[float]
    errors: list[str]
    requests: int = 0


def run_clients(
    target: Callable[..., None],
    argument_lists: Sequence[tuple[Any, ...]],
    timeout: float,
    on_start: Callable[[], Any] | None = None,
) -> tuple[list[Outcome], float]:
    """Run ``target(*args, barrier, results)`` in one spawned process per argument tuple;
    they all start at a barrier (``on_start`` runs there, e.g. to start a profiler). Returns
    their outcomes and the seconds from the start line to the last report."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(argument_lists) + 1)
    results = ctx.Queue()
    processes = [
        ctx.Process(target=target, args=(*args, barrier, results), daemon=True)
        for args in argument_lists
    ]
    for process in processes:
        process.start()
    outcomes: list[Outcome] = []
    try:
        barrier.wait(600)
        started = time.monotonic()
        if on_start is not None:
            on_start()
        while len(outcomes) < len(processes):
            remaining = started + timeout - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{len(outcomes)} of {len(processes)} clients reported")
            try:
                outcome = results.get(timeout=remaining)
            except queue.Empty:
                continue
            if outcome.errors:  # stop at once: the others may be waiting on its work
                raise RuntimeError(f"a client failed: {outcome.errors[:3]}")
            outcomes.append(outcome)
        elapsed = time.monotonic() - started
    except threading.BrokenBarrierError:
        raise RuntimeError("a client failed before the start line") from None
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return outcomes, elapsed
