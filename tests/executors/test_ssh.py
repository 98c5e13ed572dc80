"""The SSH executor against a real sshd on loopback (the remote host is this machine)."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_worker.executors.base import ExecResult, ExecutorError, HostKeyError
from fleet_worker.executors.ssh import SSHExecutor
from fleet_worker.workspace import plan_run
from tests.executors.helpers import (
    TREE,
    TREE_READY,
    CancelFlag,
    Output,
    agent,
    demo_agent,
    git,
    pid_alive,
    wait_until,
)
from tests.sshd import SSHServer, require_sshd, running_sshd

pytestmark = pytest.mark.sshd


@pytest.fixture
def executor(sshd_server: SSHServer, tmp_path: Path) -> Iterator[SSHExecutor]:
    ssh = SSHExecutor(sshd_server.host_settings(work_dir=str(tmp_path / "remote-work")))
    yield ssh
    ssh.close()


def tree_pids(out: Output) -> list[int]:
    return [int(out.value("child")), int(out.value("grandchild"))]


def test_output_streams_while_the_remote_command_runs(
    executor: SSHExecutor, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    out = Output()
    out.when(b"ready", go.touch)
    result = executor.execute(
        ["sh", "-c", f"echo ready; while [ ! -e {go} ]; do sleep 0.02; done; echo finished >&2"],
        on_output=out,
        timeout_secs=20,
    )
    assert (result.exit_code, result.timed_out, result.error) == (0, False, None)
    assert out.text == "ready\nfinished\n"


def test_arguments_environment_and_cwd_arrive_intact(executor: SSHExecutor, tmp_path: Path) -> None:
    tricky = ["a b", "$HOME", "it's", '"q"', "; touch /tmp/fleet-pwned", "*", "\\n"]
    out = Output()
    result = executor.execute(
        ["sh", "-c", 'printf "%s|" "$@"; echo; echo "X=$X"; pwd', "sh", *tricky],
        on_output=out,
        cwd=str(tmp_path),
        env={"X": "v'a\"l $y `z`"},
    )
    assert result.exit_code == 0
    assert out.text == "|".join(tricky) + "|\n" + "X=v'a\"l $y `z`\n" + f"{tmp_path}\n"


def test_timeout_kills_the_remote_process_tree(executor: SSHExecutor) -> None:
    out = Output()
    result = executor.execute(["sh", "-c", TREE], on_output=out, timeout_secs=1)
    assert result.timed_out
    assert result.duration_secs < 6
    pids = tree_pids(out)
    wait_until(lambda: not any(map(pid_alive, pids)), 10, f"remote {pids} to die")


def test_cancel_kills_a_remote_tree_that_ignores_sigterm_within_5_seconds(
    executor: SSHExecutor,
) -> None:
    cancel = CancelFlag()
    out = Output()
    out.when(TREE_READY, cancel.set)
    result = executor.execute(
        ["sh", "-c", f"trap '' TERM; {TREE}"], on_output=out, should_cancel=cancel, timeout_secs=60
    )
    assert result.cancelled
    assert cancel.set_at is not None and time.monotonic() - cancel.set_at < 5
    pids = tree_pids(out)
    wait_until(lambda: not any(map(pid_alive, pids)), 5, f"remote {pids} to die")


def test_the_remote_command_ends_when_the_connection_drops(
    executor: SSHExecutor, sshd_server: SSHServer
) -> None:
    out = Output()
    out.when(TREE_READY, lambda: executor.pool.discard(executor.host))  # the link goes away
    result = executor.execute(["sh", "-c", TREE], on_output=out, timeout_secs=60)
    assert result.exit_code is None
    assert result.error is not None and "lost" in result.error
    pids = tree_pids(out)
    wait_until(lambda: not any(map(pid_alive, pids)), 10, f"orphaned remote {pids} to die")
    # ... and the next command simply reconnects.
    assert executor.execute(["true"], on_output=Output()).exit_code == 0
    assert executor.pool.connections_opened == 2


def test_the_process_group_is_found_behind_a_noisy_login_shell(tmp_path: Path) -> None:
    if not pwd.getpwuid(os.getuid()).pw_shell.endswith("bash"):
        pytest.skip("needs bash as the login shell (BASH_ENV makes it print first)")
    noisy = tmp_path / "noisy.sh"
    noisy.write_text("echo 'welcome from the login shell' >&2\n")
    with running_sshd(tmp_path / "noisy", require_sshd(), SetEnv=f"BASH_ENV={noisy}") as srv:
        ssh = SSHExecutor(srv.host_settings())
        handle = ssh.start(["sh", "-c", f"trap '' TERM; {TREE}"], cwd=None, env={})
        out = Output()
        wait_until(
            lambda: out(handle.read(0.1) or b"") or all(m in out.text.encode() for m in TREE_READY),
            10,
            "the tree to start",
        )
        handle.kill()  # by process group only: no EOF is sent to the watchdog
        pids = tree_pids(out)
        wait_until(lambda: not any(map(pid_alive, pids)), 5, f"remote {pids} to die")
        handle.close()
        ssh.close()
    assert "welcome from the login shell" in out.text
    assert "fleet-pgid" not in out.text


def test_one_connection_serves_many_runs(executor: SSHExecutor, sshd_server: SSHServer) -> None:
    before = sshd_server.accepted_logins()
    for task_id in ("t-one", "t-two"):
        spec = plan_run(executor.host, agent("echo", "{task_id}"), task_id=task_id, prompt="x")
        out = Output()
        assert executor.run(spec, out).succeeded, out.text
        assert f"\n{task_id}\n" in out.text
    assert executor.pool.connections_opened == 1
    wait_until(lambda: sshd_server.accepted_logins() >= before + 1, 5, "sshd to log the login")
    assert sshd_server.accepted_logins() == before + 1


def test_runs_beyond_sshd_max_sessions_get_another_connection(tmp_path: Path) -> None:
    go = tmp_path / "go"
    wait_for_go = f"echo ready; while [ ! -e {go} ]; do sleep 0.02; done"
    with running_sshd(tmp_path / "tight", require_sshd(), MaxSessions=2) as tight:
        ssh = SSHExecutor(tight.host_settings())
        outputs = [Output() for _ in range(3)]
        results: list[ExecResult] = []

        def one(out: Output) -> None:
            results.append(ssh.execute(["sh", "-c", wait_for_go], on_output=out, timeout_secs=30))

        threads = [threading.Thread(target=one, args=(out,)) for out in outputs]
        for thread in threads:
            thread.start()
        # All three run at the same time, although one connection takes only two of them.
        wait_until(lambda: all("ready" in out.text for out in outputs), 20, "three runs")
        go.touch()
        for thread in threads:
            thread.join(30)
        ssh.close()
    assert [r.exit_code for r in results] == [0, 0, 0]
    assert ssh.pool.connections_opened == 2


def test_a_full_task_over_ssh(executor: SSHExecutor, bare_repo: Path) -> None:
    spec = plan_run(
        executor.host,
        demo_agent(),
        task_id="t-remote",
        prompt="Remote work",
        clone_url=str(bare_repo),
        python=sys.executable,
    )
    out = Output()
    result = executor.run(spec, out)
    assert result.succeeded, (result, out.text)
    receipt = result.receipt or {}
    assert receipt["branch"] == "fleet/t-remote"
    assert receipt["commit_sha"] == git("--git-dir", str(bare_repo), "rev-parse", "fleet/t-remote")
    assert "demo-agent: pushed fleet/t-remote to origin" in out.text
    assert result.workspace_removed and not Path(spec.workspace).exists()


def test_a_malformed_remote_receipt_is_read_back_over_sftp(executor: SSHExecutor) -> None:
    spec = plan_run(
        executor.host,
        agent("sh", "-c", 'echo "[1]" > "$FLEET_RECEIPT_PATH"; cat "$1"', "sh", "{prompt_file}"),
        task_id="t-rcpt",
        prompt="prompt over sftp",
    )
    out = Output()
    result = executor.run(spec, out)
    assert "prompt over sftp" in out.text
    assert result.receipt_error == "receipt_invalid: receipt must be a JSON object, got list"


def test_an_unknown_host_key_is_refused(sshd_server: SSHServer, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    ssh = SSHExecutor(sshd_server.host_settings(host_id="build-07", known_hosts=str(empty)))
    with pytest.raises(HostKeyError) as refused:
        ssh.execute(["true"], on_output=Output())
    message = str(refused.value)
    assert "build-07" in message and "127.0.0.1" in message and str(empty) in message
    assert "accept_unknown_host_key" in message
    ssh.close()


def test_a_changed_host_key_is_refused(sshd_server: SSHServer, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = tmp_path / "known_hosts"
    pub = other.with_suffix(".pub").read_text().split()
    known.write_text(f"[127.0.0.1]:{sshd_server.port} {pub[0]} {pub[1]}\n")
    for accept in (False, True):  # not even accept_unknown_host_key accepts a changed key
        ssh = SSHExecutor(
            sshd_server.host_settings(known_hosts=str(known), accept_unknown_host_key=accept)
        )
        with pytest.raises(HostKeyError, match="does not match"):
            ssh.execute(["true"], on_output=Output())
        ssh.close()


def test_accept_unknown_host_key_trusts_and_records_it(
    sshd_server: SSHServer, tmp_path: Path
) -> None:
    known = tmp_path / "fresh" / "known_hosts"
    ssh = SSHExecutor(
        sshd_server.host_settings(known_hosts=str(known), accept_unknown_host_key=True)
    )
    assert ssh.execute(["true"], on_output=Output()).exit_code == 0
    ssh.close()
    assert sshd_server.host_key_line in known.read_text()


def test_a_key_the_server_does_not_know_fails_authentication(
    sshd_server: SSHServer, tmp_path: Path
) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    ssh = SSHExecutor(sshd_server.host_settings(ssh_key_path=str(stranger)))
    with pytest.raises(ExecutorError, match="authentication"):
        ssh.execute(["true"], on_output=Output())
    ssh.close()
