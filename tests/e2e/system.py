"""A Fleet system made of real processes, for the end-to-end tests.

:class:`System` is one deployment: a migrated database, a broker, a TOML config file in a temp
folder (hosts and agent types), the API as a real HTTP server (Werkzeug's threaded server
running ``create_app(settings)`` in a thread of the test process, with the Celery publisher for
the configured broker) and, on request, ``fleet worker --host H`` and ``fleet beat`` as
subprocesses (``python -m fleet_api.cli ...`` with ``FLEET_*`` variables and ``FLEET_CONFIG``).

Every wait is a bounded poll on a condition; a failed wait shows the processes' logs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from fleet_common.auth import service as auth
from fleet_common.auth.models import TokenKind
from fleet_common.db import Database
from fleet_common.migrate import upgrade
from fleet_common.settings import Settings, load_settings

AGENT_SCRIPT = Path(__file__).with_name("agent_script.py")
#: Starting a Python process that imports Celery, Flask and SQLAlchemy takes seconds on a busy
#: 2-core machine; these bounds are ceilings, not expectations.
READY_TIMEOUT = 90.0
STOP_TIMEOUT = 60.0
HTTP_TIMEOUT = 30.0


def fleet_argv(*args: str) -> list[str]:
    """``fleet ARGS`` as this interpreter runs it."""
    return [sys.executable, "-m", "fleet_api.cli", *args]


def clean_environ() -> dict[str, str]:
    """This process's environment without any ``FLEET_*`` variable."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}


# -- processes ---------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            stat = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _parents() -> dict[int, int]:
    table: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with (
            suppress(OSError, IndexError, ValueError),
            open(f"/proc/{entry}/stat", encoding="utf-8") as fh,
        ):
            table[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
    return table


def ancestors(pid: int) -> list[tuple[int, str]]:
    """``(pid, command name)`` of ``pid``'s parent, grandparent, ... up to init."""
    chain = []
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
                stat = fh.read()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        with suppress(OSError), open(f"/proc/{pid}/comm", encoding="utf-8") as fh:
            chain.append((pid, fh.read().strip()))
    return chain


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, grandchildren, ...)."""
    parents = _parents()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return {p for p in found if alive(p)}


class Proc:
    """A subprocess in a process group of its own, its output in a log file."""

    def __init__(
        self, name: str, argv: list[str], env: Mapping[str, str], cwd: Path, log_path: Path
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.stopping = False  # set once the test signals it: its exit is then expected

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        text = self.log().splitlines()[-lines:]
        state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        return f"--- {self.name} (pid {self.pid}, {state}) ---\n" + "\n".join(text)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_for_log(self, marker: str, timeout: float = READY_TIMEOUT) -> None:
        """Wait until ``marker`` appears in the log; fail if the process exits first."""
        deadline = time.monotonic() + timeout
        while marker not in self.log():
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited before {marker!r}\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout}s waiting for {marker!r}\n{self.tail()}")
            time.sleep(0.1)

    def signal(self, sig: int) -> None:
        self.stopping = True
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL to this process alone (not its group), as a crash would."""
        self.signal(signal.SIGKILL)
        self.proc.wait(30)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """The exit code; fails the test if the process does not exit within ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} did not exit within {timeout}s\n{self.tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, wait, then SIGKILL whatever is left of its process group."""
        self.signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        self.cleanup()

    def cleanup(self) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(10)
        self._log.close()


# -- configuration -----------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """A TOML value for a bool, int, string, list or (inline) table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        pairs = (f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(pairs) + " }"
    raise TypeError(f"no TOML for {value!r}")


