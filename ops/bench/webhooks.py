#!/usr/bin/env python3
"""Webhook intake benchmark: signed Forgejo ``issues`` deliveries at a sustained rate.

Fleet's API runs as in production: ``fleet api`` (gunicorn, ``--workers`` processes of gthread
workers, the real ``fleet api`` configuration) on PostgreSQL with Redis as the broker, Forgejo
configured (a webhook secret; the write-back's syncs are queued to Redis after each commit, as in
production, though no beat consumes them here). ``--clients`` client processes of ``--threads``
threads each (one keep-alive connection per thread) send ``issues``/``opened`` deliveries built
from the constructed payload ``tests/forgejo/data/payloads/issues.opened.json`` (a distinct
issue each, signed with ``fleet_common.forgejo.signatures.sign``) on a fixed schedule (open
loop, ``--rate`` per second for ``--duration`` seconds; a late sender does not slow the
schedule). Each delivery must create exactly one task.

Reported: the achieved rate, response times (from sending a request to its answer; also from
its scheduled time, which counts the client's own lateness), and, checked in the database,
deliveries lost (no task) or duplicated (more than one). Targets: the rate sustained, p99 under
50 ms, none lost, none duplicated; each is printed as PASS or MISS (exit status 1 on a miss).

Needs PostgreSQL and Redis: ``FLEET_BENCH_PG_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``), ``FLEET_BENCH_REDIS_URL`` (default
``redis://127.0.0.1:6379``).

    .venv/bin/python ops/bench/webhooks.py [--rate 300] [--duration 20] [--clients 4]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import harness

from fleet_common.forgejo.signatures import sign

REPO_ROOT = harness.REPO
TEMPLATE = REPO_ROOT / "tests" / "forgejo" / "data" / "payloads" / "issues.opened.json"
SECRET = "bench-secret"
TRIGGER = "kind/bug"  # a label the template's issue carries
HOOK = "/api/v1/webhooks/forgejo"
P99_TARGET_MS = 50.0
WARM_UP_SECS = 2.0  # at the run's rate and layout: pools, threads and connections grown


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def _cpu(pid: int) -> tuple[int, float]:
    """(process group, CPU seconds incl. reaped children) of ``pid``; (0, 0) if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0.0
    return int(fields[2]), sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def group_cpu(pgid: int) -> float:
    """CPU seconds of the processes in group ``pgid`` (the API: gunicorn and its workers)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            group, seconds = _cpu(int(entry.name))
            total += seconds if group == pgid else 0.0
    return total


def clients_cpu() -> float:
    """CPU seconds of this process's reaped children so far (the client processes, once
    joined)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (not idle or waiting on I/O) since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


# -- services ----------------------------------------------------------------------------------


@contextlib.contextmanager
def fleet_api(
    root: Path,
    database_url: str,
    broker_url: str,
    workers: int,
    writeback: bool = True,
    threads: int | None = None,
) -> Iterator[tuple[int, int]]:
    """``fleet api`` on a free port, until the block ends; yields (port, process group)."""
    port = harness.free_port()
    config = root / "fleet.toml"
    config.write_text("", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "FLEET_CONFIG": str(config),
            "FLEET_DATABASE_URL": database_url,
            "FLEET_BROKER_URL": broker_url,
            "FLEET_ORCHESTRATOR_STATE_DIR": str(root / "state"),
            # Forgejo configured as in production; nothing listens there (no beat runs here).
            "FLEET_FORGEJO_URL": "http://127.0.0.1:9/" if writeback else "",
            "FLEET_FORGEJO_TOKEN": "bench-token",
            "FLEET_FORGEJO_WEBHOOK_SECRET": SECRET,
            "FLEET_FORGEJO_TRIGGER_LABEL": TRIGGER,
        }
    )
    argv = [sys.executable, "-m", "fleet_api.cli", "api", "--port", str(port)]
    argv += ["--workers", str(workers)]
    if threads:
        argv += ["--threads", str(threads)]
    log_path = root / "api.log"
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            argv, env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while not _healthy(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
                raise RuntimeError(f"fleet api did not start\n{tail}")
            time.sleep(0.2)
        yield port, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(40)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def _healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


# -- deliveries --------------------------------------------------------------------------------


def delivery(template: dict[str, Any], number: int) -> tuple[dict[str, str], bytes]:
    """The signed ``issues``/``opened`` delivery of issue ``number``, shaped like Forgejo's."""
    payload = json.loads(json.dumps(template))
    payload["number"] = number
    issue = payload["issue"]
    issue.update(number=number, id=1_000_000 + number, title=f"Bench issue {number}")
    for key in ("url", "html_url"):
        issue[key] = issue[key].rsplit("/", 1)[0] + f"/{number}"
    body = json.dumps(payload, indent=2).encode()
    delivery_id = str(uuid.uuid4())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Go-http-client/1.1",
        "X-Forgejo-Delivery": delivery_id,
        "X-Forgejo-Event": "issues",
        "X-Forgejo-Event-Type": "issues",
        "X-Gitea-Delivery": delivery_id,
        "X-Gitea-Event": "issues",
        "X-Gitea-Event-Type": "issues",
        **sign(body, SECRET),
    }
    return headers, body


