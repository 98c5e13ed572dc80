"""Real processes for the pull daemon's tests.

- :class:`ApiServer`: ``create_app(settings)`` on Werkzeug's threaded server in a thread, on a
  port that survives a stop and a restart (for "the server is down" scenarios).
- :class:`Sweeper`: what ``fleet beat`` does, in a thread: lost agents, expired leases,
  timeouts and the relay, every half second.
- :class:`DaemonProcess`: ``python -m fleet_api.cli agent run ...`` in a process group of its
  own, its output in a log file the failures print.
- :class:`WorkerProcess`: ``python -m fleet_api.cli worker --host ...`` (a Celery worker).
- The probe agent's records (``probe_agent.py``): when each attempt started and ended, and in
  which process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from werkzeug.serving import BaseWSGIServer, make_server

from fleet_common import sweeps
from fleet_common.db import Database, utcnow
from fleet_common.settings import Settings

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("probe_agent.py")

log = logging.getLogger(__name__)

#: Short server intervals: heartbeats every second, leases of 5 s, retries after 1 s.
FAST = {
    "heartbeat_interval_secs": 1,
    "heartbeat_timeout_threshold": 5,
    "lease_secs": 5,
    "retry_backoff_base_secs": 1,
    "retry_backoff_max_secs": 2,
    "relay_after_secs": 2,
}


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any FLEET_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# -- the API -----------------------------------------------------------------------------------


class Api:
    """The admin's HTTP calls against a running server."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self.http = requests.Session()

    def call(
        self, method: str, path: str, *, expect: int | None = None, **kwargs: Any
    ) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        reply = self.http.request(
            method, f"{self.url}/api/v1{path}", headers=headers, timeout=30, **kwargs
        )
        if expect is not None:
            assert reply.status_code == expect, (method, path, reply.status_code, reply.text)
        return reply

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, expect=200, params=params).json()

    def post(self, path: str, body: dict[str, Any] | None = None, *, expect: int = 200) -> Any:
        return self.call("POST", path, expect=expect, json=body or {}).json()

    def submit(self, prompt: dict[str, Any] | str = "", **fields: Any) -> str:
        """Queue a task; a dict prompt is the probe agent's JSON instructions."""
        text = json.dumps(prompt) if isinstance(prompt, dict) else prompt
        body = {"title": "pull agent test", "prompt": text, "max_retries": 2, **fields}
        return str(self.post("/tasks", body, expect=201)["id"])

    def task(self, task_id: str) -> dict[str, Any]:
        return dict(self.get(f"/tasks/{task_id}"))

    def status(self, task_id: str) -> str:
        return str(self.task(task_id)["status"])

    def events(self, task_id: str) -> list[dict[str, Any]]:
        return list(self.get(f"/tasks/{task_id}/events"))

    def log_text(self, task_id: str) -> str:
        return str(self.get(f"/tasks/{task_id}/logs")["data"])

    def agent(self, agent_id: str) -> dict[str, Any]:
        return dict(self.get(f"/agents/{agent_id}"))

    def agents(self, **filters: Any) -> list[dict[str, Any]]:
        return list(self.get("/agents", **filters))

    def join_token(self) -> tuple[str, str]:
        """Mint a join token: ``(id, secret)``."""
        minted = self.post("/join-tokens", {}, expect=201)
        return str(minted["id"]), str(minted["token"])

    def command(self, agent_id: str, kind: str, **payload: Any) -> str:
        body = {"kind": kind, "payload": payload}
        return str(self.post(f"/agents/{agent_id}/commands", body, expect=201)["id"])

    def command_row(self, agent_id: str, command_id: str) -> dict[str, Any]:
        rows = self.get(f"/agents/{agent_id}/commands", page_size=500)
        return next(dict(row) for row in rows if row["id"] == command_id)

    def all_done(self, task_ids: list[str], status: str = "completed") -> bool:
        return all(self.status(task_id) == status for task_id in task_ids)


