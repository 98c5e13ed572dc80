"""A running system for the pull daemon: a migrated database (PostgreSQL unless a test asks for
SQLite), the API on a real port, the beat sweeps in a thread, and a factory for real
``fleet agent run`` daemons that are all killed at the end of the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fleet_common.auth import service as auth
from fleet_common.auth.models import TokenKind
from fleet_common.db import Database
from fleet_common.migrate import upgrade
from fleet_common.settings import Settings, load_settings
from tests.api_helpers import wait_until
from tests.pull_agent.harness import (
    FAST,
    Api,
    ApiServer,
    DaemonProcess,
    Run,
    Sweeper,
    probe_runs,
    write_config,
)


@dataclass
class System:
    root: Path
    settings: Settings
    db: Database
    server: ApiServer
    api: Api
    config: Path
    probe_dir: Path
    daemons: list[DaemonProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    def daemon(self, name: str, *, join_token: str | None = "", **options: Any) -> DaemonProcess:
        """Start ``fleet agent run --name NAME``; a fresh join token unless one is given
        (None: no --join-token at all)."""
        if join_token == "":
            join_token = self.api.join_token()[1]
        process = DaemonProcess(
            self.root, self.url, name, config=self.config, join_token=join_token, **options
        )
        self.daemons.append(process)
        return process

    def online(self, daemon: DaemonProcess, timeout: float = 60) -> str:
        """Wait until ``daemon`` registered and its agent is online; its agent id."""

        def registered() -> str:
            assert daemon.alive, self.logs()
            agent_id = daemon.agent_id
            return agent_id if agent_id and self.api.agent(agent_id)["status"] == "online" else ""

        return str(
            wait_until(registered, timeout=timeout, what=f"{daemon.name} online", logs=self.logs)
        )

    def runs(self, task_id: str | None = None) -> list[Run]:
        return [r for r in probe_runs(self.probe_dir) if task_id in (None, r.task_id)]

    def logs(self) -> str:
        return "\n".join(d.tail() for d in self.daemons)

    def wait_for(self, condition: Callable[[], Any], *, timeout: float, what: str) -> Any:
        return wait_until(condition, timeout=timeout, what=what, logs=self.logs)

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.kill()


def server_settings(root: Path, database_url: str, **env: str) -> Settings:
    values = {f"FLEET_ORCHESTRATOR_{k.upper()}": str(v) for k, v in FAST.items()}
    values.update(FLEET_DATABASE_URL=database_url, FLEET_ORCHESTRATOR_STATE_DIR=str(root / "state"))
    values.update(env)
    return load_settings(env=values)


@contextmanager
def running_system(
    root: Path,
    database_url: str,
    *,
    port: int = 0,
    publisher: Any = False,
    start: bool = True,
    config: str = "",
    **env: str,
) -> Iterator[System]:
    """The API (``publisher``: False for none, None for the broker's), sweeps and a daemon
    factory on ``database_url``, which must be migrated and empty; ``config`` is added to the
    settings file the daemons (and workers) read."""
    from fleet_api.app import create_app

    settings = server_settings(root, database_url, **env)
    db = Database(settings.database_url)
    with db.session() as session:
        _, admin = auth.mint(session, TokenKind.ADMIN, actor="test", name="pull-agent-tests")
    app = create_app(settings, db=db, publisher=publisher)
    server = ApiServer(app, port)
    if start:
        server.start()
    publish = app.extensions["fleet"].publish if publisher is not False else None
    sweeper = Sweeper(db, settings, publish).start()
    probe_dir = root / "probe"
    system = System(
        root,
        settings,
        db,
        server,
        Api(server.url, admin),
        write_config(root / "fleet.toml", probe_dir, extra=config),
        probe_dir,
    )
    try:
        yield system
    finally:
        system.close()
        sweeper.stop()
        server.stop()
        if publish is not None and hasattr(publish, "__self__"):
            publish.__self__.close()
        db.dispose()


@pytest.fixture
def system(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[System]:
    """A running system on PostgreSQL, or on SQLite with ``indirect`` param ``"sqlite"``."""
    backend = getattr(request, "param", "postgres")
    if backend == "postgres":
        url = str(request.getfixturevalue("pg_url"))
    else:
        url = f"sqlite:///{tmp_path / 'fleet.db'}"
        upgrade(url)
    with running_system(tmp_path, url) as running:
        yield running
