"""A private PostgreSQL server for tests that stop and start the database.

The shared server at 5432 is used by everyone's tests at once, so a test that needs to kill
the database gets its own: ``initdb`` in a temporary directory, ``pg_ctl`` on a free port with
the socket in that directory, and everything removed afterwards. As root (containers, CI) the
server runs as the ``postgres`` OS user, since PostgreSQL refuses to run as root.

Without the server binaries (or a ``postgres`` user when root) the test skips, or fails under
``FLEET_REQUIRE_SERVICES=1``, like every other service the tests use.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests import services

PG_USER = "postgres"


def _version_key(bindir: str) -> tuple[int, ...]:
    version = Path(bindir).parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def find_bindir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` live: ``FLEET_TEST_PG_BINDIR``, the PATH, or the newest
    ``/usr/lib/postgresql/*/bin`` (Debian and Ubuntu keep them off the PATH)."""
    candidates = [os.environ.get("FLEET_TEST_PG_BINDIR", "")]
    on_path = shutil.which("pg_ctl")
    candidates.append(str(Path(on_path).parent) if on_path else "")
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    return None


class PrivatePostgres:
    """One PostgreSQL server of our own: ``start()``, ``stop()``, ``url(dbname)``."""

    def __init__(self, bindir: Path, root: Path, port: int) -> None:
        self.bindir = bindir
        self.root = root
        self.port = port
        self.data = root / "data"
        self.sockets = root / "sockets"
        self.logfile = root / "postgres.log"
        self._as_other_user = os.geteuid() == 0

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self._as_other_user:
            command = ["runuser", "-u", PG_USER, "--", *command]
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
        if completed.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited with {completed.returncode}:\n"
                f"{completed.stdout}\n{completed.stderr}\n{self.log_tail()}"
            )
        return completed

    def init(self) -> None:
        self.sockets.mkdir()
        if self._as_other_user:
            user = pwd.getpwnam(PG_USER)
            for path in (self.root, self.sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            PG_USER,
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.logfile),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: roll back open transactions, drop every connection)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        command = [str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"]
        if self._as_other_user:
            command = ["runuser", "-u", PG_USER, "--", *command]
        return subprocess.run(command, capture_output=True, check=False).returncode == 0

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A started private server, stopped and deleted afterwards (whatever the test did)."""
    bindir = find_bindir()
    if bindir is None:
        services.unavailable("PostgreSQL server binaries (initdb, pg_ctl)")
        raise AssertionError("unreachable")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            services.unavailable(f"a {PG_USER!r} OS user to run a private PostgreSQL as root")
        if shutil.which("runuser") is None:
            services.unavailable("runuser (to run a private PostgreSQL as root)")
    root = Path(tempfile.mkdtemp(prefix="fleet-pg-"))
    server = PrivatePostgres(bindir, root, services.free_port())
    try:
        server.init()
        server.start()
        yield server
    finally:
        if server.running():
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
