"""A real OpenSSH server for tests: ``/usr/sbin/sshd -D -e`` on a free loopback port.

It runs as the current user with host and client keys generated in a temporary directory;
nothing is installed or configured globally (as root, sshd insists on its privilege separation
directory ``/run/sshd``, which is created if missing, as the openssh-server package does).

Use the ``sshd_server`` fixture (session scoped) from a conftest::

    from tests.sshd import sshd_server  # noqa: F401  (re-export the fixture)

    def test_x(sshd_server):
        host = sshd_server.host_settings(work_dir=str(tmp_path))  # a HostSettings for it

Without sshd the tests skip, unless ``FLEET_REQUIRE_SERVICES=1``, which makes them fail.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from fleet_common.settings import HostSettings

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/usr/bin/sshd")
START_TIMEOUT_SECS = 15.0
DEFAULT_OPTIONS: dict[str, str | int] = {"MaxSessions": 50, "MaxStartups": 50}


@dataclass(frozen=True)
class SSHServer:
    """A running sshd and everything a client needs to reach it."""

    hostname: str
    port: int
    user: str
    client_key: Path
    known_hosts: Path  # holds this server's host key
    host_key_line: str  # "ssh-ed25519 AAAA..." (no host name)
    log_path: Path
    process: subprocess.Popen[bytes]

    def host_settings(self, **overrides: Any) -> HostSettings:
        """A ``transport = "ssh"`` host pointing at this server; ``overrides`` replace fields."""
        host = HostSettings(
            host_id="sshd-test",
            transport="ssh",
            hostname=self.hostname,
            ssh_user=self.user,
            ssh_port=self.port,
            ssh_key_path=str(self.client_key),
            known_hosts=str(self.known_hosts),
            connect_timeout_secs=5,
            keepalive_secs=5,
        )
        return replace(host, **overrides)

    def log(self) -> str:
        """Everything sshd logged so far."""
        return self.log_path.read_text(errors="replace")

    def accepted_logins(self) -> int:
        """How many connections authenticated so far (one per SSH connection)."""
        return self.log().count("Accepted publickey")


def find_sshd() -> str | None:
    """The sshd binary, or None."""
    for candidate in SSHD_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("sshd")


def require_sshd() -> str:
    """sshd's path; skips the test without it (fails under ``FLEET_REQUIRE_SERVICES=1``)."""
    sshd = find_sshd()
    if sshd and shutil.which("ssh-keygen"):
        return sshd
    reason = "OpenSSH server not installed (apt-get install openssh-server)"
    if os.environ.get("FLEET_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}, and FLEET_REQUIRE_SERVICES=1")
    pytest.skip(reason)


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleet-test", "-f", str(path)],
        check=True,
    )
    kind, key = path.with_suffix(".pub").read_text().split()[:2]
    return f"{kind} {key}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_banner(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not answer on port {port}:\n{log.read_text()}")


@contextmanager
def running_sshd(directory: Path, sshd: str, **options: str | int) -> Iterator[SSHServer]:
    """Start sshd with fresh keys under ``directory``; stop it on exit.

    ``options`` override sshd_config keywords, e.g. ``MaxSessions=2``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    host_key_line = _keygen(directory / "ssh_host_ed25519_key")
    client_key = directory / "id_ed25519"
    (directory / "authorized_keys").write_text(_keygen(client_key) + "\n")
    user = getpass.getuser()
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    for _attempt in range(3):  # the free port may be taken between probe and bind
        port = _free_port()
        config = directory / "sshd_config"
        config.write_text(
            f"Port {port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {directory / 'ssh_host_ed25519_key'}\n"
            f"AuthorizedKeysFile {directory / 'authorized_keys'}\n"
            "PidFile none\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PermitRootLogin prohibit-password\n"
            f"AllowUsers {user}\n"
            "Subsystem sftp internal-sftp\n"
            "LogLevel VERBOSE\n"
            + "".join(f"{k} {v}\n" for k, v in {**DEFAULT_OPTIONS, **options}.items())
        )
        log_path = directory / "sshd.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sshd, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            _wait_for_banner(proc, port, log_path)
        except RuntimeError:
            proc.kill()
            proc.wait()
            if "Address already in use" in log_path.read_text():
                continue
            raise
        known_hosts = directory / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{port} {host_key_line}\n")
        try:
            yield SSHServer(
                "127.0.0.1", port, user, client_key, known_hosts, host_key_line, log_path, proc
            )
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return
    raise RuntimeError("could not find a free port for sshd")


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """A real sshd for the whole test session (see the module docstring)."""
    sshd = require_sshd()
    with running_sshd(tmp_path_factory.mktemp("sshd"), sshd) as server:
        yield server
