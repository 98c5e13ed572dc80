"""One configured host, as a worker process serves it: its agent slots (each an ``ssh_cli``
agent row the worker heartbeats for), the attempts running on it, and the claim loop that a
wake-up message starts."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from fleet_common.agents import commands as agent_commands
from fleet_common.agents import service as agents
from fleet_common.agents.models import CommandKind, DesiredState
from fleet_common.db import Database, utcnow
from fleet_common.dispatch.claim import AgentReading, claim_and_start
from fleet_common.dispatch.routing import agent_queue, queue_for_key, servable_keys
from fleet_common.forgejo.receipts import make_pr_check
from fleet_common.settings import AgentSlotSettings, HostSettings, Settings
from fleet_common.tasks import lease
from fleet_common.tasks.state import Reason
from fleet_worker.attempt import Attempt, AttemptRun, Control
from fleet_worker.db_reporter import DbReporter
from fleet_worker.executors import make_executor
from fleet_worker.executors.base import Executor
from fleet_worker.host_lock import HostLock

log = logging.getLogger("fleet.worker")


@dataclass
class Slot:
    """One ``[[hosts]].agents`` entry and the agent row that stands for it."""

    index: int
    config: AgentSlotSettings
    agent_id: str = ""
    desired_state: str = DesiredState.ACTIVE
    #: The agent row as the claims last read it (the claim re-checks it; set by register).
    reading: AgentReading | None = None
    running: dict[str, tuple[Attempt, Control]] = field(default_factory=dict)
    #: Threads claiming for this slot now, and wake-ups turned away since the slot was full.
    claiming: int = 0
    turned_away: int = 0

    def full(self) -> bool:
        """Every place is running or being claimed for (the caller holds the host's lock)."""
        return len(self.running) + self.claiming >= self.config.max_concurrency

    def host_uid(self, host_id: str) -> str:
        return f"host:{host_id}:{self.index}:{self.config.agent_type}"


class HostWorker:
    """Serves one host: claims for its slots, runs attempts, heartbeats, obeys commands."""

    def __init__(
        self,
        settings: Settings,
        host: HostSettings,
        db: Database,
        *,
        executor: Executor | None = None,
        on_restart: Callable[[], None] | None = None,
        on_resume: Callable[[Slot], None] | None = None,
        host_lock: HostLock | None = None,
    ) -> None:
        self.settings = settings
        self.host = host
        self.db = db
        self.executor = executor or make_executor(host)
        self.slots = [Slot(i, cfg) for i, cfg in enumerate(host.agents)]
        self.stopping = False
        self.on_restart = on_restart
        #: Called when a slot's agent takes work again (resumed, enabled): the tasks queued
        #: meanwhile had their wake-ups turned away, and would wait for the relay.
        self.on_resume = on_resume
        self.host_lock = host_lock
        self.pr_check = make_pr_check(settings) if settings.forgejo.enabled else lease.no_forge
        self._lock = threading.Lock()
        self._stop_heartbeats = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        #: Claim loops a wake-up for several tasks starts besides its own (see serve()).
        self._spread_pool = ThreadPoolExecutor(
            max_workers=max(self.capacity, 1), thread_name_prefix="fleet-serve"
        )

    @property
    def capacity(self) -> int:
        return sum(slot.config.max_concurrency for slot in self.slots)

    def queues(self) -> list[str]:
        """Exactly the queues this host's slots can serve (routing is exact)."""
        max_req = self.settings.orchestrator.max_requirements
        names: dict[str, None] = {}
        for slot in self.slots:
            for key in servable_keys(slot.config.capabilities, max_req):
                names[queue_for_key(key)] = None
            names[agent_queue(slot.agent_id)] = None
        return list(names)

    # -- lifecycle ----------------------------------------------------------------------

    def register(self) -> None:
        """Create or refresh the slots' agent rows, and fail whatever a previous process of
        this host left running (its processes died with it) so it is retried at once."""
        now = utcnow()
        with self.db.session() as session:
            for slot in self.slots:
                agent = agents.ensure_configured(
                    session,
                    host_uid=slot.host_uid(self.host.host_id),
                    name=f"{self.host.host_id}/{slot.config.agent_type}#{slot.index}",
                    host_id=self.host.host_id,
                    hostname=self.host.hostname
                    if self.host.transport == "ssh"
                    else socket.gethostname(),
                    agent_type=slot.config.agent_type,
                    capabilities=slot.config.capabilities,
                    max_concurrency=slot.config.max_concurrency,
                    now=now,
                )
                slot.agent_id = agent.id
                slot.desired_state = agent.desired_state
                slot.reading = AgentReading.of(agent)
                agents.release_tasks(
                    session,
                    self.settings.orchestrator,
                    agent.id,
                    Reason.AGENT_LOST,
                    "the worker serving this agent restarted",
                    now=now,
                )

    def start_heartbeats(self) -> None:
        self._heartbeat_thread = threading.Thread(
            target=self._heartbeat_loop, name="fleet-heartbeat", daemon=True
        )
        self._heartbeat_thread.start()

    def begin_shutdown(self, grace_secs: float) -> None:
        """Take nothing new; after ``grace_secs`` stop what still runs (reported agent_lost)."""
        self.stopping = True
        timer = threading.Timer(grace_secs, self._stop_all)
        timer.daemon = True
        timer.start()

    def close(self) -> None:
        """Stop: nothing new is claimed, what still runs is stopped (after a warm shutdown's
        grace nothing does), and the claim loops on the host's threads are waited for."""
        self._stop_heartbeats.set()
        self.stopping = True
        self._stop_all()
        self._spread_pool.shutdown(wait=True)
        self.executor.close()

    def _stop_all(self) -> None:
        for slot in self.slots:
            for _, control in list(slot.running.values()):
                control.stop(worker_shutdown=True)

    # -- claiming and running -----------------------------------------------------------

    def serve(self, queue: str | None = None, count: int = 1) -> int:
        """Claim and run the best eligible tasks for this host's slots until none is left
        (a wake-up message starts this; duplicates and stale ones find nothing). A wake-up
        from ``queue`` tries only the slots that serve that queue. Returns how many attempts
        ran. An attempt's completion claims the next task for its slot in the same statement
        (on PostgreSQL), which then runs in the place the attempt freed; an attempt that
        claimed nothing so is followed by a claim of its own, as before.

        A wake-up that stands for ``count`` tasks also starts a claim loop like this one on
        the host's own threads for each further task, as many as the slots have free places
        (each of those returns when its claims find nothing, as this one does)."""
        slots = self._slots_for(queue)
        if count > 1:
            self._spread(queue, slots, count - 1)
        ran = 0
        claimed: tuple[Slot, Attempt] | None = None
        while claimed is not None or not self.stopping:  # a claimed task runs (or is stopped)
            claimed = claimed or self._claim(slots)
            if claimed is None:
                return ran
            slot, attempt = claimed
            following = self._run(slot, attempt)
            claimed = None if following is None else (slot, following)
            ran += 1
        return ran

    def _spread(self, queue: str | None, slots: list[Slot], more: int) -> None:
        """Start up to ``more`` claim loops for ``queue`` besides the caller's, no more than
        ``slots`` have free places for (the caller's own claim takes one)."""
        with self._lock:
            free = sum(
                max(0, slot.config.max_concurrency - len(slot.running) - slot.claiming)
                for slot in slots
                if slot.desired_state == DesiredState.ACTIVE
            )
        for _ in range(min(more, free - 1)):
            if self.stopping:
                return
            try:
                self._spread_pool.submit(self._serve_spread, queue)
            except RuntimeError:  # shut down meanwhile
                return

    def _serve_spread(self, queue: str | None) -> None:
        try:
            self.serve(queue)
        except Exception:  # a wake-up's own loop is logged by Celery; this one by us
            log.exception("host %s: a claim loop failed", self.host.host_id)

    def _slots_for(self, queue: str | None) -> list[Slot]:
        """The slots that serve ``queue`` (every slot for an unknown or missing queue)."""
        if queue:
            max_req = self.settings.orchestrator.max_requirements
            serving = [
                slot
                for slot in self.slots
                if queue == agent_queue(slot.agent_id)
                or any(
                    queue == queue_for_key(key)
                    for key in servable_keys(slot.config.capabilities, max_req)
                )
            ]
            if serving:
                return serving
        return self.slots

    def _claim(self, slots: list[Slot]) -> tuple[Slot, Attempt] | None:
        """Claim for the least busy of ``slots`` that can take more."""
        for slot in sorted(slots, key=lambda s: len(s.running) / s.config.max_concurrency):
            if slot.desired_state != DesiredState.ACTIVE:
                continue
            attempt = self._claim_for(slot)
            if attempt is not None:
                return slot, attempt
        return None

    def _claim_for(self, slot: Slot) -> Attempt | None:
        """Claim for ``slot`` unless every place in it is running or being claimed for: a
        wake-up turned away then costs no database work (a claim would wait for the agent row
        that the other claims lock, to find the slot full). The threads of a full slot claim
        again when they are done, so the turned-away task is not lost; and a claim that finds
        nothing tries once more if a wake-up was turned away while it ran (its task may have
        been committed after the claim looked)."""
        with self._lock:
            if slot.full():
                slot.turned_away += 1
                return None
            slot.claiming += 1
        try:
            while True:
                with self._lock:
                    turned_away = slot.turned_away
                attempt = self._claim_in_db(slot)
                if attempt is not None:
                    return attempt
                with self._lock:
                    if slot.turned_away == turned_away:
                        return None
        finally:
            with self._lock:
                slot.claiming -= 1

    def _claim_in_db(self, slot: Slot) -> Attempt | None:
        """Claim and start the attempt atomically (its ``dispatched`` and ``started`` events
        commit together; on PostgreSQL one statement, no transaction around it). A claim made
        with an out-of-date reading of the agent's row claims nothing: it is made again with
        the row's values."""
        orch = self.settings.orchestrator
        with self.db.session(autocommit=True) as session:
            for _ in range(2):
                assert slot.reading is not None, "register() first"
                claim, reading = claim_and_start(session, orch, slot.agent_id, slot.reading)
                if claim is not None or reading is None or reading == slot.reading:
                    break
                slot.reading = reading
            if claim is None:
                return None
            attempt = Attempt.of(claim.task, claim.lease_token)
        with self._lock:  # once committed (a failed commit claimed nothing)
            slot.running[attempt.task_id] = (attempt, Control())
        return attempt

    def _next_claim_reading(self, slot: Slot) -> AgentReading | None:
        """What a completion in ``slot`` claims its successor with (None: claim nothing)."""
        if self.stopping or slot.desired_state != DesiredState.ACTIVE:
            return None
        return slot.reading

    def _run(self, slot: Slot, attempt: Attempt) -> Attempt | None:
        """Run ``attempt``; the next attempt its completion claimed for ``slot``, or None."""
        _, control = slot.running[attempt.task_id]
        if self.stopping:
            control.stop(worker_shutdown=True)
        following = None
        try:
            agent_type = self.settings.agent_types[slot.config.agent_type]
            orch = self.settings.orchestrator
            reporter = DbReporter(
                self.db,
                orch,
                attempt,
                pr_check=self.pr_check,
                started=True,
                then_claim=lambda: self._next_claim_reading(slot),
            )
            AttemptRun(orch, self.host, agent_type, self.executor, attempt, control, reporter).run()
            if reporter.next_claim is not None:
                following = Attempt.of(reporter.next_claim.task, reporter.next_claim.lease_token)
            if reporter.next_reading is not None:
                slot.reading = reporter.next_reading
        finally:
            with self._lock:  # the place passes to the next attempt: the slot is never over
                slot.running.pop(attempt.task_id, None)
                if following is not None:
                    slot.running[following.task_id] = (following, Control())
        return following

    # -- heartbeats and commands --------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        interval = self.settings.orchestrator.heartbeat_interval_secs
        while not self._stop_heartbeats.wait(interval):
            if self.host_lock is not None and not self.host_lock.check():
                log.error(
                    "host %s: another worker holds its lock now (this one lost it with its"
                    " database connection); stopping",
                    self.host.host_id,
                )
                self.stopping = True
                if self.on_restart is not None:
                    self.on_restart()
                return
            try:
                self.heartbeat()
            except Exception:
                log.warning("heartbeat failed; retrying next interval", exc_info=True)

    def heartbeat(self) -> None:
        """Heartbeat every slot with the leases it holds; act on what the reply says."""
        orch = self.settings.orchestrator
        for slot in self.slots:
            with self._lock:
                presented = [
                    {"task_id": a.task_id, "lease_token": a.lease_token}
                    for a, _ in slot.running.values()
                ]
            with self.db.session() as session:
                reply = agents.heartbeat(session, orch, slot.agent_id, presented, None)
                was, slot.desired_state = slot.desired_state, reply.agent.desired_state
                for task_id in reply.cancelled_task_ids + reply.stale_task_ids:
                    self._stop_task(slot, task_id)
                for command in reply.commands:
                    self._obey(session, slot, command.id, command.kind, command.payload)
            resumed = was != DesiredState.ACTIVE == slot.desired_state
            if resumed and self.on_resume is not None and not self.stopping:
                self.on_resume(slot)

    def _stop_task(self, slot: Slot, task_id: str) -> None:
        entry = slot.running.get(task_id)
        if entry is not None:
            entry[1].stop()

    def _obey(
        self, session: Session, slot: Slot, command_id: str, kind: str, payload: dict[str, Any]
    ) -> None:
        """drain/resume already changed the desired state on the server; the worker only
        follows it. restart and upgrade restart the worker after its current work."""
        agent_commands.acknowledge(session, slot.agent_id, command_id)
        result: dict[str, object] = {"host_id": self.host.host_id}
        if kind == CommandKind.CANCEL_TASK:
            self._stop_task(slot, str(payload.get("task_id")))
        elif kind in (CommandKind.RESTART, CommandKind.UPGRADE):
            result["restarting"] = True
            if self.on_restart is not None:
                self.on_restart()
        agent_commands.complete(session, slot.agent_id, command_id, True, result)
