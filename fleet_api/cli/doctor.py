"""``fleet doctor``: check what a Fleet deployment depends on, from this machine.

Configuration, the database (reachable, schema at the newest migration), the broker, every
SSH host (reachable, host key known, key accepted), the worker serving each configured host,
the Forgejo token and the intake health of each repository. Prints one row per check (``ok``,
``warn``, ``fail`` or ``skip``) and exits 1 when any check fails. Every network check has a
short timeout, so a dead dependency costs seconds, not minutes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import click

from fleet_api.cli.context import CliState, config_option, pass_state
from fleet_api.cli.db import display_url
from fleet_api.cli.errors import ExitCode
from fleet_api.cli.output import Column, ago, column, print_json, print_table
from fleet_common.settings import ConfigError, Settings, load_settings

TIMEOUT_SECS = 5
OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str


def run_checks(settings: Settings) -> list[Check]:
    """Every check after the configuration, in the order they are shown."""
    checks = [_guard("database", lambda: _database(settings))]
    database_ok = checks[0].status == OK
    checks.append(_guard("broker", lambda: _broker(settings)))
    checks += _ssh_hosts(settings)
    checks += _workers(settings, database_ok)
    checks.append(_guard("forgejo", lambda: _forgejo(settings)))
    checks += _intake(settings, database_ok)
    return checks


def _guard(name: str, check: Callable[[], tuple[str, str]]) -> Check:
    try:
        status, detail = check()
    except Exception as error:  # a check that blows up is a failed check, not a traceback
        status, detail = FAIL, _first_line(error)
    return Check(name, status, detail)


def _first_line(error: BaseException) -> str:
    orig = getattr(error, "orig", None) or error
    return (str(orig).strip().splitlines() or [type(error).__name__])[0]


def _database(settings: Settings) -> tuple[str, str]:
    from alembic.script import ScriptDirectory

    from fleet_common import migrate
    from fleet_common.db import Database

    url = settings.database_url
    database = Database(url, pool_size=1)
    try:
        database.ping()
    finally:
        database.dispose()
    current = migrate.current_heads(url)
    expected = set(ScriptDirectory.from_config(migrate.alembic_config(url)).get_heads())
    where = display_url(url)
    if current != expected:
        have = ", ".join(sorted(current)) or "no schema"
        newest = ", ".join(sorted(expected))
        return FAIL, f"{where}: schema at {have}, newest is {newest}: run `fleet db upgrade`"
    return OK, f"{where}: schema at the newest migration"


def _broker(settings: Settings) -> tuple[str, str]:
    from kombu import Connection

    from fleet_worker.celery_app import broker_transport_options, broker_url

    url = broker_url(settings)
    options = broker_transport_options(settings)
    with Connection(url, transport_options=options, connect_timeout=TIMEOUT_SECS) as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, timeout=TIMEOUT_SECS)
    shown = url.split("@")[-1] if "@" in url else url
    return OK, f"{shown}: reachable"


def _ssh_hosts(settings: Settings) -> list[Check]:
    hosts = [host for host in settings.hosts if host.transport == "ssh"]
    if not hosts:
        return [Check("ssh", SKIP, "no ssh hosts configured")]
    from fleet_worker.executors.base import HostKeyError
    from fleet_worker.executors.ssh import connect

    checks = []
    for host in hosts:
        name = f"ssh {host.host_id}"
        where = f"{host.ssh_user}@{host.hostname}:{host.ssh_port}"
        quick = replace(host, connect_timeout_secs=min(host.connect_timeout_secs, TIMEOUT_SECS))
        try:
            connect(quick).close()
        except HostKeyError as error:
            checks.append(Check(name, FAIL, f"host key: {error}"))
        except Exception as error:
            checks.append(Check(name, FAIL, _first_line(error)))
        else:
            checks.append(Check(name, OK, f"{where}: connected, host key verified"))
    return checks


def _workers(settings: Settings, database_ok: bool) -> list[Check]:
    """Each configured host: which worker serves it (holds its lock), if any."""
    if not settings.hosts:
        return [Check("worker", SKIP, "no hosts configured")]
    if not database_ok:
        return [Check("worker", SKIP, "the database is not usable")]
    from fleet_common.db import Database
    from fleet_worker.host_lock import HostLock

    database = Database(settings.database_url, pool_size=1)
    checks = []
    try:
        for host in settings.hosts:
            name = f"worker {host.host_id}"
            holder = HostLock(database, host.host_id).holder()
            if holder is None:
                detail = f"no worker serves it (`fleet worker --host {host.host_id}`)"
                checks.append(Check(name, WARN, detail))
            else:
                checks.append(Check(name, OK, f"served by {holder}"))
    finally:
        database.dispose()
    return checks


def _forgejo(settings: Settings) -> tuple[str, str]:
    from fleet_common.forgejo.client import forgejo_client

    forgejo = settings.forgejo
    if not forgejo.enabled:
        return SKIP, "not configured ([forgejo] url is empty)"
    if not forgejo.token:
        return FAIL, f"{forgejo.url}: no token ([forgejo] token or FLEET_FORGEJO_TOKEN)"
    with forgejo_client(forgejo, timeout=TIMEOUT_SECS, retries=0) as client:
        login = str(client.get_authenticated_user().get("login") or "")
    if not forgejo.webhook_secret:
        return WARN, f"token of {login}; no webhook_secret: every webhook is refused (401)"
    if login.lower() != forgejo.bot_login.lower():
        return WARN, (
            f"the token belongs to {login}, but bot_login is {forgejo.bot_login}: "
            "the echoes of Fleet's own comments and labels will not be recognised"
        )
    return OK, f"{forgejo.url}: token of {login}"


def _intake(settings: Settings, database_ok: bool) -> list[Check]:
    if not settings.forgejo.enabled:
        return []
    if not database_ok:
        return [Check("intake", SKIP, "the database is not usable")]
    from fleet_common.db import Database
    from fleet_common.forgejo.health import intake_health

    database = Database(settings.database_url, pool_size=1)
    try:
        with database.session() as session:
            rows = intake_health(session, settings)
    finally:
        database.dispose()
    if not rows:
        return [Check("intake", WARN, "no repositories configured and no webhook received yet")]
    now = dt.datetime.now(dt.UTC)
    stale_after = dt.timedelta(seconds=3 * settings.forgejo.reconcile_interval_secs)
    checks = []
    for row in rows:
        seen = (
            f"last webhook {_ago(row.last_webhook_at, now)}, "
            f"last reconcile {_ago(row.last_reconcile_at, now)}"
        )
        status, detail = OK, seen
        if row.last_error_at and (
            row.last_reconcile_at is None or row.last_error_at >= row.last_reconcile_at
        ):
            status, detail = WARN, f"{seen}; error {_ago(row.last_error_at, now)}: {row.last_error}"
        elif row.configured and (
            row.last_reconcile_at is None or now - row.last_reconcile_at > stale_after
        ):
            status, detail = WARN, f"{seen}; reconcile is not running (is `fleet beat` up?)"
        elif row.last_webhook_at is None:
            status, detail = WARN, f"{seen}; no webhook received yet (is the webhook set up?)"
        checks.append(Check(f"intake {row.repo}", status, detail))
    return checks


def _ago(when: dt.datetime | None, now: dt.datetime) -> str:
    return "never" if when is None else ago(when.isoformat(), now)


COLUMNS: list[Column] = [
    column("name", "CHECK", max_width=40),
    column("status", "STATUS", max_width=6),
    column("detail", "DETAIL", max_width=160),
]


@click.command("doctor")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@pass_state
def doctor_command(state: CliState, config: str | None, as_json: bool) -> None:
    """Check configuration, database, broker, SSH hosts, Forgejo and intake health.

    Exits 1 when any check fails (warnings do not).
    """
    try:
        settings = load_settings(config or state.config)
    except ConfigError as error:
        checks = [Check("config", FAIL, str(error))]
    else:
        source = settings.source or "embedded defaults and FLEET_* variables"
        checks = [Check("config", OK, source), *run_checks(settings)]
    if as_json:
        print_json([asdict(check) for check in checks])
    else:
        print_table([asdict(check) for check in checks], COLUMNS)
    if any(check.status == FAIL for check in checks):
        raise click.exceptions.Exit(ExitCode.GENERAL)
