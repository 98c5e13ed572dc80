"""Long-running processes: ``fleet api`` (gunicorn) and ``fleet beat`` (Celery beat)."""

from __future__ import annotations

import gc
from typing import Any

import click
from gunicorn.app.base import BaseApplication

from fleet_api.cli.context import CliState, config_option, pass_state
from fleet_api.cli.db import upgrade_database
from fleet_common.settings import Settings

# Each waiting long-poll (`POST /tasks/dequeue`, up to 30 s) holds a thread: keep plenty.
THREADS_PER_WORKER = 32
DEFAULT_WORKERS = 2


class ApiServer(BaseApplication):
    """gunicorn serving ``create_app(settings)``; each worker process builds its own app
    (and so its own database engine) after the fork."""

    def __init__(self, settings: Settings, options: dict[str, Any]) -> None:
        self.settings = settings
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in self.cfg.settings:  # settings newer than the installed gunicorn: skip
                self.cfg.set(key, value)

    def load(self) -> Any:
        from fleet_api.app import create_app

        app = create_app(self.settings)
        # What the worker built to serve (modules, the app, schemas, mappers: ~150,000
        # objects) lives as long as it does: out of the collector's sight, a full collection
        # no longer walks it all while every request of the worker waits (~100 ms each).
        gc.collect()
        gc.freeze()
        return app


def gunicorn_options(
    settings: Settings, workers: int, threads: int = THREADS_PER_WORKER
) -> dict[str, Any]:
    """gunicorn settings for the API: threaded workers so long-polls block nobody."""
    host = settings.server.bind
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return {
        "bind": f"{host}:{settings.server.port}",
        "workers": workers,
        "worker_class": "gthread",
        "threads": threads,
        # gthread's timeout watches the worker process, not a request: 60 s is ample.
        "timeout": 60,
        "graceful_timeout": 35,
        "keepalive": 5,
        "proc_name": "fleet-api",
        "errorlog": "-",
        # gunicorn >= 25.1 opens a control socket at one fixed path per user by default;
        # a second `fleet api` on the machine would fight over it.
        "control_socket_disable": True,
    }


@click.command("api")
@click.option("--bind", help="Address to listen on (default: server.bind, 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), help="Port (default: server.port, 9090).")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=DEFAULT_WORKERS,
    show_default=True,
    help="Worker processes (one per core suits the API's Python work).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=THREADS_PER_WORKER,
    show_default=True,
    help="Threads per worker: each waiting long-poll dequeue (up to 30 s) holds one.",
)
@click.option("--access-log", is_flag=True, help="Log every request to stderr.")
@config_option
@pass_state
def api_command(
    state: CliState,
    bind: str | None,
    port: int | None,
    workers: int,
    threads: int,
    access_log: bool,
    config: str | None,
) -> None:
    """Run the REST API (gunicorn), after bringing the database schema up to date."""
    server = {key: value for key, value in (("bind", bind), ("port", port)) if value}
    settings = state.settings(config, server=server)
    upgrade_database(settings)
    options = gunicorn_options(settings, workers, threads)
    if access_log:
        options["accesslog"] = "-"
    ApiServer(settings, options).run()


@click.command("beat")
@click.option(
    "--loglevel",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
@config_option
@pass_state
def beat_command(state: CliState, loglevel: str, config: str | None) -> None:
    """Run Celery beat: the heartbeat, timeout, lease, relay and reconcile sweeps."""
    settings = state.settings(config)
    from fleet_worker.celery_app import run_beat

    code = run_beat(settings, loglevel=loglevel.upper())
    if code:
        raise click.exceptions.Exit(code)
