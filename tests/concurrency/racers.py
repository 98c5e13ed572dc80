"""The code the racing processes run, and the pool of processes that runs it.

Each racer is a separate OS process started with the ``spawn`` context: a fresh interpreter that
imports Fleet itself and builds its own ``Database`` for every race (its own engine, its own
connections), so racers share nothing with the parent or with each other but the PostgreSQL
server. In each race every racer connects first, then waits at a barrier, so all of them start
hammering the database at the same moment.

Starting 32 interpreters that import SQLAlchemy costs some 40 CPU-seconds, which on a 2-core
machine is most of a test; so the processes are started once per test session and each race
hands every one of them a job (a fresh database, fresh agents, a fresh ``Database`` object).
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from fleet_common.agents.models import Agent, Command, CommandStatus
from fleet_common.db import Database, utcnow
from fleet_common.settings import OrchestratorSettings
from fleet_common.tasks.models import Task, TaskStatus

RACERS = 32
# Bounds, not pauses: how long racers may take to reach the start line (a loaded 2-core
# machine starting 32 interpreters can take a minute or more), and to report after a race.
START_TIMEOUT = 300.0
JOIN_TIMEOUT = 30.0
# A racer that got nothing pauses this long before asking again, as a real agent backs off
# when idle; on a 2-core machine, 31 racers spinning flat out would starve the one holding the
# work. This is not waiting for a condition: the loop polls, and ends on what the database says.
IDLE_PAUSE = 0.005


@dataclass
class RacerResult:
    name: str
    ids: list[str] = field(default_factory=list)  # claimed task ids, or delivered command ids
    calls: int = 0  # claim_next / heartbeat calls made
    empty_calls: int = 0  # calls that got nothing
    violations: list[str] = field(default_factory=list)  # invariants broken, seen from inside
    error: str | None = None
    race_cpu: float = 0.0  # CPU seconds this racer spent after the start line


def racer_settings(url: str) -> OrchestratorSettings:
    # A lease far longer than the test: nothing expires, so no command is redelivered and no
    # claim is undone behind the test's back.
    return OrchestratorSettings(database_url=url, lease_secs=3600)


class Racer:
    """One racer's side of a race: connect, wait at the start line, run, always report.

    If anything fails before the start line the barrier is aborted, so the parent and the
    other racers learn at once instead of waiting out their timeout."""

    def __init__(self, name: str, url: str, barrier: Any, results: Any) -> None:
        self.result = RacerResult(name)
        self.db = Database(url, pool_size=1)
        self.settings = racer_settings(url)
        self.barrier = barrier
        self.results = results
        self._cpu_at_start = 0.0
        self._started = False

    def start_line(self) -> None:
        self.barrier.wait(START_TIMEOUT)
        self._started = True
        self._cpu_at_start = time.process_time()

    def run(self, body: Callable[[Racer], None]) -> None:
        try:
            body(self)
        except BaseException:
            self.result.error = traceback.format_exc()
            if not self._started:
                self.barrier.abort()
        finally:
            if self._started:
                self.result.race_cpu = time.process_time() - self._cpu_at_start
            self.db.dispose()
            self.results.put(self.result)

    def queued_left(self) -> int:
        with self.db.session() as session:
            query = select(func.count()).where(Task.status == TaskStatus.QUEUED)
            return int(session.scalar(query) or 0)

    def undelivered_left(self, agent_id: str) -> int:
        with self.db.session() as session:
            query = select(func.count()).where(
                Command.agent_id == agent_id,
                Command.status == CommandStatus.PENDING,
                Command.delivered_at.is_(None),
            )
            return int(session.scalar(query) or 0)


def claimer(name: str, url: str, agent_id: str, complete: bool, barrier: Any, results: Any) -> None:
    """Claim until nothing is queued; with ``complete``, finish each claim through its lease
    in a second transaction so the agent's capacity frees up again."""
    from fleet_common.dispatch.claim import active_count, claim_next
    from fleet_common.tasks import lease

    def body(racer: Racer) -> None:
        result, db, settings = racer.result, racer.db, racer.settings
        with db.session() as session:
            limit = session.get_one(Agent, agent_id).max_concurrency
        racer.start_line()
        while True:
            with db.session() as session:
                result.calls += 1
                claim = claim_next(session, settings, agent_id)
                if claim is not None:
                    task_id, token = claim.task.id, claim.lease_token
                    if claim.task.agent_id != agent_id:
                        result.violations.append(f"{task_id} claimed for {claim.task.agent_id}")
                    # The claim locked the agent row: this count is exact until commit.
                    active = active_count(session, agent_id)
                    if active > limit:
                        result.violations.append(f"{agent_id} holds {active} > {limit} tasks")
            if claim is None:
                result.empty_calls += 1
                if racer.queued_left() == 0:
                    return
                time.sleep(IDLE_PAUSE)
                continue
            result.ids.append(task_id)
            if complete:
                with db.session() as session:
                    held = lease.held_task(session, task_id, agent_id, token, now=utcnow())
                    lease.complete(session, settings, held, {"exit_code": 0})

    Racer(name, url, barrier, results).run(body)


