"""CLI commands that work without an API server: configuration, tokens, the database."""

from __future__ import annotations

import socket
import stat
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from werkzeug.serving import make_server

from fleet_api.cli.errors import ExitCode
from fleet_common.auth import service as auth
from fleet_common.auth.models import Token
from fleet_common.db import Database
from fleet_common.migrate import upgrade
from fleet_common.settings import load_settings
from fleet_common.tasks.models import Task
from fleet_common.tasks.service import create_task
from tests.cli.conftest import invoke


def test_bad_config_value_names_the_key_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text("[orchestrator]\nlease_secs = -1\n")
    result = invoke("--config", str(config), "db", "upgrade")
    assert result.exit_code == ExitCode.USAGE
    assert result.stderr.startswith("error: orchestrator.lease_secs: must be a positive")
    assert "Traceback" not in result.output


def test_bad_environment_value_and_missing_file_exit_2(tmp_path: Path) -> None:
    result = invoke("events", "verify", env={"FLEET_ORCHESTRATOR_LEASE_SECS": "soon"})
    assert result.exit_code == ExitCode.USAGE
    assert "error: orchestrator.lease_secs: expected an integer" in result.stderr

    result = invoke("beat", "--config", str(tmp_path / "missing.toml"))
    assert result.exit_code == ExitCode.USAGE
    assert result.stderr.startswith("error: FLEET_CONFIG: no such file")


def test_admin_token_create_prints_only_the_token(database_env: dict[str, str]) -> None:
    result = invoke("admin-token", "create", "--name", "ops", env=database_env)
    assert result.exit_code == 0, result.stderr
    secret = result.stdout.strip()
    assert result.stdout == secret + "\n"
    assert secret.startswith("fla_")
    # The database was migrated on the way, and the token works.
    db = Database(database_env["FLEET_DATABASE_URL"])
    with db.session() as session:
        assert auth.authenticate(session, secret).is_admin
        [name] = session.scalars(select(Token.name).where(Token.kind == "admin")).all()
        assert name == "ops"
    db.dispose()


def test_admin_token_create_save_writes_a_private_file_once(
    database_env: dict[str, str], tmp_path: Path
) -> None:
    result = invoke("admin-token", "create", "--name", "me", "--save", env=database_env)
    assert result.exit_code == 0, result.stderr
    saved = tmp_path / ".fleet" / "admin-token"
    assert saved.read_text().strip() == result.stdout.strip()
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600

    again = invoke("admin-token", "create", "--name", "me", "--save", env=database_env)
    assert again.exit_code == ExitCode.GENERAL
    assert "exists already" in again.stderr
    assert again.stdout == ""


def test_db_upgrade(database_env: dict[str, str]) -> None:
    result = invoke("db", "upgrade", env=database_env)
    assert result.exit_code == 0, result.stderr
    assert "newest schema" in result.stdout
    assert invoke("db", "upgrade", env=database_env).exit_code == 0


def test_unreachable_database_exits_3(tmp_path: Path) -> None:
    port = _free_port()
    url = f"postgresql://fleet:secret@127.0.0.1:{port}/fleet"
    result = invoke("db", "upgrade", env={"FLEET_DATABASE_URL": url})
    assert result.exit_code == ExitCode.UNREACHABLE
    assert result.stderr.startswith("error: cannot reach the database at postgresql")
    assert "secret" not in result.stderr


def test_events_verify_clean_then_with_an_altered_row(database_env: dict[str, str]) -> None:
    url = database_env["FLEET_DATABASE_URL"]
    settings = load_settings(env=database_env)
    upgrade(url)
    db = Database(url)
    with db.session() as session:
        first = create_task(session, settings, {"title": "one"}, actor="test").task.id
        create_task(session, settings, {"title": "two", "priority": 3}, actor="test")

    clean = invoke("events", "verify", env=database_env)
    assert clean.exit_code == 0, clean.output
    assert clean.stdout == "2 tasks checked, 0 differences\n"

    with db.session() as session:
        session.execute(update(Task).where(Task.id == first).values(priority=99, status="running"))
    db.dispose()
    dirty = invoke("events", "verify", env=database_env)
    assert dirty.exit_code == 1
    lines = dirty.stdout.splitlines()
    assert lines[-1] == "2 tasks checked, 2 differences"
    assert sorted(line.split(":")[1].split()[0] for line in lines[:-1]) == ["priority", "status"]
    assert all(line.startswith(first) for line in lines[:-1])


def test_events_verify_without_a_schema_says_how_to_make_one(
    database_env: dict[str, str],
) -> None:
    result = invoke("events", "verify", env=database_env)
    assert result.exit_code == ExitCode.GENERAL
    assert "run `fleet db upgrade`" in result.stderr


def test_api_command_without_any_token_explains_how_to_get_one() -> None:
    result = invoke("task", "list")
    assert result.exit_code == ExitCode.AUTH
    assert "no API token" in result.stderr
    assert "fleet admin-token create" in result.stderr


def test_token_file_is_used_when_no_token_is_given(tmp_path: Path) -> None:
    (tmp_path / ".fleet").mkdir()
    (tmp_path / ".fleet" / "admin-token").write_text("fla_from_file\n")
    url = f"http://127.0.0.1:{_free_port()}"
    # The token was found (no auth error): the failure is the server being down.
    result = invoke("--server", url, "task", "list")
    assert result.exit_code == ExitCode.UNREACHABLE


def test_server_down_exits_3_and_names_the_url() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    result = invoke("--server", url, "--token", "fla_x", "agents", "list")
    assert result.exit_code == ExitCode.UNREACHABLE
    assert f"cannot reach the Fleet API at {url}" in result.stderr
    assert result.stdout == ""


def test_bad_server_url_is_a_usage_error() -> None:
    result = invoke("--server", "fleet.example.com", "--token", "fla_x", "task", "list")
    assert result.exit_code == ExitCode.USAGE
    assert "invalid server URL" in result.stderr


def test_a_server_that_is_not_fleet_is_an_error_not_a_traceback() -> None:
    def not_fleet(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/html")])
        return [b"<html>hello</html>"]

    http = make_server("127.0.0.1", 0, not_fleet)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{http.server_port}"
        result = invoke("--server", url, "--token", "fla_x", "task", "submit", "x")
    finally:
        http.shutdown()
    assert result.exit_code == ExitCode.GENERAL
    assert "something other than JSON" in result.stderr


def test_submit_refuses_two_prompts() -> None:
    result = invoke("--token", "t", "task", "submit", "x", "--prompt", "a", "--prompt-file", "-")
    assert result.exit_code == ExitCode.USAGE


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
