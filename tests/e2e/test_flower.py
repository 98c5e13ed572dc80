"""Issue #3, deliverable 9: ``fleet flower`` is Flower on Fleet's broker, and it sees the work.

The workers send no Celery task events by default (``[orchestrator] task_events = false``, as
in Celery): Flower switches them on while it runs, with its periodic ``enable_events``
broadcast. So a worker started before Flower shows in Flower, and so do the wake-ups it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests

from fleet_worker.publisher import DISPATCH_TASK
from tests import services
from tests.e2e.conftest import POSTGRES, SystemFactory
from tests.e2e.system import local_host

TASK_TIMEOUT = 60.0
#: Flower enables events every 5 s; its first inspection of the workers can take longer.
FLOWER_TIMEOUT = 90.0


@pytest.mark.postgres
@pytest.mark.redis
def test_flower_shows_the_worker_and_the_tasks_it_ran(
    make_system: SystemFactory, tmp_path: Path
) -> None:
    system = make_system(
        POSTGRES,
        hosts=[local_host("flower-host", tmp_path, {"agent_type": "demo"})],
        agent_types={},
    )
    system.start_worker("flower-host")
    port = services.free_port()
    system.spawn(
        "flower", "flower", "--port", str(port), env={"FLOWER_UNAUTHENTICATED_API": "true"}
    )
    flower = f"http://127.0.0.1:{port}/api"

    def flower_get(path: str, **params: Any) -> Any:
        try:
            reply = requests.get(f"{flower}{path}", params=params, timeout=10)
        except requests.ConnectionError:
            return None
        return reply.json() if reply.status_code == 200 else None

    workers = system.wait_for(
        lambda: [w for w in flower_get("/workers", refresh="true") or {} if "flower-host" in w],
        timeout=FLOWER_TIMEOUT,
        what="Flower to list the worker",
        interval=0.5,
    )
    assert workers[0].startswith("fleet-flower-host@")

    def a_task_in_flower() -> dict[str, Any] | None:
        # Until Flower's enable_events reaches the worker, its tasks send no events: each
        # round submits one more task and looks for any of them in Flower.
        task = system.submit("Seen by Flower")
        done = system.wait_status(task["id"], "completed", "failed", timeout=TASK_TIMEOUT)
        assert done["status"] == "completed", done
        submitted.add(task["id"])
        for info in (flower_get("/tasks", taskname=DISPATCH_TASK) or {}).values():
            if info.get("state") == "SUCCESS" and any(
                i in str(info.get("args")) for i in submitted
            ):
                return dict(info)
        return None

    submitted: set[str] = set()
    info = system.wait_for(
        a_task_in_flower, timeout=FLOWER_TIMEOUT, what="Flower to show a task", interval=0.5
    )
    assert info["name"] == DISPATCH_TASK
    assert info["worker"].startswith("fleet-flower-host@")
