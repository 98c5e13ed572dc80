"""Settings: the TOML shape, FLEET_* overrides, and validation that names the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_common.settings import ConfigError, load_settings

FULL = """
[server]
bind = "0.0.0.0"
port = 9191

[orchestrator]
database_url = "postgresql://fleet@db/fleet"
broker_url = "redis://redis:6379/0"
heartbeat_interval_secs = 5
lease_secs = 30

[forgejo]
url = "https://git.example.com"
token = "secret"
webhook_secret = "hook"
repos = ["acme/rocket"]
delivery_retention_days = 7

[agent_types.codex]
command = ["codex", "exec", "--cd", "{workspace}", "{prompt_file}"]
env = { CODEX_HOME = "/opt/codex" }
timeout_secs = 900

[[hosts]]
host_id = "build-01"
transport = "ssh"
hostname = "10.0.0.5"
ssh_user = "agent"
ssh_key_path = "/etc/fleet/id_ed25519"
known_hosts = "/etc/fleet/known_hosts"
work_dir = "/srv/fleet/work"
agents = [ { agent_type = "codex", max_concurrency = 2, capabilities = ["tests", "code:python"] } ]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


def test_embedded_default_needs_no_file(tmp_path: Path) -> None:
    settings = load_settings(env={"FLEET_ORCHESTRATOR_STATE_DIR": str(tmp_path / "s")})
    assert settings.database_url.startswith("sqlite:///")
    assert settings.database_url.endswith("/s/fleet.db")
    assert settings.broker_url == "filesystem://"
    assert [h.host_id for h in settings.hosts] == ["local"]
    assert settings.hosts[0].agents[0].agent_type == "demo"
    assert "demo" in settings.agent_types
    assert settings.server.port == 9090


def test_full_file_is_read(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, FULL), env={})
    assert settings.server.port == 9191
    assert settings.orchestrator.lease_secs == 30
    assert settings.orchestrator.offline_after_secs == 15
    assert settings.forgejo.repos == ("acme/rocket",)
    assert settings.forgejo.delivery_retention_days == 7
    host = settings.host("build-01")
    assert host.transport == "ssh"
    assert host.agents[0].capabilities == ("code:python", "tests")
    assert settings.agent_types["codex"].env == {"CODEX_HOME": "/opt/codex"}
    # A file that configures hosts gets no implicit local host.
    assert [h.host_id for h in settings.hosts] == ["build-01"]


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    env = {
        "FLEET_ORCHESTRATOR_LEASE_SECS": "45",
        "FLEET_SERVER_PORT": "7000",
        "FLEET_DATABASE_URL": "sqlite:///x.db",
        "FLEET_FORGEJO_WEBHOOK_SECRET": "from-env",
    }
    settings = load_settings(path, env=env, overrides={"server": {"port": 7001}})
    assert settings.orchestrator.lease_secs == 45  # env over file
    assert settings.server.port == 7001  # flag over env
    assert settings.database_url == "sqlite:///x.db"  # short form
    assert settings.forgejo.webhook_secret == "from-env"
    assert settings.orchestrator.heartbeat_interval_secs == 5  # file over default
    assert settings.orchestrator.retry_backoff_base_secs == 10  # default


def test_config_path_from_environment(tmp_path: Path) -> None:
    settings = load_settings(env={"FLEET_CONFIG": str(write(tmp_path, FULL))})
    assert settings.server.port == 9191


@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        ("[orchestrator]\nlease_secs = 'soon'\n", {}, "orchestrator.lease_secs"),
        ("[orchestrator]\nlease_secs = -1\n", {}, "orchestrator.lease_secs"),
        ("[orchestrator]\nleese_secs = 5\n", {}, "orchestrator.leese_secs"),
        ("", {"FLEET_ORCHESTRATOR_LEASE_SECS": "ten"}, "orchestrator.lease_secs"),
        ("", {"FLEET_SERVER_PORT": "70000"}, "server.port"),
        ("[forgejo]\nrequire_pr = 'maybe'\n", {}, "forgejo.require_pr"),
        ("[forgejo]\ndelivery_retention_days = 0\n", {}, "forgejo.delivery_retention_days"),
        ("", {"FLEET_FORGEJO_DELIVERY_RETENTION_DAYS": "-3"}, "forgejo.delivery_retention_days"),
        ("[orchestrator]\ndatabase_url = 'mysql://x'\n", {}, "orchestrator.database_url"),
        ("[serverr]\n", {}, "serverr"),
        ("[[hosts]]\ntransport = 'local'\n", {}, "hosts[0].host_id"),
        ("[[hosts]]\nhost_id = 'a'\ntransport = 'telnet'\n", {}, "hosts[0].transport"),
        ("[[hosts]]\nhost_id = 'a'\ntransport = 'ssh'\n", {}, "hosts[0].hostname"),
        (
            "[[hosts]]\nhost_id = 'a'\nagents = [{agent_type = 'nope'}]\n",
            {},
            "hosts[0].agents[0].agent_type",
        ),
        (
            "[[hosts]]\nhost_id = 'a'\n[[hosts]]\nhost_id = 'a'\n",
            {},
            "hosts[1].host_id",
        ),
        ("[agent_types.x]\ncommand = 'codex exec'\n", {}, "agent_types.x.command"),
        ("[agent_types.x]\ncommand = ['x']\nshell = true\n", {}, "agent_types.x.shell"),
        (
            "[orchestrator]\nretry_backoff_base_secs = 100\nretry_backoff_max_secs = 10\n",
            {},
            "orchestrator.retry_backoff_max_secs",
        ),
    ],
)
def test_bad_values_name_their_key(
    tmp_path: Path, text: str, env: dict[str, str], key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), env=env)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "absent.toml", env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[server\nport = 1"), env={})
