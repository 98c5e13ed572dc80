"""CLI fixtures: a clean environment, a migrated SQLite database and a real API server.

The server is Werkzeug's threaded server on a free port running ``create_app(settings)``, so
the CLI goes through real HTTP (connection errors, headers, status codes) as it does in use.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner, Result
from werkzeug.serving import make_server

from fleet_api.cli import main
from fleet_common.auth import service as auth
from fleet_common.auth.models import TokenKind
from fleet_common.db import Database
from fleet_common.migrate import upgrade
from fleet_common.settings import Settings, load_settings


def invoke(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> Result:
    """Run ``fleet ARGS``; an unexpected exception fails the test with its traceback."""
    return CliRunner().invoke(main, list(args), env=env, input=stdin, catch_exceptions=False)


def sqlite_settings(directory: Path) -> Settings:
    return load_settings(
        env={
            "FLEET_DATABASE_URL": f"sqlite:///{directory / 'fleet.db'}",
            "FLEET_ORCHESTRATOR_STATE_DIR": str(directory / "state"),
        }
    )


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No FLEET_* variable leaks in, and ./.fleet/ is this test's own empty directory."""
    import os

    for name in list(os.environ):
        if name.startswith("FLEET_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def database_env(tmp_path: Path) -> dict[str, str]:
    """Environment pointing the CLI at a fresh (not yet migrated) SQLite database."""
    return {"FLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}"}


@dataclass
class Server:
    """A running API: its URL, an admin token and direct HTTP access for setting things up."""

    url: str
    token: str
    settings: Settings

    @property
    def env(self) -> dict[str, str]:
        return {"FLEET_SERVER": self.url, "FLEET_TOKEN": self.token}

    def cli(self, *args: str, stdin: str | None = None) -> Result:
        return invoke(*args, env=self.env, stdin=stdin)

    def api(self, method: str, path: str, token: str | None = None, **kwargs: Any) -> Any:
        """Call the API directly; returns the response after checking it succeeded."""
        headers = {"Authorization": f"Bearer {token or self.token}"}
        reply = requests.request(
            method, f"{self.url}/api/v1{path}", headers=headers, timeout=10, **kwargs
        )
        assert reply.status_code < 400, reply.text
        return reply


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from fleet_api.app import create_app

    settings = sqlite_settings(tmp_path_factory.mktemp("api"))
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    with db.session() as session:
        _, token = auth.mint(session, TokenKind.ADMIN, actor="test", name="cli-tests")
    app = create_app(settings, db=db, publisher=False)
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{http.server_port}", token, settings)
    finally:
        http.shutdown()
        db.dispose()