Result = tuple[int, float, float, float, int, int]  # number, scheduled, sent, answered, status, n


class Cpu(NamedTuple):
    """CPU seconds spent during the measured run."""

    api: float  # gunicorn and its workers
    postgres: float  # the backends connected to the benchmark's database
    clients: float  # the client processes sending the deliveries
    machine: float  # everything on the machine (other work included)
    wall: float  # the window these were measured over


def request_bytes(port: int, headers: dict[str, str], body: bytes) -> bytes:
    """The whole HTTP/1.1 request of a delivery, as http.client would send it."""
    lines = [f"POST {HOOK} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Accept-Encoding: identity"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class BadResponse(Exception):
    """An answer this client cannot read (it then reconnects)."""


class Wire:
    """One keep-alive connection that sends prepared requests and reads their answers.

    The clients share the machine with the API, so they do as little as they can per delivery:
    the request's bytes are built before the timed phase, and the answer is read with a few
    socket calls (status line, ``Content-Length``, body) rather than http.client's header
    building and email-parser header parsing. gunicorn answers with a ``Content-Length``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.pending = b""  # bytes read past the previous answer (none expected)

    def exchange(self, request: bytes) -> tuple[int, bytes]:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(request)
        data = self.pending
        while (end := data.find(b"\r\n\r\n")) < 0:
            data += self._recv()
        head, data = data[:end].decode("latin-1"), data[end + 4 :]
        lines = head.split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = dict(line.lower().split(":", 1) for line in lines[1:])
        if "content-length" not in fields:
            raise BadResponse(f"no Content-Length in {head!r}")
        length = int(fields["content-length"])
        while len(data) < length:
            data += self._recv()
        body, self.pending = data[:length], data[length:]
        if fields.get("connection", "").strip() == "close":
            self.close()
        return status, body

    def _recv(self) -> bytes:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            raise BadResponse("connection closed")
        return chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.pending = None, b""


def client_process(
    port: int, numbers: list[int], first: int, start: float, rate: float, threads: int, out: Any
) -> None:
    """Send the deliveries of ``numbers`` on the shared schedule: issue ``first`` at ``start``,
    each next one ``1/rate`` later."""
    template = json.loads(TEMPLATE.read_text())
    prepared = {n: request_bytes(port, *delivery(template, n)) for n in numbers}
    results: list[Result] = []
    lock = threading.Lock()

    def sender(mine: list[int]) -> None:
        wire = Wire(port)
        for number in mine:
            scheduled = start + (number - first) / rate
            delay = scheduled - time.time()
            if delay > 0:
                time.sleep(delay)
            sent = time.time()
            try:
                status, reply = wire.exchange(prepared[number])
            except (OSError, ValueError, BadResponse):
                wire.close()
                status, reply = 0, b""
            answered = time.time()
            created = 0
            if status == 202:
                created = len(json.loads(reply).get("task_ids") or [])
            with lock:
                results.append((number, scheduled, sent, answered, status, created))
        wire.close()

    workers = [threading.Thread(target=sender, args=(numbers[i::threads],)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out.put(results)


def send_all(
    port: int, first: int, count: int, rate: float, clients: int, threads: int
) -> list[Result]:
    """Issues ``first .. first+count-1`` at ``rate``/s from ``clients`` processes."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start = time.time() + 3.0  # every process ready and every payload signed by then
    last = first + count
    procs = [
        context.Process(
            target=client_process,
            args=(port, list(range(first + k, last, clients)), first, start, rate, threads, out),
        )
        for k in range(clients)
    ]
    for proc in procs:
        proc.start()
    results: list[Result] = []
    for _ in procs:
        results += out.get(timeout=count / rate + 300)
    for proc in procs:
        proc.join(30)
    return results


# -- checks ------------------------------------------------------------------------------------


def tasks_per_issue(database_url: str) -> dict[int, int]:
    import psycopg

    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT issue_number, count(*) FROM tasks WHERE repo = 'alice/widgets' "
            "GROUP BY issue_number"
        ).fetchall()
    return {int(number): int(n) for number, n in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=300.0, help="deliveries per second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--threads", type=int, default=6, help="connections per client")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument(
        "--api-threads", type=int, help="threads per gunicorn worker (default: fleet api's)"
    )
    parser.add_argument(
        "--no-writeback",
        action="store_true",
        help="no [forgejo] url: intake only, no write-back syncs queued (to compare)",
    )
    parser.add_argument(
        "--timeline",
        type=Path,
        help="write every delivery's (number, scheduled, sent, answered, status) as JSON lines",
    )
    args = parser.parse_args()
    count = int(args.rate * args.duration)
    with (
        tempfile.TemporaryDirectory(prefix="fleet-bench-webhooks-") as tmp,
        harness.scratch_postgres() as database_url,
        harness.scratch_redis() as broker_url,
        fleet_api(
            Path(tmp),
            database_url,
            broker_url,
            args.workers,
            not args.no_writeback,
            args.api_threads,
        ) as (
            port,
            pgid,
        ),
    ):
        warm_up = int(args.rate * WARM_UP_SECS)
        log(f"fleet api on :{port} ({args.workers} workers); warming up ({warm_up} deliveries)")
        send_all(port, 1, warm_up, args.rate, args.clients, args.threads)
        log(f"sending {count} deliveries at {args.rate:g}/s from {args.clients}x{args.threads}")
        before = (
            group_cpu(pgid),
            harness.backends_cpu(database_url),
            clients_cpu(),
            machine_busy(),
            time.monotonic(),
        )
        results = send_all(port, warm_up + 1, count, args.rate, args.clients, args.threads)
        time.sleep(1.0)
        after = (
            group_cpu(pgid),
            harness.backends_cpu(database_url),
            clients_cpu(),
            machine_busy(),
            time.monotonic(),
        )
        cpu = Cpu(*(b - a for a, b in zip(before, after, strict=True)))
        counts = tasks_per_issue(database_url)
    if args.timeline:
        with args.timeline.open("w") as out:
            for result in sorted(results, key=lambda r: r[2]):
                out.write(json.dumps(result[:5]) + "\n")
    return report(args, results, counts, cpu)


