"""Two requests with the same Idempotency-Key at the same moment: one task, the second answer
is the first's replay (PostgreSQL: the second INSERT waits for the first to commit), on a
Session and on the lean unit of work ``POST /tasks`` runs on."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from fleet_common.db import Database
from fleet_common.tasks import service
from fleet_common.tasks.models import Task, TaskEvent
from tests.conftest import make_settings


@pytest.mark.parametrize("lean", [False, True], ids=["session", "lean"])
def test_a_racing_request_with_the_same_key_gets_the_replay(
    pg_url: str, tmp_path: Path, lean: bool
) -> None:
    settings = make_settings(tmp_path, pg_url)
    db = Database(pg_url, pool_size=2)
    body = {"title": "once", "labels": ["agent:code:python"]}
    try:
        with db.session(lean=lean) as first:
            created = service.create_task(first, settings, body, actor="a", idempotency_key="k")
            assert created.created
            # The second request's lookup misses (nothing committed yet); its INSERT then
            # waits for this transaction, which commits a moment later.
            commit = threading.Timer(0.3, first.commit)
            commit.start()
            with db.session(lean=lean) as second:
                replay = service.create_task(second, settings, body, actor="b", idempotency_key="k")
            commit.join()
        assert not replay.created and replay.task.id == created.task.id
        with db.session() as check:
            assert check.query(Task).count() == 1
            assert check.query(TaskEvent).count() == 1
    finally:
        db.dispose()
