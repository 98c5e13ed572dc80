"""The local executor against real processes: streaming, isolation, timeout, cancel, death."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fleet_common.settings import HostSettings
from fleet_worker.executors.base import ExecResult, _supervise
from fleet_worker.executors.local import LocalExecutor
from fleet_worker.workspace import plan_run
from tests.executors.helpers import (
    TREE,
    TREE_READY,
    CancelFlag,
    Output,
    agent,
    pid_alive,
    wait_until,
)


def test_output_streams_while_the_process_runs(tmp_path: Path) -> None:
    # The command only exits once the test has seen its first line: buffering until exit
    # would deadlock into the timeout.
    go = tmp_path / "go"
    out = Output()
    out.when(b"ready", go.touch)
    result = LocalExecutor().execute(
        ["sh", "-c", f"echo ready; while [ ! -e {go} ]; do sleep 0.02; done; echo finished >&2"],
        on_output=out,
        timeout_secs=20,
    )
    assert result == ExecResult(0, duration_secs=result.duration_secs)
    assert out.text == "ready\nfinished\n"
    assert len(out.chunks) >= 2


def test_agent_gets_fleet_variables_and_nothing_else_of_the_worker(
    tmp_path: Path, local_host: HostSettings, monkeypatch
) -> None:
    monkeypatch.setenv("FLEET_FORGEJO_TOKEN", "worker-secret-value")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "also-secret")
    monkeypatch.setenv("LANG", "C.UTF-8")
    dump = "import json, os; print('ENV=' + json.dumps(dict(os.environ)))"
    spec = plan_run(
        local_host,
        agent("{python}", "-c", dump, env={"AGENT_SETTING": "on"}),
        task_id="t-env",
        prompt="hello",
    )
    out = Output()
    result = LocalExecutor().run(spec, out)
    assert result.succeeded, (result, out.text)
    env = json.loads(out.value("ENV"))
    workspace = str(tmp_path / "work" / "t-env")
    assert env["FLEET_TASK_ID"] == "t-env"
    assert env["FLEET_WORKSPACE"] == workspace
    assert env["FLEET_RECEIPT_PATH"] == f"{workspace}/.fleet/receipt.json"
    assert env["FLEET_BRANCH"] == ""
    assert len(env["FLEET_TRACKING_ID"]) == 16  # the worker's: its reaper kills what has it
    assert env["AGENT_SETTING"] == "on"
    assert env["PATH"] == os.environ["PATH"]
    assert env["LANG"] == "C.UTF-8"
    assert "FLEET_FORGEJO_TOKEN" not in env
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert set(env) - {"PWD", "SHLVL", "_", "LC_CTYPE"} == {
        "FLEET_TASK_ID",
        "FLEET_WORKSPACE",
        "FLEET_RECEIPT_PATH",
        "FLEET_BRANCH",
        "FLEET_REPO",
        "FLEET_ISSUE_NUMBER",
        "FLEET_TRACKING_ID",
        "AGENT_SETTING",
        "PATH",
        "HOME",
        "LANG",
    }


def test_timeout_kills_the_whole_tree() -> None:
    out = Output()
    result = LocalExecutor().execute(["sh", "-c", TREE], on_output=out, timeout_secs=1)
    assert result.timed_out and not result.cancelled
    assert 1 <= result.duration_secs < 5
    pids = [int(out.value("child")), int(out.value("grandchild"))]
    wait_until(lambda: not any(map(pid_alive, pids)), 5, f"{pids} to die")


def test_cancel_stops_a_process_that_ignores_sigterm_within_5_seconds() -> None:
    cancel = CancelFlag()
    out = Output()
    out.when(TREE_READY, cancel.set)
    script = f"trap '' TERM; {TREE}"
    result = LocalExecutor().execute(
        ["sh", "-c", script], on_output=out, should_cancel=cancel, timeout_secs=60
    )
    assert result.cancelled and not result.timed_out
    assert cancel.set_at is not None
    assert time.monotonic() - cancel.set_at < 5
    assert result.exit_code == 128 + signal.SIGKILL
    pids = [int(out.value("child")), int(out.value("grandchild"))]
    wait_until(lambda: not any(map(pid_alive, pids)), 5, f"{pids} to die")


def test_stragglers_holding_the_output_are_killed_when_the_main_process_exits() -> None:
    out = Output()
    result = LocalExecutor().execute(
        ["sh", "-c", "sleep 300 & echo bg=$!; exit 4"], on_output=out, timeout_secs=30
    )
    assert result.exit_code == 4 and not result.timed_out
    assert result.duration_secs < 5
    wait_until(lambda: not pid_alive(int(out.value("bg"))), 5, "the straggler to die")


def test_a_missing_command_fails_like_a_shell_would() -> None:
    out = Output()
    result = LocalExecutor().execute(["fleet-no-such-command"], on_output=out)
    assert result.exit_code == 127
    assert "cannot start 'fleet-no-such-command'" in out.text


def test_a_program_removed_after_its_first_run_is_searched_for_again(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, word in ((first, "first"), (second, "second")):
        folder.mkdir()
        (folder / "fleet-hello").write_text(f"#!/bin/sh\necho {word}\n")
        (folder / "fleet-hello").chmod(0o755)
    path = f"{first}:{second}:{os.environ['PATH']}"
    runs = []
    for _ in range(2):
        out = Output()
        LocalExecutor().execute(["fleet-hello"], env={"PATH": path}, on_output=out)
        runs.append(out.text)
        (first / "fleet-hello").unlink(missing_ok=True)
    assert runs == ["first\n", "second\n"]


def test_a_child_survives_the_thread_that_started_it() -> None:
    executor = LocalExecutor()
    handles = []
    starter = threading.Thread(
        target=lambda: handles.append(
            executor.start(["sh", "-c", "sleep 0.3; echo alive"], cwd=None, env={})
        )
    )
    starter.start()
    starter.join()
    out = Output()
    result = _supervise(handles[0], time.monotonic(), 20, 2.0, out, lambda: False, None)
    handles[0].close()
    assert (result.exit_code, out.text) == (0, "alive\n")


#: A worker that starts ``sys.argv[1]`` (a shell command), prints ``ready`` and waits to be
#: killed. ``unwatched``: it dies before it could name the agent's group to the reaper.
#: ``forked``: it has forked a child (as Celery's prefork pool does) that outlives it.
#: ``reaper-died``: its reaper was killed after the first agent.
WORKER = textwrap.dedent(
    """
    import os, sys, time
    from fleet_worker.executors import local
    from fleet_worker.executors.local import LocalExecutor

    if "unwatched" in sys.argv:
        local._REAPER_PROCESS.watch = lambda pgid: None
    executor = LocalExecutor()
    done = executor.start(["sh", "-c", "true"], cwd=None, env={})
    while done.wait(0.1) is None:
        pass
    done.close()  # forgotten by the reaper: its group id may be reused
    if "reaper-died" in sys.argv:  # the next start finds out and starts another
        reaper = local._REAPER_PROCESS._popen
        reaper.kill()
        reaper.wait()
    if "forked" in sys.argv:
        child = os.fork()
        if child == 0:
            time.sleep(300)
            os._exit(0)
        sys.stdout.write(f"forked={child}\\n")
    for _ in range(2):  # one reaper watches both groups
        executor.start(["sh", "-c", sys.argv[1]], cwd=None, env={})
    sys.stdout.write("ready\\n")
    sys.stdout.flush()
    time.sleep(300)
    """
)


@pytest.mark.parametrize(
    ("command", "how"),
    [
        ("exec sleep 300", ""),  # the agent itself
        ("sleep 300 & wait", ""),  # its children, in its group
        ("setsid sleep 300 & wait", ""),  # a child that left the group
        ("exec sleep 300", "unwatched"),  # an agent started just before the worker died
        ("exec sleep 300", "forked"),  # a worker's forked child holds no reaper pipe
        ("sleep 300 & wait", "reaper-died"),  # the reaper was killed before these started
    ],
    ids=["agent", "children", "setsid-child", "unwatched-agent", "forked-worker", "new-reaper"],
)
def test_a_sigkilled_worker_leaves_nothing_behind(command: str, how: str) -> None:
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, command, how], stdout=subprocess.PIPE, text=True
    )
    forked: list[int] = []
    try:
        assert worker.stdout is not None
        line = worker.stdout.readline()
        if line.startswith("forked="):
            forked.append(int(line.split("=")[1]))
            line = worker.stdout.readline()
        assert line == "ready\n"
        sleeps = _sleeps_under(worker.pid)
        assert len(sleeps) == 2, sleeps
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        wait_until(lambda: not any(map(pid_alive, sleeps)), 5, f"{sleeps} to die")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        for pid in forked:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _sleeps_under(root: int) -> list[int]:
    """The ``sleep 300`` processes among ``root``'s descendants."""
    found: list[int] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(found) < 2:
        tree = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True)
        parents: dict[int, int] = {}
        args: dict[int, str] = {}
        for row in tree.stdout.splitlines():
            pid, ppid, *rest = row.split(None, 2)
            parents[int(pid)] = int(ppid)
            args[int(pid)] = rest[0] if rest else ""
        found = []
        for pid, command in args.items():
            up = parents.get(pid, 0)
            while up not in (0, 1, root):
                up = parents.get(up, 0)
            if up == root and command == "sleep 300":
                found.append(pid)
        time.sleep(0.1)
    return found
