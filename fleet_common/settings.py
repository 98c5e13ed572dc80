"""Settings: one TOML file, overridden by ``FLEET_*`` variables, validated once at start.

A bad value raises :class:`ConfigError` naming the key, so a process stops with a message a
person can act on. With no file at all the embedded default works: SQLite and kombu's
filesystem broker under ``./.fleet/``, one ``local`` host running the built-in ``demo`` agent.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = ".fleet"
DEMO_AGENT_TYPE = "demo"


class ConfigError(ValueError):
    """A setting is missing or has a bad value; ``key`` names it as a user writes it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class ServerSettings:
    bind: str = "127.0.0.1"
    port: int = 9090
    max_body_bytes: int = 1_048_576
    # Base URL the CLI and pull agents use to reach the API.
    public_url: str = ""


@dataclass(frozen=True)
class OrchestratorSettings:
    database_url: str = ""
    broker_url: str = ""
    state_dir: str = DEFAULT_STATE_DIR
    heartbeat_interval_secs: int = 10
    heartbeat_timeout_threshold: int = 3
    lease_secs: int = 60
    task_timeout_secs: int = 1800
    default_max_retries: int = 2
    retry_backoff_base_secs: int = 10
    retry_backoff_max_secs: int = 300
    relay_after_secs: int = 5
    sweep_interval_secs: int = 5
    sweep_batch_size: int = 200
    no_capable_agent_after_secs: int = 600
    max_requirements: int = 3
    max_log_bytes: int = 10_485_760
    log_retention_days: int = 30
    command_ttl_secs: int = 3600
    token_rotation_grace_secs: int = 300
    join_token_ttl_secs: int = 3600
    max_wait_secs: int = 30
    redact_patterns: tuple[str, ...] = ()
    secrets: tuple[str, ...] = ()
    worker_shutdown_grace_secs: int = 30
    #: Celery task events from the start (workers) and task-sent events (the API). Off, as in
    #: Celery: Flower switches the workers' on while it runs (its periodic ``enable_events``).
    task_events: bool = False

    @property
    def offline_after_secs(self) -> int:
        return self.heartbeat_interval_secs * self.heartbeat_timeout_threshold


@dataclass(frozen=True)
class ForgejoSettings:
    url: str = ""
    token: str = ""
    webhook_secret: str = ""
    bot_login: str = "fleet-bot"
    trigger_label: str = "fleet"
    repos: tuple[str, ...] = ()
    reconcile_interval_secs: int = 300
    require_pr: bool = True
    delivery_retention_days: int = 14
    prompt_template: str = "{title}\n\n{body}"

    @property
    def enabled(self) -> bool:
        return bool(self.url)


@dataclass(frozen=True)
class AgentTypeSettings:
    name: str
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    timeout_secs: int | None = None
    upgrade_command: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgentSlotSettings:
    agent_type: str
    capabilities: tuple[str, ...] = ()
    max_concurrency: int = 1


@dataclass(frozen=True)
class HostSettings:
    host_id: str
    transport: str = "local"  # "local" or "ssh"
    hostname: str = "localhost"
    ssh_user: str = ""
    ssh_port: int = 22
    ssh_key_path: str = ""
    known_hosts: str = ""
    accept_unknown_host_key: bool = False
    work_dir: str = ""
    connect_timeout_secs: int = 10
    keepalive_secs: int = 15
    before_hook: tuple[str, ...] = ()
    after_hook: tuple[str, ...] = ()
    cleanup: str = "on_success"  # "always", "on_success" or "never"
    agents: tuple[AgentSlotSettings, ...] = ()


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    orchestrator: OrchestratorSettings = field(default_factory=OrchestratorSettings)
    forgejo: ForgejoSettings = field(default_factory=ForgejoSettings)
    hosts: tuple[HostSettings, ...] = ()
    agent_types: Mapping[str, AgentTypeSettings] = field(default_factory=dict)
    source: str = ""  # the file the settings came from, "" for the embedded default

    @property
    def state_dir(self) -> Path:
        return Path(self.orchestrator.state_dir)

    @property
    def database_url(self) -> str:
        return self.orchestrator.database_url

    @property
    def broker_url(self) -> str:
        return self.orchestrator.broker_url

    def host(self, host_id: str) -> HostSettings:
        for host in self.hosts:
            if host.host_id == host_id:
                return host
        raise ConfigError("hosts", f"no host with host_id {host_id!r}")


