"""``fleet api`` as people run it: migrations first, then gunicorn with threaded workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

import fleet_api
from tests.cli.conftest import invoke

REPO = Path(fleet_api.__path__[0]).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def api_process(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    port = _free_port()
    env = {
        **os.environ,
        "FLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'fleet.db'}",
        "FLEET_ORCHESTRATOR_STATE_DIR": str(tmp_path / "state"),
    }
    command = "from fleet_api.cli import main; main()"
    process = subprocess.Popen(
        [sys.executable, "-c", command, "api", "--port", str(port), "--workers", "1"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()  # read its output only once it has stopped: a live pipe never ends
                _, err = process.communicate(timeout=30)
                pytest.fail(f"fleet api did not start: {err}")
            time.sleep(0.1)
        yield url, env
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def test_fleet_api_migrates_serves_and_long_polls_block_nothing(
    api_process: tuple[str, dict[str, str]],
) -> None:
    url, env = api_process
    cli_env = {"FLEET_DATABASE_URL": env["FLEET_DATABASE_URL"], "FLEET_SERVER": url}
    token = invoke("admin-token", "create", "--name", "t", env=cli_env).stdout.strip()
    cli_env["FLEET_TOKEN"] = token

    join = invoke("join-token", "create", env=cli_env).stdout.strip()
    agent_token = requests.post(
        f"{url}/api/v1/agents/register",
        json={"join_token": join, "name": "poller", "host_uid": uuid.uuid4().hex},
        timeout=5,
    ).json()["agent_token"]

    def long_poll() -> None:
        requests.post(
            f"{url}/api/v1/tasks/dequeue",
            json={"wait_secs": 2},
            headers={"Authorization": f"Bearer {agent_token}"},
            timeout=10,
        )

    poller = threading.Thread(target=long_poll)
    poller.start()
    time.sleep(0.2)
    started = time.monotonic()
    listed = invoke("agents", "list", env=cli_env)
    elapsed = time.monotonic() - started
    poller.join()
    assert listed.exit_code == 0, listed.stderr
    assert "poller" in listed.stdout
    assert elapsed < 2, "a waiting long-poll blocked another request"


def test_threads_per_worker_default_to_room_for_long_polls_and_can_be_set() -> None:
    from fleet_api.cli.processes import THREADS_PER_WORKER, gunicorn_options
    from fleet_common.settings import load_settings

    settings = load_settings(None, env={})
    assert gunicorn_options(settings, 2)["threads"] == THREADS_PER_WORKER == 32
    options = gunicorn_options(settings, 3, 8)
    assert (options["workers"], options["threads"], options["worker_class"]) == (3, 8, "gthread")


def test_a_worker_freezes_what_it_built_to_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    import fleet_api.app
    from fleet_api.cli.processes import ApiServer
    from fleet_common.settings import load_settings

    built = object()
    monkeypatch.setattr(fleet_api.app, "create_app", lambda settings: built)
    server = ApiServer.__new__(ApiServer)  # load() alone, as a gunicorn worker calls it
    server.settings = load_settings(env={})
    try:
        assert server.load() is built
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
