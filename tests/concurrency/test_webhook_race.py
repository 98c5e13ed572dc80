"""Forgejo deliveries racing in real processes on PostgreSQL.

32 spawned processes deliver ``issues`` events about the same issues at the same moment, each in
its own transaction through ``intake.receive``: per issue, every process sends a delivery of its
own (a distinct id and body: they race to create the task) and one delivery that all processes
send identically (the same id and body: a redelivery racing itself). Exactly one active task per
issue must come out, each delivery must be stored once, and the event log must replay cleanly.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from fleet_common.db import Database
from fleet_common.forgejo.models import WebhookDelivery
from fleet_common.forgejo.signatures import sign
from fleet_common.tasks import replay
from fleet_common.tasks.models import Task
from tests.concurrency.racers import RACERS, Racer, RacerPool

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ISSUES = 20
SECRET = "race-secret"
REPO = "alice/widgets"
TEMPLATE = Path(__file__).parents[1] / "forgejo" / "data" / "payloads" / "issues.opened.json"
Delivery = tuple[dict[str, str], bytes]


def _delivery(template: dict[str, Any], number: int, action: str, sender: str) -> Delivery:
    payload = json.loads(json.dumps(template))
    payload.update(action=action, number=number)
    payload["issue"].update(number=number, id=1_000_000 + number, title=f"Race {number}")
    payload["sender"].update(login=sender, username=sender)
    body = json.dumps(payload).encode()
    delivery_id = str(uuid.uuid4())
    headers = {"X-Forgejo-Delivery": delivery_id, "X-Forgejo-Event": "issues", **sign(body, SECRET)}
    headers["Content-Type"] = "application/json"
    return headers, body


def deliverer(
    name: str, url: str, state_dir: str, deliveries: list[Delivery], barrier: Any, results: Any
) -> None:
    """Receive each delivery in a transaction of its own; report ``number:outcome`` each."""
    from fleet_common.forgejo import intake
    from fleet_common.forgejo.events import parse_delivery
    from fleet_common.settings import load_settings

    def body(racer: Racer) -> None:
        settings = load_settings(
            env={
                "FLEET_DATABASE_URL": url,
                "FLEET_ORCHESTRATOR_STATE_DIR": state_dir,
                "FLEET_FORGEJO_WEBHOOK_SECRET": SECRET,
                "FLEET_FORGEJO_TRIGGER_LABEL": "kind/bug",
            }
        )
        parsed = [parse_delivery(headers, raw) for headers, raw in deliveries]
        racer.db.ping()
        racer.start_line()
        for delivery in parsed:
            with racer.db.session() as session:
                result = intake.receive(session, settings, delivery)
            racer.result.calls += 1
            racer.result.ids.append(f"{delivery.number}:{result.outcome}")

    Racer(name, url, barrier, results).run(body)


def test_32_processes_deliver_one_task_per_issue(
    fresh_pg: str, racers: RacerPool, tmp_path: Path
) -> None:
    template = json.loads(TEMPLATE.read_text())
    shared = {n: _delivery(template, n, "opened", "forgejo-retry") for n in range(1, ISSUES + 1)}
    jobs = []
    for index in range(RACERS):
        action = ("opened", "reopened", "label_updated")[index % 3]
        mine = [_delivery(template, n, action, f"user{index}") for n in range(1, ISSUES + 1)]
        mine += list(shared.values())
        random.Random(index).shuffle(mine)
        jobs.append((f"racer-{index}", fresh_pg, str(tmp_path / "state"), mine))

    race = racers.race(deliverer, jobs, timeout=180)
    print(race.summary())

    outcomes = Counter(item.split(":", 1)[1] for item in race.ids)
    print(dict(outcomes))
    assert outcomes["created"] == ISSUES, outcomes
    assert outcomes["duplicate"] == ISSUES * (RACERS - 1), outcomes  # the shared ones
    assert set(outcomes) <= {"created", "exists", "duplicate"}, outcomes
    db = Database(fresh_pg, pool_size=2)
    try:
        with db.session() as session:
            per_issue = Counter(session.scalars(select(Task.issue_number).where(Task.repo == REPO)))
            assert per_issue == {n: 1 for n in range(1, ISSUES + 1)}
            stored = session.scalar(select(func.count()).select_from(WebhookDelivery))
            assert stored == ISSUES * (RACERS + 1)  # each racer's own, and each shared one once
            assert list(replay.verify(session)) == []
    finally:
        db.dispose()
