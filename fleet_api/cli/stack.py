"""``fleet up`` (API + a worker per configured host + beat, in one command), ``fleet worker``
and ``fleet flower``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from fleet_api.cli.context import CliState, config_option, pass_state
from fleet_api.cli.db import upgrade_database
from fleet_common.auth import service as auth
from fleet_common.auth.models import TokenKind
from fleet_common.db import Database
from fleet_common.settings import Settings

STOP_GRACE_SECS = 40


def ensure_admin_token(settings: Settings) -> Path:
    """Write ``<state_dir>/admin-token`` (mode 0600) on the first run, so the CLI in this folder
    needs no token handling."""
    path = settings.state_dir / "admin-token"
    if path.exists() and path.read_text().strip():
        return path
    db = Database(settings.database_url, pool_size=1)
    try:
        with db.session() as session:
            _, secret = auth.mint(session, TokenKind.ADMIN, actor="fleet-up", name="fleet up")
    finally:
        db.dispose()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    return path


def _child(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "fleet_api.cli", *args])


@click.command("up")
@click.option(
    "--port", type=click.IntRange(1, 65535), help="API port (default: server.port, 9090)."
)
@config_option
@pass_state
def up_command(state: CliState, port: int | None, config: str | None) -> None:
    """API + a worker for each configured host (the built-in `local` one by default) + beat."""
    overrides = {"port": port} if port else {}
    settings = state.settings(config, server=overrides)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    upgrade_database(settings)
    token_file = ensure_admin_token(settings)
    config_file = config or state.config
    config_args = ["--config", config_file] if config_file else []
    api_args = ["api", "--port", str(settings.server.port), "--bind", settings.server.bind]
    children = [_child([*api_args, "--workers", "1", *config_args]), _child(["beat", *config_args])]
    children += [_child(["worker", "--host", h.host_id, *config_args]) for h in settings.hosts]
    url = f"http://{settings.server.bind}:{settings.server.port}"
    click.echo(
        f"Fleet is starting: API {url} (docs {url}/docs), {len(settings.hosts)} worker(s), beat.\n"
        f"Admin token: {token_file} (the CLI in this folder uses it).\n"
        f'Try: fleet task submit "Say hello" --prompt "Write a greeting"   (Ctrl-C stops Fleet)',
        err=True,
    )
    raise SystemExit(_supervise(children))


def _supervise(children: list[subprocess.Popen[bytes]]) -> int:
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    while not stopping:
        for child in children:
            if child.poll() is not None:
                click.echo(
                    f"fleet up: a process exited with {child.returncode}; stopping", err=True
                )
                code, stopping = 1, True
        time.sleep(0.2)
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECS
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
    return code


@click.command("worker")
@click.option(
    "--host",
    "host_id",
    help="The configured host to serve (default: the only one, or this machine's name).",
)
@click.option("--loglevel", default="INFO", show_default=True)
@config_option
@pass_state
def worker_command(state: CliState, host_id: str | None, loglevel: str, config: str | None) -> None:
    """Run a Celery worker serving one host: its capability queues, its agents' heartbeats."""
    settings = state.settings(config)
    from fleet_worker.worker import run_worker

    raise SystemExit(run_worker(settings, host_id, loglevel=loglevel))


@click.command("flower")
@click.option("--port", type=click.IntRange(1, 65535), default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True)
@config_option
@pass_state
def flower_command(state: CliState, port: int, address: str, config: str | None) -> None:
    """Run Flower (Celery's monitor) on Fleet's broker."""
    settings = state.settings(config)
    from fleet_worker.celery_app import make_celery

    make_celery(settings).start(argv=["flower", f"--port={port}", f"--address={address}"])