def heartbeater(name: str, url: str, agent_id: str, barrier: Any, results: Any) -> None:
    """Heartbeat for ``agent_id`` until every pending command has been handed out."""
    from fleet_common.agents.service import heartbeat

    def body(racer: Racer) -> None:
        result = racer.result
        racer.db.ping()
        racer.start_line()
        while True:
            with racer.db.session() as session:
                result.calls += 1
                reply = heartbeat(session, racer.settings, agent_id, [], None)
                ids = [command.id for command in reply.commands]
            result.ids.extend(ids)
            if not ids:
                result.empty_calls += 1
                if racer.undelivered_left(agent_id) == 0:
                    return
                time.sleep(IDLE_PAUSE)

    Racer(name, url, barrier, results).run(body)


@dataclass
class Race:
    results: list[RacerResult]
    startup: float  # from handing out the jobs to the start line
    seconds: float  # from the start line to the last racer's report

    @property
    def ids(self) -> list[str]:
        return [i for result in self.results for i in result.ids]

    def summary(self) -> str:
        calls = sum(r.calls for r in self.results)
        empty = sum(r.empty_calls for r in self.results)
        race_cpu = sum(r.race_cpu for r in self.results)
        return (
            f"{len(self.results)} racers: start line after {self.startup:.1f}s, race "
            f"{self.seconds:.1f}s ({race_cpu:.1f} CPU-s in the racers), {len(self.ids)} items "
            f"in {calls} calls ({empty} empty)"
        )


def _serve(jobs: Any, barrier: Any, results: Any) -> None:
    """A racer process: run each job handed to it until told to stop (None)."""
    import tests.concurrency.racers  # noqa: F401  (import Fleet and SQLAlchemy before any job)

    while True:
        job = jobs.get()
        if job is None:
            return
        target, args = job
        target(*args, barrier, results)


class RacerPool:
    """``size`` spawned processes waiting for jobs; ``race()`` gives each of them one."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.ctx = multiprocessing.get_context("spawn")
        self.barrier = self.ctx.Barrier(size + 1)
        self.results = self.ctx.Queue()
        self.jobs = [self.ctx.Queue() for _ in range(size)]
        self.processes = [
            self.ctx.Process(
                target=_serve, args=(jobs, self.barrier, self.results), name=f"racer-{n}"
            )
            for n, jobs in enumerate(self.jobs)
        ]
        for process in self.processes:
            process.daemon = True
            process.start()
        self.broken = False

    def race(
        self,
        target: Callable[..., None],
        argument_lists: Sequence[tuple[Any, ...]],
        *,
        timeout: float,
        setup: Callable[[], None] | None = None,
    ) -> Race:
        """Run ``target(*args, barrier, results)`` in every racer, one argument tuple each.
        ``setup`` runs here while the racers connect; the race starts when all are ready. Fails
        if a racer raised, or the race took longer than ``timeout`` seconds."""
        assert len(argument_lists) == self.size, f"a race needs {self.size} argument tuples"
        assert not self.broken, "an earlier race left this pool broken"
        self.broken = True  # until this race ends cleanly
        launched = time.monotonic()
        for jobs, args in zip(self.jobs, argument_lists, strict=True):
            jobs.put((target, args))
        collected: list[RacerResult] = []

        def drain(until: float) -> None:
            while len(collected) < self.size:
                remaining = until - time.monotonic()
                if remaining <= 0:
                    return
                try:
                    collected.append(self.results.get(timeout=remaining))
                except queue.Empty:
                    return

        try:
            if setup is not None:
                setup()
            self.barrier.wait(START_TIMEOUT)
        except threading.BrokenBarrierError:
            # A racer failed before the start line (or the bound ran out): collect what they
            # said; the pool stays usable if all of them reported.
            drain(time.monotonic() + JOIN_TIMEOUT)
            self._settle(collected)
            errors = [f"{r.name}:\n{r.error}" for r in collected if r.error]
            raise AssertionError("the race never started:\n" + "\n".join(errors[:3])) from None
        except BaseException:
            self.barrier.abort()  # setup failed: release the racers waiting at the start line
            drain(time.monotonic() + JOIN_TIMEOUT)
            self._settle(collected)
            raise
        started = time.monotonic()
        drain(started + timeout)
        seconds = time.monotonic() - started
        self._settle(collected)
        errors = [f"{r.name}:\n{r.error}" for r in collected if r.error]
        assert not errors, "racers failed:\n" + "\n".join(errors)
        assert len(collected) == self.size, (
            f"only {len(collected)} of {self.size} racers finished in {timeout}s"
        )
        return Race(collected, started - launched, seconds)

    def _settle(self, collected: list[RacerResult]) -> None:
        """Every racer reported: they are all back waiting for jobs, the pool is usable."""
        if len(collected) == self.size:
            self.barrier.reset()
            self.broken = False

    def close(self) -> None:
        if not self.broken:
            for jobs in self.jobs:
                jobs.put(None)
            for process in self.processes:
                process.join(timeout=JOIN_TIMEOUT)
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
