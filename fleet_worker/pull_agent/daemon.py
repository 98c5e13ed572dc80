"""The pull agent daemon: one registration, a heartbeat thread, a dequeue loop (long-poll, up to
``max_concurrency`` attempts at once) and a thread per running attempt.

Signals: the first SIGTERM (or SIGINT) drains — take nothing new, let running attempts finish,
deregister, exit 0; a second one stops running attempts and reports them lost so the server
retries them elsewhere. If the daemon dies, nothing is lost: its leases expire.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet_common.settings import AgentTypeSettings, HostSettings, Settings
from fleet_worker.executors import make_executor
from fleet_worker.executors.base import Executor
from fleet_worker.pull_agent import state as agent_state
from fleet_worker.pull_agent.client import AgentClient, ApiError, Unreachable, backoff
from fleet_worker.pull_agent.runner import PullAttempt

log = logging.getLogger("fleet.agent")

VERSION = "fleet-agent 0.1"
#: How long one dequeue long-poll waits on the server. A SIGTERM cannot cut a poll short (the
#: server may claim a task for it at any moment, and a task claimed must be run), so this bounds
#: how long an idle daemon takes to stop, and how late a draining one may still be handed a task.
#: The server polls its database every 0.25 s either way; shorter polls cost only requests.
DEQUEUE_WAIT_SECS = 5


class RegistrationError(Exception):
    """The daemon has no usable token and could not register; ``status`` is the API's answer
    (None when there was nothing to register with)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class DaemonConfig:
    server: str
    name: str
    capabilities: list[str]
    agent_type: AgentTypeSettings
    state_dir: Path
    settings: Settings
    max_concurrency: int = 1
    join_token: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class Daemon:
    def __init__(self, config: DaemonConfig, executor: Executor | None = None) -> None:
        self.config = config
        self.host = HostSettings(
            host_id=config.name,
            transport="local",
            work_dir=str((config.state_dir / "work").resolve()),
        )
        self.executor = executor or make_executor(self.host)
        self.client = AgentClient(config.server)
        self.running: dict[str, PullAttempt] = {}
        self.desired_state = "active"
        self.heartbeat_interval = 10.0
        self.draining = False  # local drain: SIGTERM
        self.restart_after_work = False
        self.exit_code = 0
        # command id -> the result it completes with, once the daemon is idle
        self._pending_commands: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._signals = 0

    # -- registration -------------------------------------------------------------------

    def connect(self) -> None:
        """Reuse the saved token, or register with the join token (which a failed
        registration does not use up)."""
        saved = agent_state.load(self.config.state_dir)
        if saved.agent_token and saved.server == self.config.server:
            self.client.token = saved.agent_token
            try:
                # A server that is down (or restarting) is waited for, however long.
                self._heartbeat(retry_for=math.inf)
                log.info("resumed as agent %s", saved.agent_id)
                return
            except ApiError as error:
                if error.status != 401:
                    raise
                log.warning("saved agent token refused; registering again")
        if not self.config.join_token:
            raise RegistrationError("no saved agent token and no --join-token to register with")
        body = {
            "join_token": self.config.join_token,
            "name": self.config.name,
            "host_uid": saved.host_uid,
            "capabilities": self.config.capabilities,
            "max_concurrency": self.config.max_concurrency,
            "hostname": socket.gethostname(),
            "platform": f"{platform.system()}-{platform.machine()}",
            "version": VERSION,
            "agent_type": self.config.agent_type.name,
            "metadata": self.config.metadata,
        }
        self.client.token = ""
        try:
            reply = self.client.call("agents/register", body, retry_for=math.inf) or {}
        except ApiError as error:
            raise RegistrationError(f"registration refused: {error}", error.status) from error
        saved.server, saved.agent_id = self.config.server, reply["agent"]["id"]
        saved.agent_token = reply["agent_token"]
        agent_state.save(self.config.state_dir, saved)
        self.client.token = saved.agent_token
        self.heartbeat_interval = float(reply.get("heartbeat_interval_secs", 10))
        log.info("registered as agent %s", saved.agent_id)

    # -- the loops ----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until drained or stopped; returns the exit code."""
        self.connect()
        self._install_signals()
        self._beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._beat.start()
        errors = 0
        while not self._stop.is_set():
            if self._idle_exit_due():
                break
            if not self._may_take_more():
                self._stop.wait(0.2)
                continue
            try:
                reply = self.client.call(
                    "tasks/dequeue",
                    {"wait_secs": DEQUEUE_WAIT_SECS},
                    wait=DEQUEUE_WAIT_SECS,
                    retry_for=0,
                    should_stop=self._stop.is_set,
                )
                errors = 0
            except (Unreachable, ApiError) as error:
                if isinstance(error, ApiError) and error.status == 401:
                    log.error("agent token refused: %s", error)
                    self.exit_code = 4
                    break
                asked = error.retry_after if isinstance(error, Unreachable) else 0.0
                self._stop.wait(max(backoff(errors), asked))
                errors += 1
                continue
            if reply is not None:
                self._start(reply)
        self._finish()
        return self.exit_code

    def _may_take_more(self) -> bool:
        with self._lock:
            busy = len(self.running)
        return (
            not self.draining
            and not self.restart_after_work
            and self.desired_state == "active"
            and busy < self.config.max_concurrency
        )

    def _idle_exit_due(self) -> bool:
        with self._lock:
            idle = not self.running
        return idle and (self.draining or self.restart_after_work)

    def _start(self, reply: dict[str, Any]) -> None:
        task, lease = reply["task"], reply["lease"]
        attempt = PullAttempt(
            self.client,
            self.config,
            self.host,
            self.executor,
            task,
            lease["token"],
            on_done=self._done,
        )
        with self._lock:
            self.running[task["id"]] = attempt
        threading.Thread(target=attempt.run, name=f"task-{task['id']}", daemon=True).start()

    def _done(self, task_id: str) -> None:
        with self._lock:
            self.running.pop(task_id, None)
            idle = not self.running
        if idle:
            self._complete_waiting_commands()

    def _heartbeat_loop(self) -> None:
        failures = 0
        while not self._stop.wait(self.heartbeat_interval if failures == 0 else backoff(failures)):
            try:
                self._heartbeat()
                failures = 0
            except ApiError as error:
                log.warning("heartbeat refused: %s", error)
                failures += 1
            except Unreachable as error:
                log.warning("heartbeat failed: %s", error)
                failures += 1

    def _heartbeat(self, retry_for: float = 5) -> None:
        with self._lock:
            leases = [
                {"task_id": tid, "lease_token": a.lease_token} for tid, a in self.running.items()
            ]
        reply = (
            self.client.call(
                "agents/heartbeat",
                {"leases": leases},
                retry_for=retry_for,
                should_stop=self._stop.is_set,
            )
            or {}
        )
        self.desired_state = reply.get("desired_state", self.desired_state)
        self.heartbeat_interval = float(
            reply.get("heartbeat_interval_secs", self.heartbeat_interval)
        )
        for task_id in reply.get("cancelled_task_ids", []) + reply.get("stale_task_ids", []):
            self._cancel(task_id)
        for command in reply.get("commands", []):
            self._obey(command)

    # -- commands -----------------------------------------------------------------------

    def _obey(self, command: dict[str, Any]) -> None:
        cid, kind, payload = command["id"], command["kind"], command.get("payload") or {}
        try:
            self.client.call(f"agents/commands/{cid}/ack", {}, retry_for=5)
        except (ApiError, Unreachable) as error:
            log.warning("ack of %s failed: %s", cid, error)
            return
        if kind == "cancel_task":
            self._cancel(str(payload.get("task_id")))
            self._complete_command(cid, True, {"cancelled": str(payload.get("task_id"))})
        elif kind == "resume":
            self.desired_state = "active"
            self._complete_command(cid, True, {"state": "active"})
        elif kind == "drain":
            self.desired_state = "draining"
            self._wait_idle(cid, {"drained": True})
        elif kind == "restart":
            self.restart_after_work = True
            self._wait_idle(cid, {"restarting": True})
        elif kind == "upgrade":
            # Not on this (the heartbeat) thread: an upgrade may take minutes, and an agent
            # silent that long is declared lost, with the tasks it is running.
            version = str(payload.get("version", ""))
            threading.Thread(
                target=self._upgrade_then_restart, args=(cid, version), name="upgrade", daemon=True
            ).start()

    def _upgrade_then_restart(self, cid: str, version: str) -> None:
        ok, result = self._upgrade(version)
        if not ok:
            self._complete_command(cid, False, result)
            return
        self.restart_after_work = True
        self._wait_idle(cid, {**result, "restarting": True})

    def _wait_idle(self, cid: str, result: dict[str, Any]) -> None:
        with self._lock:
            self._pending_commands[cid] = result
            idle = not self.running
        if idle:
            self._complete_waiting_commands()

    def _complete_waiting_commands(self) -> None:
        with self._lock:
            waiting, self._pending_commands = self._pending_commands, {}
        for cid, result in waiting.items():
            self._complete_command(cid, True, result)

    def _complete_command(self, cid: str, success: bool, result: dict[str, Any]) -> None:
        try:
            self.client.call(
                f"agents/commands/{cid}/complete",
                {"success": success, "result": result},
                retry_for=30,
            )
        except (ApiError, Unreachable) as error:
            log.warning("completing command %s failed: %s", cid, error)

    def _upgrade(self, version: str) -> tuple[bool, dict[str, Any]]:
        argv = [
            part.replace("{version}", version) for part in self.config.agent_type.upgrade_command
        ]
        if not argv:
            return False, {"error": "no upgrade_command configured for this agent type"}
        chunks: list[bytes] = []
        result = self.executor.execute(argv, on_output=chunks.append, timeout_secs=600)
        output = b"".join(chunks)[-4000:].decode("utf-8", "replace")
        return result.exit_code == 0, {
            "exit_code": result.exit_code,
            "output": output,
            "version": version,
        }

    def _cancel(self, task_id: str) -> None:
        with self._lock:
            attempt = self.running.get(task_id)
        if attempt is not None:
            attempt.control.stop()

    # -- signals and shutdown -----------------------------------------------------------

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info(
                "draining: finishing %d running task(s), taking nothing new", len(self.running)
            )
            self.draining = True
            return
        log.info("stopping running tasks; they are reported lost and retried elsewhere")
        with self._lock:
            attempts = list(self.running.values())
        for attempt in attempts:
            attempt.control.stop(worker_shutdown=True)

    def stop(self) -> None:
        """Drain from another thread (tests, embedding)."""
        self.draining = True

    def _finish(self) -> None:
        deadline = time.monotonic() + 60
        while self.running and time.monotonic() < deadline:
            time.sleep(0.1)
        self._stop.set()
        if self._beat is not None:
            # A heartbeat the server handles after the deregistration would bring the agent
            # back online: let the one in flight finish first.
            self._beat.join(self.client.timeout + 5)
        if self.restart_after_work:
            log.info("restarting")
            self.executor.close()
            # Same interpreter, same arguments: the supervisor-free restart of the daemon.
            os.execv(sys.executable, [sys.executable, *sys.argv])  # noqa: S606
        try:
            self.client.call("agents/deregister", {}, retry_for=5)
        except (ApiError, Unreachable) as error:
            log.warning("deregister failed: %s", error)
        self.executor.close()
