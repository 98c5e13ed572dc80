"""SSH transport: paramiko with key auth, verified host keys and one reused connection per host.

Every command runs under a small POSIX ``sh`` wrapper on the remote host (Linux: it needs
``setsid``)::

    sh -c WRAPPER fleet-run CWD [env K=V ...] ARGV...

The wrapper starts the command with ``setsid`` (a new session whose process group is the whole
agent tree), reports that group's id on the channel's stderr, and keeps a watchdog reading the
channel's stdin. When the connection drops (or Fleet sends EOF), the watchdog sends SIGTERM to
the group and SIGKILL two seconds later, so a remote agent never outlives its connection. On
timeout or cancel Fleet also signals the group over a second channel.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import socket
import threading
from collections.abc import Mapping, Sequence
from typing import NoReturn

import paramiko

from fleet_common.settings import HostSettings
from fleet_worker.executors.base import Executor, ExecutorError, HostKeyError, ProcessHandle

_WRAPPER = """exec 3<&0
if [ -n "$1" ]; then cd -- "$1" || exit 125; fi
shift
setsid "$@" </dev/null 3<&- 2>&1 &
p=$!
echo "fleet-pgid $p" >&2
( cat >/dev/null; kill -TERM -"$p"; sleep 2; kill -KILL -"$p" ) <&3 >/dev/null 2>&1 3<&- &
w=$!
exec 3<&-
wait "$p"
rc=$?
kill "$w" 2>/dev/null
kill -KILL -"$p" 2>/dev/null
exit "$rc"
"""
_PGID_LINE = re.compile(rb"(?m)^fleet-pgid (\d+)\n")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONNECT_ERRORS = (paramiko.SSHException, OSError, EOFError)


def remote_command(argv: Sequence[str], cwd: str | None, env: Mapping[str, str]) -> str:
    """The command line sent to the remote login shell, every argument ``shlex.quote``d.

    The environment is passed with ``env K=V ...`` rather than SSH ``setenv`` requests, which
    sshd drops unless ``AcceptEnv`` allows them.
    """
    for name in env:
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"invalid environment variable name {name!r}")
    inner = [*(["env", *(f"{k}={v}" for k, v in env.items())] if env else []), *argv]
    return shlex.join(["sh", "-c", _WRAPPER, "fleet-run", cwd or "", *inner])


def _where(host: HostSettings) -> str:
    return f"{host.ssh_user}@{host.hostname}:{host.ssh_port}"


def _known_hosts_path(host: HostSettings) -> str:
    return os.path.expanduser(host.known_hosts or "~/.ssh/known_hosts")


class _RefuseUnknownHostKey(paramiko.MissingHostKeyPolicy):
    """paramiko's RejectPolicy, with an error that names the host and the known_hosts file."""

    def __init__(self, host: HostSettings) -> None:
        self._host = host

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> NoReturn:
        known = _known_hosts_path(self._host)
        raise HostKeyError(
            f"host {self._host.host_id} ({hostname}) offered an unknown {key.get_name()} host key "
            f"{key.fingerprint}: it is not in {known}. Add the host's key to {known} "
            "(ssh-keyscan, checked out of band) or set accept_unknown_host_key = true"
        )


def connect(host: HostSettings) -> paramiko.SSHClient:
    """Open an authenticated connection to ``host``; raises :class:`ExecutorError`."""
    client = paramiko.SSHClient()
    known = _known_hosts_path(host)
    if host.accept_unknown_host_key and not os.path.exists(known):
        os.makedirs(os.path.dirname(known) or ".", exist_ok=True)
        os.close(os.open(known, os.O_WRONLY | os.O_CREAT, 0o600))
    if os.path.exists(known):
        # Loaded as "our" keys so that accepted new keys are saved back (trust on first use).
        client.load_host_keys(known)
    if host.accept_unknown_host_key:
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # noqa: S507 - opted in
    else:
        client.set_missing_host_key_policy(_RefuseUnknownHostKey(host))
    try:
        client.connect(
            host.hostname,
            port=host.ssh_port,
            username=host.ssh_user,
            key_filename=os.path.expanduser(host.ssh_key_path) if host.ssh_key_path else None,
            timeout=host.connect_timeout_secs,
            banner_timeout=host.connect_timeout_secs,
            auth_timeout=host.connect_timeout_secs,
            allow_agent=False,
            look_for_keys=False,
        )
    except HostKeyError:
        client.close()
        raise
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise HostKeyError(
            f"host {host.host_id} ({host.hostname}) presented a {exc.key.get_name()} host key "
            f"{exc.key.fingerprint} that does not match {known}; refusing to connect"
        ) from None
    except paramiko.AuthenticationException as exc:
        client.close()
        raise ExecutorError(
            f"SSH authentication to {_where(host)} with key {host.ssh_key_path} failed: {exc}"
        ) from None
    except _CONNECT_ERRORS as exc:
        client.close()
        raise ExecutorError(f"cannot connect to {_where(host)}: {exc}") from None
    transport = client.get_transport()
    if transport is not None:
        if host.keepalive_secs > 0:
            transport.set_keepalive(host.keepalive_secs)
        if isinstance(transport.sock, socket.socket):
            # Many small packets (session opens, kill requests): don't let Nagle delay them.
            with contextlib.suppress(OSError):
                transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


