"""Fixtures for the Celery side: a Redis database of our own, and real ``fleet beat`` processes.

``BeatProcess`` starts ``fleet_worker.celery_app.run_beat`` in a subprocess (its own process
group, settings from ``FLEET_*`` variables only) and stops it with SIGTERM, then SIGKILL for
whatever of its group is left. ``stack`` is a running system per backend: a migrated database,
a broker, and two beat processes at once (running two is meant to be harmless).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fleet_common.db import Database
from fleet_common.migrate import upgrade
from fleet_common.settings import Settings, load_settings
from fleet_worker.celery_app import FleetCelery, make_celery
from tests import services
from tests.api_helpers import wait_until

REPO = Path(__file__).resolve().parents[2]
RUN_BEAT = (
    "from fleet_common.settings import load_settings\n"
    "from fleet_worker.celery_app import run_beat\n"
    "raise SystemExit(run_beat(load_settings(), loglevel='DEBUG'))\n"
)
#: Short intervals so a sweep's effect shows within seconds.
FAST = {
    "FLEET_ORCHESTRATOR_SWEEP_INTERVAL_SECS": "1",
    "FLEET_ORCHESTRATOR_HEARTBEAT_INTERVAL_SECS": "1",
    "FLEET_ORCHESTRATOR_HEARTBEAT_TIMEOUT_THRESHOLD": "2",
    "FLEET_ORCHESTRATOR_LEASE_SECS": "2",
    "FLEET_ORCHESTRATOR_RELAY_AFTER_SECS": "2",
}
REDIS_LOCK_KEY = "fleet-tests:worker:lock"


def fleet_env(state_dir: Path, database_url: str, broker_url: str) -> dict[str, str]:
    """The ``FLEET_*`` variables of one test system (the beat processes load exactly these)."""
    return {
        "FLEET_ORCHESTRATOR_STATE_DIR": str(state_dir),
        "FLEET_DATABASE_URL": database_url,
        "FLEET_BROKER_URL": broker_url,
        **FAST,
    }


class BeatProcess:
    """A real ``fleet beat`` (Celery worker + embedded beat) in a subprocess."""

    def __init__(self, env: dict[str, str], log_path: Path, cwd: Path) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RUN_BEAT],
            env={**clean, **env, "PYTHONPATH": str(REPO)},
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the pool and beat children too
        )

    def tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return f"--- {self.log_path.name} (pid {self.proc.pid}) ---\n" + "\n".join(text[-lines:])

    def terminate(self) -> None:
        """Ask for a warm shutdown (what an operator's SIGTERM does)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL whatever is left of its group."""
        self.terminate()
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        # Whatever of this process's group survived (the pool child, the embedded beat).
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(5)
        self._log.close()


@contextmanager
def scratch_redis_db() -> Iterator[str]:
    """A Redis database (1-15) that was empty and is ours for the duration, flushed after."""
    import redis

    base = services.require_redis().rsplit("/", 1)[0]
    token = uuid.uuid4().hex
    for index in range(15, 0, -1):
        client = redis.Redis.from_url(f"{base}/{index}", socket_timeout=2)
        if not client.set(REDIS_LOCK_KEY, token, nx=True, ex=900):
            continue
        if client.dbsize() == 1:
            break
        client.delete(REDIS_LOCK_KEY)  # someone else's data is here: leave it alone
    else:
        services.unavailable(f"an empty Redis database on {base}")
    try:
        yield f"{base}/{index}"
    finally:
        if client.get(REDIS_LOCK_KEY) == token.encode():
            client.flushdb()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis broker URL on a database of its own."""
    with scratch_redis_db() as url:
        yield url


@dataclass
class Stack:
    """A running system: database, broker, settings and two ``fleet beat`` processes."""

    name: str
    settings: Settings
    db: Database
    app: FleetCelery
    beats: list[BeatProcess] = field(default_factory=list)

    def logs(self) -> str:
        return "\n".join(beat.tail() for beat in self.beats)

    def wait_for(self, condition: Callable[[], Any], *, timeout: float, what: str) -> Any:
        """Wait for ``condition``, failing with the beat processes' logs."""

        def check() -> Any:
            dead = [b for b in self.beats if b.proc.poll() is not None]
            if dead:
                pytest.fail(f"a fleet beat process exited\n{self.logs()}")
            return condition()

        return wait_until(check, timeout=timeout, what=what, logs=self.logs)


@pytest.fixture(scope="module", params=["sqlite+filesystem", "postgres+redis"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A migrated database, a broker and two beat processes, on each backend pair."""
    root = tmp_path_factory.mktemp(request.param.replace("+", "-"))
    state_dir = root / "state"
    with _database(request.param, state_dir) as database_url:
        broker_url = (
            request.getfixturevalue("redis_url")
            if request.param.endswith("redis")
            else "filesystem://"
        )
        env = fleet_env(state_dir, database_url, broker_url)
        upgrade(database_url)
        settings = load_settings(env=env)
        db = Database(settings.database_url, pool_size=2)
        app = make_celery(settings)
        result = Stack(request.param, settings, db, app)
        try:
            for number in (1, 2):
                result.beats.append(BeatProcess(env, root / f"beat-{number}.log", root))
            yield result
        finally:
            for beat in result.beats:
                beat.terminate()  # all at once: a warm shutdown takes a few seconds
            for beat in result.beats:
                beat.stop()
            app.runtime.close()
            db.dispose()


@contextmanager
def _database(backend: str, state_dir: Path) -> Iterator[str]:
    if backend.startswith("postgres"):
        with services.scratch_postgres_database("fleet_worker") as url:
            yield url
    else:
        state_dir.mkdir(parents=True, exist_ok=True)
        yield f"sqlite:///{state_dir / 'fleet.db'}"
