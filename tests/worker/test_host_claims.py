"""When a worker's wake-up asks the database for a claim: only for slots that serve the
wake-up's queue and have a free place, and never so that a turned-away task is forgotten."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fleet_common.dispatch.routing import NO_REQUIREMENTS, agent_queue, queue_for_key
from fleet_common.settings import AgentSlotSettings, HostSettings, load_settings
from fleet_worker.attempt import Attempt, Control
from fleet_worker.executors.local import LocalExecutor
from fleet_worker.host import HostWorker, Slot
from tests.api_helpers import wait_until


class Worker(HostWorker):
    """A HostWorker whose database claims are scripted: ``tasks`` are handed out in order."""

    def __init__(self, tmp_path: Path, tasks: list[str] | None = None) -> None:
        settings = load_settings(env={"FLEET_ORCHESTRATOR_STATE_DIR": str(tmp_path)})
        host = HostSettings(
            host_id="h",
            transport="local",
            work_dir=str(tmp_path / "work"),
            agents=(
                AgentSlotSettings(agent_type="a", capabilities=("x",), max_concurrency=2),
                AgentSlotSettings(agent_type="b", capabilities=("y",), max_concurrency=1),
            ),
        )
        super().__init__(settings, host, db=None, executor=LocalExecutor())  # type: ignore[arg-type]
        for slot in self.slots:
            slot.agent_id = f"agent-{slot.index}"
        self.tasks = list(tasks or [])
        self.asked: list[int] = []  # slot index of each database claim
        self.during_claim: Any = None  # called inside the next database claim

    def _claim_in_db(self, slot: Slot) -> Attempt | None:
        self.asked.append(slot.index)
        task_id = self.tasks.pop(0) if self.tasks else None  # what the claim's query saw
        if self.during_claim is not None:
            hook, self.during_claim = self.during_claim, None
            hook()
        if task_id is None:
            return None
        attempt = Attempt(task_id, slot.agent_id, "lease", 1, "", "", "", 60)
        with self._lock:
            slot.running[attempt.task_id] = (attempt, Control())
        return attempt

    def _run(self, slot: Slot, attempt: Attempt) -> None:
        with self._lock:
            slot.running.pop(attempt.task_id, None)


def occupy(slot: Slot, *task_ids: str) -> None:
    for task_id in task_ids:
        slot.running[task_id] = (Attempt(task_id, slot.agent_id, "l", 1, "", "", "", 60), Control())


def test_a_wake_up_claims_only_for_the_slots_of_its_queue(tmp_path: Path) -> None:
    worker = Worker(tmp_path, ["t1"])
    assert worker.serve(queue_for_key("y")) == 1
    assert worker.asked == [1, 1]  # the claim, then the one that found the queue empty
    worker.asked.clear()
    worker.serve(agent_queue("agent-0"))
    worker.serve(queue_for_key(NO_REQUIREMENTS))  # served by both slots
    assert worker.asked == [0, 0, 1]


def test_an_unknown_queue_tries_every_slot(tmp_path: Path) -> None:
    worker = Worker(tmp_path)
    worker.serve("fleet.cap.nobody")
    worker.serve(None)
    assert sorted(worker.asked) == [0, 0, 1, 1]


def test_a_full_slot_turns_a_wake_up_away_without_asking_the_database(tmp_path: Path) -> None:
    worker = Worker(tmp_path, ["t1"])
    occupy(worker.slots[1], "running")
    assert worker.serve(queue_for_key("y")) == 0
    assert worker.asked == [] and worker.slots[1].turned_away == 1


def test_a_claim_that_found_nothing_retries_if_a_wake_up_was_turned_away_meanwhile(
    tmp_path: Path,
) -> None:
    # Slot 1 has one place. A claim is in flight (the place is taken by it) when the next
    # task's wake-up arrives and is turned away; the claim had looked before that task was
    # committed and found nothing. It must look again, or the task waits for the relay.
    worker = Worker(tmp_path)
    turned_away = threading.Event()

    def wake_up_while_claiming() -> None:
        worker.tasks.append("t-late")
        other = threading.Thread(target=worker.serve, args=(queue_for_key("y"),))
        other.start()
        other.join()
        turned_away.set()

    worker.during_claim = wake_up_while_claiming
    assert worker.serve(queue_for_key("y")) == 1
    assert turned_away.is_set() and worker.slots[1].turned_away == 1
    assert worker.tasks == [] and worker.asked == [1, 1, 1]


class Gated(Worker):
    """A Worker whose attempts run until ``gate`` opens; ``peak`` is the most at once."""

    def __init__(self, tmp_path: Path, tasks: list[str]) -> None:
        super().__init__(tmp_path, tasks)
        self.gate = threading.Event()
        self.ran: list[str] = []
        self.peak = 0

    def _run(self, slot: Slot, attempt: Attempt) -> None:
        with self._lock:
            self.peak = max(self.peak, sum(len(s.running) for s in self.slots))
        self.gate.wait(10)
        with self._lock:
            self.ran.append(attempt.task_id)
            slot.running.pop(attempt.task_id, None)


def running(worker: Worker) -> int:
    with worker._lock:
        return sum(len(slot.running) for slot in worker.slots)


def test_a_wake_up_for_several_tasks_claims_for_as_many_free_places(tmp_path: Path) -> None:
    # One message stands for five tasks on a queue both slots serve (three places): three
    # claim loops run at once, no more, and together they run every task.
    worker = Gated(tmp_path, ["t1", "t2", "t3", "t4", "t5"])
    woken = threading.Thread(target=worker.serve, args=(queue_for_key(NO_REQUIREMENTS), 5))
    woken.start()
    wait_until(lambda: running(worker) == 3, timeout=10, what="three attempts at once")
    assert worker.tasks == ["t4", "t5"]  # nobody claimed beyond the free places
    worker.gate.set()
    woken.join(10)
    worker.close()
    assert sorted(worker.ran) == ["t1", "t2", "t3", "t4", "t5"] and worker.peak == 3


def test_a_wake_up_for_one_task_claims_in_its_own_loop_only(tmp_path: Path) -> None:
    worker = Gated(tmp_path, ["t1", "t2"])
    worker.gate.set()
    assert worker.serve(queue_for_key(NO_REQUIREMENTS)) == 2
    assert worker.peak == 1


def test_the_extra_loops_count_only_free_places(tmp_path: Path) -> None:
    # Slot 0 (two places) has one running: a wake-up for three tasks on its queue runs one.
    worker = Gated(tmp_path, ["t1", "t2"])
    occupy(worker.slots[0], "busy")
    worker.gate.set()
    assert worker.serve(queue_for_key("x"), 3) == 2
    worker.close()
    assert worker.peak == 2 and worker.ran == ["t1", "t2"]