class SSHPool:
    """Live connections per host, shared by threads, reopened when they die.

    One connection normally serves every run on a host. sshd caps the sessions of one
    connection (``MaxSessions``, 10 by default); when a connection refuses another session,
    the pool opens one more connection to that host instead of failing the run.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[tuple[object, ...], list[paramiko.SSHClient]] = {}
        self._host_locks: dict[tuple[object, ...], threading.Lock] = {}
        self.connections_opened = 0

    @staticmethod
    def _key(host: HostSettings) -> tuple[object, ...]:
        # The trust settings are part of the key: a connection accepted under a laxer policy
        # is never handed to a host configured more strictly.
        return (
            host.hostname,
            host.ssh_port,
            host.ssh_user,
            host.ssh_key_path,
            host.known_hosts,
            host.accept_unknown_host_key,
        )

    def open_session(self, host: HostSettings) -> paramiko.Channel:
        """A new session channel to ``host`` on a live connection; raises ExecutorError."""
        key = self._key(host)
        with self._lock:
            host_lock = self._host_locks.setdefault(key, threading.Lock())
        with host_lock:  # one connect per host at a time; other hosts are not held up
            clients = []
            for client in self._clients.get(key, []):
                transport = client.get_transport()
                if transport is not None and transport.is_active():
                    clients.append(client)
                else:
                    client.close()
            self._clients[key] = clients
            for client in clients:
                try:
                    return _session(client, host)
                except paramiko.ChannelException:
                    continue  # this connection is at its MaxSessions: try the next
                except _CONNECT_ERRORS:
                    client.close()  # died just now; pruned on the next call
            client = connect(host)
            self.connections_opened += 1
            clients.append(client)
            try:
                return _session(client, host)
            except _CONNECT_ERRORS as exc:
                raise ExecutorError(f"cannot open a session on {_where(host)}: {exc}") from None

    def discard(self, host: HostSettings) -> None:
        """Close ``host``'s connections (they failed); the next use reconnects."""
        with self._lock:
            clients = self._clients.pop(self._key(host), [])
        for client in clients:
            client.close()

    def close(self) -> None:
        """Close every connection."""
        with self._lock:
            clients = [c for group in self._clients.values() for c in group]
            self._clients = {}
        for client in clients:
            client.close()


def _session(client: paramiko.SSHClient, host: HostSettings) -> paramiko.Channel:
    transport = client.get_transport()
    if transport is None:
        raise paramiko.SSHException("connection closed")
    return transport.open_session(timeout=host.connect_timeout_secs)


