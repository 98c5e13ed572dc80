"""32 processes heartbeat for one agent while 2,000 commands wait: each is delivered once.

This is what happens when an agent's heartbeats pile up (a slow network, a retrying client, a
daemon restarted while its old process still runs): many replies are being built for the same
agent at once, and no command may appear in two of them.
"""

from __future__ import annotations

from collections import Counter

import pytest
from sqlalchemy import select

from fleet_common.agents import service as agents
from fleet_common.agents.models import Command
from fleet_common.auth import service as auth
from fleet_common.auth.models import TokenKind
from fleet_common.db import Database
from tests.concurrency.racers import RACERS, RacerPool, heartbeater, racer_settings
from tests.concurrency.seed import enqueue_commands

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

COMMANDS = 2_000


def _register(db: Database) -> str:
    with db.session() as session:
        _, join = auth.mint(session, TokenKind.JOIN, actor="test", ttl_secs=600)
        body = {"join_token": join, "name": "busy", "host_uid": "busy", "capabilities": []}
        return agents.register(session, body).agent.id


def test_32_heartbeaters_get_each_command_once(fresh_pg: str, racers: RacerPool) -> None:
    db = Database(fresh_pg, pool_size=2)
    try:
        agent_id = _register(db)
        settings = racer_settings(fresh_pg)
        created: list[str] = []
        result = racers.race(
            heartbeater,
            [(f"racer-{n}", fresh_pg, agent_id) for n in range(RACERS)],
            setup=lambda: created.extend(enqueue_commands(db, settings, agent_id, COMMANDS)),
            timeout=120,
        )
        print(result.summary())
        delivered = result.ids
        duplicates = [c for c, n in Counter(delivered).items() if n > 1]
        assert not duplicates, f"{len(duplicates)} commands delivered twice, e.g. {duplicates[:5]}"
        assert set(delivered) == set(created), f"{len(set(created) - set(delivered))} never sent"
        with db.session() as session:
            rows = session.execute(
                select(Command.id, Command.delivery_count, Command.delivered_at)
            ).all()
        assert len(rows) == COMMANDS
        assert {count for _, count, _ in rows} == {1}
        assert all(at is not None for _, _, at in rows)
        busy = [r for r in result.results if r.ids]
        assert len(busy) > 1, "only one racer ever got commands: nothing raced"
    finally:
        db.dispose()