_SCALAR_SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "orchestrator": OrchestratorSettings,
    "forgejo": ForgejoSettings,
}
_SHORT_ENV = {
    "FLEET_DATABASE_URL": ("orchestrator", "database_url"),
    "FLEET_BROKER_URL": ("orchestrator", "broker_url"),
    "FLEET_FORGEJO_TOKEN": ("forgejo", "token"),
    "FLEET_FORGEJO_WEBHOOK_SECRET": ("forgejo", "webhook_secret"),
}
_POSITIVE = {
    "heartbeat_interval_secs",
    "heartbeat_timeout_threshold",
    "lease_secs",
    "task_timeout_secs",
    "retry_backoff_base_secs",
    "retry_backoff_max_secs",
    "relay_after_secs",
    "sweep_interval_secs",
    "sweep_batch_size",
    "max_requirements",
    "max_log_bytes",
    "log_retention_days",
    "command_ttl_secs",
    "join_token_ttl_secs",
    "max_body_bytes",
    "reconcile_interval_secs",
    "delivery_retention_days",
    "no_capable_agent_after_secs",
}


def builtin_demo_agent_type() -> AgentTypeSettings:
    """The ``demo`` agent: needs no model or network (see ``fleet_worker.demo_agent``)."""
    return AgentTypeSettings(
        name=DEMO_AGENT_TYPE,
        command=("{python}", "-m", "fleet_worker.demo_agent", "{prompt_file}"),
        timeout_secs=300,
    )


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Load and validate settings: ``overrides`` (flags), then environment, file, defaults."""
    env = os.environ if env is None else env
    path = path or env.get("FLEET_CONFIG") or None
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError("FLEET_CONFIG", f"no such file: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    unknown = set(raw) - {*_SCALAR_SECTIONS, "hosts", "agent_types"}
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown section")

    sections: dict[str, Any] = {}
    for name, cls in _SCALAR_SECTIONS.items():
        values = dict(_table(raw, name))
        values.update(_env_values(name, cls, env))
        values.update((overrides or {}).get(name, {}))
        sections[name] = _build(name, cls, values)

    orch: OrchestratorSettings = sections["orchestrator"]
    state_dir = Path(orch.state_dir)
    if not orch.database_url:
        orch = replace(orch, database_url=f"sqlite:///{(state_dir / 'fleet.db').resolve()}")
    if not orch.broker_url:
        orch = replace(orch, broker_url="filesystem://")
    if orch.retry_backoff_max_secs < orch.retry_backoff_base_secs:
        raise ConfigError(
            "orchestrator.retry_backoff_max_secs", "must be >= retry_backoff_base_secs"
        )
    if orch.max_requirements > 6:
        raise ConfigError("orchestrator.max_requirements", "must be at most 6")
    for key in ("database_url",):
        url = getattr(orch, key)
        if not url.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:", "postgres:")):
            raise ConfigError(f"orchestrator.{key}", f"unsupported database URL {url!r}")

    agent_types = {DEMO_AGENT_TYPE: builtin_demo_agent_type()}
    agent_types.update(_agent_types(_table(raw, "agent_types")))
    hosts = _hosts(raw.get("hosts", []), agent_types, state_dir)
    if not hosts and path is None:
        hosts = (default_local_host(state_dir),)
    return Settings(
        server=sections["server"],
        orchestrator=orch,
        forgejo=sections["forgejo"],
        hosts=hosts,
        agent_types=agent_types,
        source=str(path or ""),
    )


def default_local_host(state_dir: Path) -> HostSettings:
    return HostSettings(
        host_id="local",
        transport="local",
        work_dir=str((state_dir / "work").resolve()),
        agents=(AgentSlotSettings(agent_type=DEMO_AGENT_TYPE, max_concurrency=4),),
    )


def _table(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(name, "must be a table")
    return value


def _env_values(section: str, cls: type, env: Mapping[str, str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for f in fields(cls):
        var = f"FLEET_{section.upper()}_{f.name.upper()}"
        if var in env:
            values[f.name] = env[var]
    for var, (sec, key) in _SHORT_ENV.items():
        if sec == section and var in env:
            values[key] = env[var]
    return values


def _coerce(key: str, value: Any, annotation: str) -> Any:
    """Convert a TOML or environment value to the field's type, or raise naming ``key``."""
    if annotation == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        }:
            return value.lower() in {"1", "true", "yes", "on"}
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if annotation == "int":
        if isinstance(value, bool):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if annotation == "str":
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}")
    if annotation.startswith("tuple[str"):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(key, f"expected a list of strings, got {value!r}")
    raise ConfigError(key, f"unsupported setting type {annotation}")


def _build(section: str, cls: type, values: Mapping[str, Any]) -> Any:
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{section}.{key}"
        if key not in known:
            raise ConfigError(full, "unknown key")
        value = _coerce(full, value, str(known[key].type))
        if key in _POSITIVE and value <= 0:
            raise ConfigError(full, f"must be a positive integer, got {value}")
        kwargs[key] = value
    if section == "server":
        port = kwargs.get("port", 9090)
        if not 0 < port < 65536:
            raise ConfigError("server.port", f"must be between 1 and 65535, got {port}")
    return cls(**kwargs)