def report(
    args: argparse.Namespace,
    results: list[Result],
    counts: dict[int, int],
    cpu: Cpu,
) -> int:
    sent = sorted(results)
    numbers = [r[0] for r in sent]
    first_sent = min(r[2] for r in sent)
    last_answer = max(r[3] for r in sent)
    elapsed = last_answer - first_sent
    achieved = len(sent) / elapsed
    response_ms = [(r[3] - r[2]) * 1000 for r in sent]
    from_schedule_ms = [(r[3] - r[1]) * 1000 for r in sent]
    late_ms = [max(0.0, (r[2] - r[1]) * 1000) for r in sent]
    not_202 = sum(1 for r in sent if r[4] != 202)
    lost = [n for n in numbers if counts.get(n, 0) == 0]
    duplicated = [n for n in numbers if counts.get(n, 0) > 1]
    print()
    print("Fleet webhook intake benchmark")
    print(
        f"  {len(sent)} signed issues/opened deliveries, target {args.rate:g}/s for "
        f"{args.duration:g} s, {args.clients} client processes x {args.threads} connections, "
        f"gunicorn {args.workers} workers, PostgreSQL + Redis, {os.cpu_count()} CPUs, "
        f"write-back {'off' if args.no_writeback else 'on'}"
    )
    print(f"  achieved rate: {achieved:.1f} deliveries/s over {elapsed:.1f} s")
    print(
        f"  response time (send -> answer): p50 {statistics.median(response_ms):.1f} ms, "
        f"p90 {pct(response_ms, 90):.1f} ms, p99 {pct(response_ms, 99):.1f} ms, "
        f"max {max(response_ms):.1f} ms"
    )
    print(
        f"  from the scheduled send time: p50 {statistics.median(from_schedule_ms):.1f} ms, "
        f"p99 {pct(from_schedule_ms, 99):.1f} ms (client lateness p99 {pct(late_ms, 99):.1f} ms)"
    )
    print(f"  answers other than 202: {not_202}")
    api_ms, pg_ms, clients_ms, machine_ms = (s / len(sent) * 1000 for s in cpu[:4])
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    ceiling = cpus * 1000 / max(api_ms + pg_ms, 1e-6)
    print(
        f"  CPU per delivery: API {api_ms:.1f} ms + PostgreSQL backends {pg_ms:.1f} ms; "
        f"{cpus} CPUs carry at most ~{ceiling:.0f}/s of that (load average now {load:.1f})"
    )
    other_ms = machine_ms - api_ms - pg_ms - clients_ms
    print(
        f"  the rest of the machine per delivery: clients {clients_ms:.1f} ms, other work "
        f"{max(other_ms, 0.0):.1f} ms (the clients include preparing and signing the payloads); "
        f"machine busy {cpu.machine / cpu.wall / cpus * 100:.0f}% of {cpus} CPUs over the run"
    )
    print(f"  tasks: lost {len(lost)}, duplicated {len(duplicated)} (checked in the database)")
    checks = [
        (f"rate >= {args.rate * 0.98:g}/s", achieved >= args.rate * 0.98),
        (f"p99 < {P99_TARGET_MS:g} ms", pct(response_ms, 99) < P99_TARGET_MS),
        ("none lost", not lost and not_202 == 0),
        ("none duplicated", not duplicated),
    ]
    for name, ok in checks:
        print(f"  {'PASS' if ok else 'MISS'}  {name}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