class ApiServer:
    """``app`` on Werkzeug's threaded server; stop and start again keep the port."""

    def __init__(self, app: Any, port: int = 0) -> None:
        self.app = app
        self.port = port
        self._http: BaseWSGIServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiServer:
        self._http = make_server("127.0.0.1", self.port, self.app, threaded=True)
        self.port = self._http.server_port
        thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        thread.start()
        return self

    def stop(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            http.shutdown()
            http.server_close()


class Sweeper:
    """The beat sweeps a pull daemon relies on, run every ``interval`` seconds in a thread."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        publish: Callable[[list[sweeps.Publish]], None] | None = None,
        interval: float = 0.5,
    ) -> None:
        self.db = db
        self.settings = settings
        self.publish = publish
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        orch = self.settings.orchestrator
        while not self._stop.wait(self.interval):
            try:
                for sweep in (sweeps.offline_agents, sweeps.expired_leases, sweeps.timed_out):
                    with self.db.session() as session:
                        sweep(session, orch, utcnow())
                if self.publish is not None:
                    with self.db.session() as session:
                        due = sweeps.due_for_publish(session, orch, utcnow())
                    self.publish(due)
            except Exception:  # a sweep that fails is retried next round, as beat would
                log.warning("sweep failed", exc_info=True)


# -- processes ---------------------------------------------------------------------------------


class _Process:
    """A subprocess in its own process group, its output in ``log_path``."""

    proc: subprocess.Popen[bytes]

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path

    def _spawn(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 40) -> str:
        text = "\n".join(self.log().splitlines()[-lines:])
        return f"--- {self.log_path.name} (pid {self.proc.pid}, rc {self.proc.poll()}) ---\n{text}"

    def signal(self, signum: int) -> None:
        if self.alive:
            self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the process group (what is left of it) and reap the process."""
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


class DaemonProcess(_Process):
    """``fleet agent run`` as its users start it."""

    def __init__(
        self,
        root: Path,
        server: str,
        name: str,
        *,
        config: Path,
        join_token: str | None = None,
        capabilities: tuple[str, ...] = (),
        agent_type: str = "probe",
        max_concurrency: int = 1,
    ) -> None:
        self.name = name
        self.state_dir = root / "agents" / name
        self._runs = len(list(root.glob(f"daemon-{name}-*.log")))
        super().__init__(root / f"daemon-{name}-{self._runs}.log")
        argv = [sys.executable, "-m", "fleet_api.cli", "--server", server, "agent", "run"]
        argv += ["--name", name, "--capabilities", ",".join(capabilities)]
        argv += ["--agent-type", agent_type, "--max-concurrency", str(max_concurrency)]
        argv += ["--state-dir", str(self.state_dir)]
        if join_token is not None:
            argv += ["--join-token", join_token]
        self._spawn(argv, clean_env(FLEET_CONFIG=str(config)), root)

    def state(self) -> dict[str, Any]:
        path = self.state_dir / "agent.json"
        return dict(json.loads(path.read_text())) if path.exists() else {}

    @property
    def agent_id(self) -> str:
        return str(self.state().get("agent_id", ""))


class WorkerProcess(_Process):
    """``fleet worker --host HOST`` (a Celery worker) with ``env`` as its FLEET_* settings."""

    def __init__(self, root: Path, host_id: str, env: dict[str, str]) -> None:
        super().__init__(root / f"worker-{host_id}.log")
        argv = [sys.executable, "-m", "fleet_api.cli", "worker", "--host", host_id]
        self._spawn(argv, clean_env(**env), root)

    def stop(self, timeout: float = 20) -> None:
        self.signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        self.kill()


# -- configuration and the probe's records -----------------------------------------------------


#: The probe type's upgrade command: takes 6 s (longer than an agent may stay silent), prints,
#: and leaves ``upgraded-<version>`` in the probe directory.
UPGRADE = (
    "import pathlib,sys,time; time.sleep(6); print('upgraded to', sys.argv[2]);"
    " pathlib.Path(sys.argv[1], 'upgraded-' + sys.argv[2]).touch()"
)


def write_config(path: Path, probe_dir: Path, *, extra: str = "") -> Path:
    """The agent types the daemons use: ``probe`` (the probe agent; its upgrade command is
    :data:`UPGRADE`) and ``slowdemo`` (the built-in demo agent, thinking for 3 s)."""
    probe_dir.mkdir(parents=True, exist_ok=True)
    upgrade = json.dumps([sys.executable, "-c", UPGRADE, str(probe_dir), "{version}"])
    path.write_text(
        f"""
[agent_types.probe]
command = [{json.dumps(sys.executable)}, {json.dumps(str(PROBE))}, "{{prompt_file}}"]
env = {{ PROBE_DIR = {json.dumps(str(probe_dir))} }}
upgrade_command = {upgrade}

[agent_types.slowdemo]
command = ["{{python}}", "-m", "fleet_worker.demo_agent", "{{prompt_file}}"]
env = {{ FLEET_DEMO_SLEEP = "3" }}
{extra}
"""
    )
    return path


@dataclass
class Run:
    """One attempt as the probe agent saw it."""

    task_id: str
    pid: int
    ppid: int
    start: float
    end: float | None


def probe_runs(probe_dir: Path) -> list[Run]:
    runs: list[Run] = []
    for path in sorted(probe_dir.glob("*.jsonl")):
        open_runs: dict[int, Run] = {}
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if record["event"] == "start":
                run = Run(path.stem, record["pid"], record["ppid"], record["at"], None)
                open_runs[run.pid] = run
                runs.append(run)
            elif record["pid"] in open_runs:
                open_runs[record["pid"]].end = record["at"]
    return runs


def max_overlap(runs: list[Run]) -> int:
    """The largest number of runs that were going on at one instant."""
    edges = [(r.start, 1) for r in runs]
    edges += [(r.end if r.end is not None else float("inf"), -1) for r in runs]
    most = current = 0
    for _, delta in sorted(edges, key=lambda e: (e[0], e[1])):  # ends before starts at a tie
        current += delta
        most = max(most, current)
    return most


def process_gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its parent counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in {"Z", "X"}