def write_config(
    path: Path,
    *,
    hosts: Iterable[Mapping[str, Any]],
    agent_types: Mapping[str, Mapping[str, Any]],
) -> Path:
    """A Fleet TOML file with these ``[agent_types.*]`` and ``[[hosts]]``."""
    lines: list[str] = []
    for name, table in agent_types.items():
        lines.append(f"[agent_types.{json.dumps(name)}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
        lines.append("")
    for host in hosts:
        lines.append("[[hosts]]")
        lines += [f"{key} = {toml_value(value)}" for key, value in host.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def script_agent(**env: str | float) -> dict[str, Any]:
    """An agent type running ``agent_script.py`` (the demo agent with a visible pid)."""
    return {
        "command": [sys.executable, str(AGENT_SCRIPT), "{prompt_file}"],
        "env": {key: str(value) for key, value in env.items()},
    }


def local_host(host_id: str, root: Path, *agents: Mapping[str, Any], **extra: Any) -> dict:
    """A ``transport = "local"`` host with a work dir of its own under ``root``."""
    return {
        "host_id": host_id,
        "transport": "local",
        "work_dir": str(root / "work" / host_id),
        **extra,
        "agents": [dict(agent) for agent in agents],
    }


@dataclass(frozen=True)
class Backend:
    """Where a system keeps its state: a database URL and a broker URL."""

    name: str
    database_url: str
    broker_url: str


# -- the system --------------------------------------------------------------------------------


class System:
    """One Fleet deployment of real processes (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        backend: Backend,
        *,
        hosts: Iterable[Mapping[str, Any]],
        agent_types: Mapping[str, Mapping[str, Any]],
        orchestrator: Mapping[str, Any] | None = None,
    ) -> None:
        self.root = root
        self.backend = backend
        self.state_dir = root / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config = write_config(root / "fleet.toml", hosts=hosts, agent_types=agent_types)
        self.env = {
            "FLEET_CONFIG": str(self.config),
            "FLEET_DATABASE_URL": backend.database_url,
            "FLEET_BROKER_URL": backend.broker_url,
            "FLEET_ORCHESTRATOR_STATE_DIR": str(self.state_dir),
            **{f"FLEET_ORCHESTRATOR_{k.upper()}": str(v) for k, v in (orchestrator or {}).items()},
        }
        self.processes: list[Proc] = []
        self._server: Any = None
        self._publisher: Any = None
        upgrade(backend.database_url)
        self.settings: Settings = load_settings(env=self.env)
        self.db = Database(self.settings.database_url, pool_size=2)
        with self.db.session() as session:
            _, self.admin_token = auth.mint(session, TokenKind.ADMIN, actor="e2e", name="e2e")
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {self.admin_token}"
        self._start_api()

    # -- processes -----------------------------------------------------------------------------

    def _start_api(self) -> None:
        from fleet_api.app import create_app

        app = create_app(self.settings)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        publish = app.extensions["fleet"].publish
        self._publisher = getattr(publish, "__self__", None)
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, name="e2e-api", daemon=True).start()

    def spawn(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> Proc:
        """Start ``fleet ARGS`` with this system's environment."""
        number = sum(1 for p in self.processes if p.name.startswith(name))
        log_path = self.root / f"{name}{'-' + str(number) if number else ''}.log"
        full_env = {**clean_environ(), **self.env, **(env or {})}
        proc = Proc(name, fleet_argv(*args), full_env, self.root, log_path)
        self.processes.append(proc)
        return proc

    def start_worker(self, host_id: str, *, ready: bool = True) -> Proc:
        """``fleet worker --host HOST_ID``; waits until Celery reports it ready."""
        proc = self.spawn(f"worker-{host_id}", "worker", "--host", host_id)
        if ready:
            proc.wait_for_log(" ready.")
        return proc

    def start_beat(self, *, ready: bool = True) -> Proc:
        """``fleet beat``; waits until its Celery worker reports ready."""
        proc = self.spawn("beat", "beat")
        if ready:
            proc.wait_for_log(" ready.")
        return proc

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.processes)

    def close(self) -> None:
        # SIGKILL: the tests that are about stopping stop their processes themselves, and a
        # warm shutdown costs seconds per process (agents die with their worker anyway).
        for proc in self.processes:
            proc.cleanup()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._publisher is not None:
            self._publisher.close()
        self.http.close()
        self.db.dispose()

    # -- the API -------------------------------------------------------------------------------

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.http.request(method, f"{self.url}/api/v1{path}", timeout=HTTP_TIMEOUT, **kwargs)

    def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        reply = self.call(method, path, **kwargs)
        assert reply.status_code < 400, (method, path, reply.status_code, reply.text)
        return reply.json()

    def submit(self, title: str = "e2e task", **fields: Any) -> dict[str, Any]:
        reply = self.call("POST", "/tasks", json={"title": title, **fields})
        assert reply.status_code == 201, reply.text
        return dict(reply.json())

    def task(self, task_id: str) -> dict[str, Any]:
        return dict(self.ok("GET", f"/tasks/{task_id}"))

    def events(self, task_id: str) -> list[dict[str, Any]]:
        return list(self.ok("GET", f"/tasks/{task_id}/events"))

    def log(self, task_id: str) -> str:
        """The whole stored log of a task."""
        text, offset = "", 0
        while True:
            part = self.ok("GET", f"/tasks/{task_id}/logs", params={"offset": offset})
            text += part["data"]
            if part["next_offset"] == offset or not part["data"]:
                return text
            offset = part["next_offset"]

    def cancel(self, task_id: str) -> dict[str, Any]:
        return dict(self.ok("POST", f"/tasks/{task_id}/cancel"))

    def agents(self) -> list[dict[str, Any]]:
        return list(self.ok("GET", "/agents", params={"page_size": 500}))

    # -- waiting -------------------------------------------------------------------------------

    def wait_for(
        self, condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.1
    ) -> Any:
        """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            died = [p.name for p in self.processes if not p.stopping and not p.running()]
            if died:
                pytest.fail(f"{', '.join(died)} exited while waiting for {what}\n{self.logs()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")
            time.sleep(interval)

    def wait_status(
        self, task_id: str, *statuses: str, timeout: float, what: str = ""
    ) -> dict[str, Any]:
        """The task, once its status is one of ``statuses``."""

        def reached() -> dict[str, Any] | None:
            task = self.task(task_id)
            return task if task["status"] in statuses else None

        return dict(
            self.wait_for(
                reached, timeout=timeout, what=what or f"task {task_id} to be {'/'.join(statuses)}"
            )
        )

    def wait_log(self, task_id: str, marker: str, *, timeout: float) -> str:
        """The task's log, once it contains ``marker``."""
        return str(
            self.wait_for(
                lambda: (text := self.log(task_id)) and marker in text and text,
                timeout=timeout,
                what=f"{marker!r} in the log of {task_id}",
                interval=0.2,
            )
        )


def log_value(log: str, key: str) -> int:
    """The integer printed as ``key=N`` in a log (agent_script.py prints its pids so)."""
    for word in log.split():
        if word.startswith(f"{key}="):
            return int(word.split("=", 1)[1])
    raise AssertionError(f"{key}= not in the log:\n{log}")


def agent_pids(log: str) -> list[int]:
    """The agent's pid and, when it started one, its child's."""
    pids = [log_value(log, "e2e-pid"), log_value(log, "e2e-child")]
    return [pid for pid in pids if pid]