class _SSHProcess(ProcessHandle):
    def __init__(self, executor: SSHExecutor, channel: paramiko.Channel) -> None:
        self._executor = executor
        self._chan = channel
        self._pgid: int | None = None
        self._stderr = b""  # stderr not yet examined for the group id line
        self._extra = b""  # stderr that is output, waiting to be returned by read()

    def read(self, timeout: float) -> bytes | None:
        self._collect_stderr()
        if self._extra:
            out, self._extra = self._extra, b""
            return out
        self._chan.settimeout(timeout)
        try:
            data = self._chan.recv(65_536)
        except TimeoutError:
            data = b""
        else:
            if not data:  # end of output; stdout and stderr end together
                self._collect_stderr(final=True)
                out, self._extra = self._extra, b""
                return out or None
        self._collect_stderr()
        out, self._extra = data + self._extra, b""
        return out

    def _collect_stderr(self, final: bool = False) -> None:
        """Stderr carries the wrapper's group id line; anything else on it is output."""
        while self._chan.recv_stderr_ready():
            self._stderr += self._chan.recv_stderr(65_536)
        if self._pgid is None:
            # The login shell may print before the wrapper runs (a noisy .bashrc).
            match = _PGID_LINE.search(self._stderr)
            if match:
                self._pgid = int(match.group(1))
                self._stderr = self._stderr[: match.start()] + self._stderr[match.end() :]
            elif not final:  # keep a partial last line: it may be the start of the id line
                cut = self._stderr.rfind(b"\n") + 1
                self._extra += self._stderr[:cut]
                self._stderr = self._stderr[cut:]
                return
        self._extra += self._stderr
        self._stderr = b""

    def wait(self, timeout: float) -> int | None:
        if not self._chan.status_event.wait(timeout):
            return None
        if self._chan.exit_status == -1:  # closed without an exit status: the link broke
            self.lost = f"connection to {_where(self._executor.host)} lost"
        return self._chan.exit_status

    def terminate(self) -> None:
        with contextlib.suppress(*_CONNECT_ERRORS):
            self._chan.shutdown_write()  # EOF: the remote watchdog stops the group too
        self._signal("TERM")

    def kill(self) -> None:
        self._signal("KILL")

    def _signal(self, sig: str) -> None:
        self._collect_stderr()
        if self._pgid is None:
            return  # the watchdog sees the EOF (or the dropped connection) and does it
        command = shlex.join(["sh", "-c", f"kill -{sig} -{self._pgid} 2>/dev/null; true"])
        try:  # any connection to the host will do, even a new one if this one dropped
            chan = self._executor.pool.open_session(self._executor.host)
        except ExecutorError:
            return
        try:
            chan.exec_command(command)
            chan.status_event.wait(5)
        except _CONNECT_ERRORS:
            pass
        finally:
            chan.close()

    def close(self) -> None:
        self._chan.close()


class SSHExecutor(Executor):
    """Runs commands on one SSH host. Keep one per host for the life of the process.

    Without a ``pool`` the executor owns one (closed by :meth:`close`); pass a shared
    :class:`SSHPool` to share connections between executors.
    """

    def __init__(self, host: HostSettings, pool: SSHPool | None = None) -> None:
        self.host = host
        self._owns_pool = pool is None
        self.pool = pool or SSHPool()

    def start(
        self, argv: Sequence[str], *, cwd: str | None, env: Mapping[str, str]
    ) -> ProcessHandle:
        """Start ``argv`` on the host under the wrapper script."""
        channel = self.pool.open_session(self.host)
        try:
            channel.exec_command(remote_command(argv, cwd, env))
        except _CONNECT_ERRORS as exc:
            channel.close()
            raise ExecutorError(f"cannot run a command on {_where(self.host)}: {exc}") from None
        return _SSHProcess(self, channel)

    def _sftp(self) -> paramiko.SFTPClient:
        channel = self.pool.open_session(self.host)
        try:
            channel.invoke_subsystem("sftp")
            return paramiko.SFTPClient(channel)
        except _CONNECT_ERRORS as exc:
            channel.close()
            raise ExecutorError(f"cannot open SFTP to {_where(self.host)}: {exc}") from None

    def write_file(self, path: str, data: bytes, *, append: bool = False) -> None:
        """Write ``data`` to ``path`` on the host over SFTP (new files are mode 0600)."""
        with self._sftp() as sftp:
            try:
                with sftp.open(path, "ab" if append else "wb") as fh:
                    fh.write(data)
                if not append:
                    sftp.chmod(path, 0o600)
            except (paramiko.SSHException, EOFError) as exc:
                raise ExecutorError(f"SFTP to {_where(self.host)} failed: {exc}") from None

    def read_file(self, path: str, limit: int) -> bytes | None:
        """At most ``limit`` bytes of ``path`` on the host over SFTP, ``None`` if missing."""
        with self._sftp() as sftp:
            try:
                with sftp.open(path, "rb") as fh:
                    return fh.read(limit)
            except FileNotFoundError:
                return None
            except (paramiko.SSHException, EOFError) as exc:
                raise ExecutorError(f"SFTP to {_where(self.host)} failed: {exc}") from None

    def close(self) -> None:
        """Close the pool if this executor owns it."""
        if self._owns_pool:
            self.pool.close()