def _agent_types(raw: Mapping[str, Any]) -> dict[str, AgentTypeSettings]:
    result: dict[str, AgentTypeSettings] = {}
    for name, table in raw.items():
        key = f"agent_types.{name}"
        if not isinstance(table, dict):
            raise ConfigError(key, "must be a table")
        unknown = set(table) - {"command", "env", "timeout_secs", "upgrade_command"}
        if unknown:
            raise ConfigError(f"{key}.{sorted(unknown)[0]}", "unknown key")
        command = _coerce(f"{key}.command", table.get("command"), "tuple[str, ...]")
        if isinstance(table.get("command"), str) or not command:
            raise ConfigError(f"{key}.command", "must be a non-empty list of arguments")
        env = table.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise ConfigError(f"{key}.env", "must be a table of strings")
        timeout = table.get("timeout_secs")
        if timeout is not None:
            timeout = _coerce(f"{key}.timeout_secs", timeout, "int")
            if timeout <= 0:
                raise ConfigError(f"{key}.timeout_secs", "must be a positive integer")
        upgrade = _coerce(
            f"{key}.upgrade_command", table.get("upgrade_command", []), "tuple[str, ...]"
        )
        result[name] = AgentTypeSettings(name, command, dict(env), timeout, upgrade)
    return result


def _hosts(
    raw: Any, agent_types: Mapping[str, AgentTypeSettings], state_dir: Path
) -> tuple[HostSettings, ...]:
    if not isinstance(raw, list):
        raise ConfigError("hosts", "must be an array of tables ([[hosts]])")
    known = {f.name: f for f in fields(HostSettings)}
    hosts: list[HostSettings] = []
    seen: set[str] = set()
    for index, table in enumerate(raw):
        where = f"hosts[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(where, "must be a table")
        kwargs: dict[str, Any] = {}
        for key, value in table.items():
            if key not in known:
                raise ConfigError(f"{where}.{key}", "unknown key")
            if key == "agents":
                continue
            kwargs[key] = _coerce(f"{where}.{key}", value, str(known[key].type))
        host_id = kwargs.get("host_id")
        if not host_id:
            raise ConfigError(f"{where}.host_id", "is required")
        if host_id in seen:
            raise ConfigError(f"{where}.host_id", f"duplicate host_id {host_id!r}")
        seen.add(host_id)
        if kwargs.get("transport", "local") not in {"local", "ssh"}:
            raise ConfigError(f"{where}.transport", "must be 'local' or 'ssh'")
        if kwargs.get("cleanup", "on_success") not in {"always", "on_success", "never"}:
            raise ConfigError(f"{where}.cleanup", "must be 'always', 'on_success' or 'never'")
        if kwargs.get("transport") == "ssh":
            for required in ("hostname", "ssh_user", "ssh_key_path"):
                if not kwargs.get(required):
                    raise ConfigError(f"{where}.{required}", "is required for transport 'ssh'")
        if not kwargs.get("work_dir"):
            kwargs["work_dir"] = str((state_dir / "work" / host_id).resolve())
        kwargs["agents"] = tuple(_slots(where, table.get("agents", []), agent_types))
        hosts.append(HostSettings(**kwargs))
    return tuple(hosts)


def _slots(
    where: str, raw: Any, agent_types: Mapping[str, AgentTypeSettings]
) -> list[AgentSlotSettings]:
    if not isinstance(raw, list):
        raise ConfigError(f"{where}.agents", "must be a list of tables")
    slots = []
    for index, slot in enumerate(raw):
        key = f"{where}.agents[{index}]"
        if not isinstance(slot, dict):
            raise ConfigError(key, "must be a table")
        unknown = set(slot) - {"agent_type", "capabilities", "max_concurrency"}
        if unknown:
            raise ConfigError(f"{key}.{sorted(unknown)[0]}", "unknown key")
        agent_type = slot.get("agent_type")
        if agent_type not in agent_types:
            raise ConfigError(f"{key}.agent_type", f"unknown agent type {agent_type!r}")
        caps = _coerce(f"{key}.capabilities", slot.get("capabilities", []), "tuple[str, ...]")
        conc = _coerce(f"{key}.max_concurrency", slot.get("max_concurrency", 1), "int")
        if conc <= 0:
            raise ConfigError(f"{key}.max_concurrency", "must be a positive integer")
        slots.append(AgentSlotSettings(str(agent_type), tuple(sorted(set(caps))), conc))
    return slots
