"""``fleet doctor``: a table of checks, and a non-zero exit when one fails."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from fleet_api.cli import main
from fleet_common.db import Database, utcnow
from fleet_common.forgejo import health
from fleet_common.migrate import upgrade
from fleet_worker.host_lock import HostLock
from tests.fakes.forgejo import FakeForgejo
from tests.services import free_port


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("FLEET_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def doctor(*args: str) -> Result:
    return CliRunner().invoke(main, ["doctor", *args], catch_exceptions=False)


def write_config(tmp_path: Path, fake: FakeForgejo, extra: str = "", **forgejo: str) -> Path:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    upgrade(url)
    values = {"url": fake.url, "token": fake.token, "webhook_secret": "test-secret", **forgejo}
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())
    config = tmp_path / "fleet.toml"
    state_dir = json.dumps(str(tmp_path / "state"))
    config.write_text(
        f"[orchestrator]\ndatabase_url = {json.dumps(url)}\nstate_dir = {state_dir}\n\n"
        f'[forgejo]\n{lines}\nrepos = ["alice/widgets"]\n{extra}'
    )
    return config


def rows(result: Result) -> dict[str, tuple[str, str]]:
    """CHECK → (STATUS, DETAIL) from the table."""
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["CHECK", "STATUS", "DETAIL"], result.stdout
    status_at = lines[0].index("STATUS")
    detail_at = lines[0].index("DETAIL")
    return {
        line[:status_at].strip(): (line[status_at:detail_at].strip(), line[detail_at:].strip())
        for line in lines[1:]
    }


def test_doctor_reports_every_check_and_exits_0_when_nothing_fails(tmp_path: Path) -> None:
    with FakeForgejo() as fake:
        fake.add_repo("alice", "widgets")
        config = write_config(tmp_path, fake)
        database = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
        with database.session() as session:
            health.touch(
                session, "alice/widgets", last_webhook_at=utcnow(), last_reconcile_at=utcnow()
            )
        database.dispose()
        result = doctor("--config", str(config))
    assert result.exit_code == 0, result.output
    table = rows(result)
    assert table["config"] == ("ok", str(config))
    assert table["database"][0] == "ok" and "newest migration" in table["database"][1]
    assert table["broker"][0] == "ok"
    assert table["ssh"][0] == "skip"
    assert table["worker"][0] == "skip"  # no [[hosts]]
    assert table["forgejo"] == ("ok", f"{fake.url}: token of fleet-bot")
    assert table["intake alice/widgets"][0] == "ok"


def test_doctor_fails_on_an_unreachable_ssh_host_and_warns_on_intake(tmp_path: Path) -> None:
    host = f"""
[[hosts]]
host_id = "build-01"
transport = "ssh"
hostname = "127.0.0.1"
ssh_port = {free_port()}
ssh_user = "agent"
ssh_key_path = "{tmp_path / "id_ed25519"}"
known_hosts = "{tmp_path / "known_hosts"}"
connect_timeout_secs = 2
agents = [ {{ agent_type = "demo" }} ]
"""
    with FakeForgejo(bot_login="someone-else") as fake:
        config = write_config(tmp_path, fake, extra=host)
        result = doctor("--config", str(config), "--json")
    assert result.exit_code == 1, result.output
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["ssh build-01"]["status"] == "fail"
    assert "cannot connect" in checks["ssh build-01"]["detail"]
    assert checks["forgejo"]["status"] == "warn"  # the token is not bot_login's
    assert checks["intake alice/widgets"]["status"] == "warn"  # nothing has run yet
    assert "reconcile is not running" in checks["intake alice/widgets"]["detail"]


def test_doctor_fails_on_a_database_without_schema_and_a_dead_forgejo(tmp_path: Path) -> None:
    with FakeForgejo() as fake:
        config = write_config(tmp_path, fake)
    (tmp_path / "fleet.db").unlink()  # and Forgejo is stopped too
    result = doctor("--config", str(config))
    assert result.exit_code == 1
    table = rows(result)
    assert table["database"][0] == "fail" and "fleet db upgrade" in table["database"][1]
    assert table["forgejo"][0] == "fail"
    assert table["intake"][0] == "skip"


def test_doctor_names_the_worker_serving_each_host(tmp_path: Path) -> None:
    hosts = "".join(
        f'\n[[hosts]]\nhost_id = "{name}"\ntransport = "local"\n'
        f'work_dir = "{tmp_path / name}"\nagents = [ {{ agent_type = "demo" }} ]\n'
        for name in ("served", "idle")
    )
    with FakeForgejo() as fake:
        config = write_config(tmp_path, fake, extra=hosts)
        database = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
        lock = HostLock(database, "served")  # as the worker of host "served" holds it
        lock.acquire()
        try:
            result = doctor("--config", str(config), "--json")
        finally:
            lock.release()
            database.dispose()
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["worker served"] == {
        "name": "worker served",
        "status": "ok",
        "detail": f"served by {lock.name}",
    }
    assert checks["worker idle"]["status"] == "warn"
    assert "no worker serves it (`fleet worker --host idle`)" in checks["worker idle"]["detail"]


def test_doctor_names_a_bad_setting(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[forgejo]\nreconcile_interval_secs = 0\n")
    result = doctor("--config", str(config))
    assert result.exit_code == 1
    assert rows(result)["config"] == (
        "fail",
        "forgejo.reconcile_interval_secs: must be a positive integer, got 0",
    )
