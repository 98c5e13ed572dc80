"""Executors: run agent commands on a host, locally or over SSH, behind one interface."""

from __future__ import annotations

from fleet_common.settings import HostSettings
from fleet_worker.executors.base import (
    CommandStep,
    ExecResult,
    Executor,
    ExecutorError,
    HostKeyError,
    RunResult,
    RunSpec,
    StartFailed,
    WriteFileStep,
)

__all__ = [
    "CommandStep",
    "ExecResult",
    "Executor",
    "ExecutorError",
    "HostKeyError",
    "RunResult",
    "RunSpec",
    "StartFailed",
    "WriteFileStep",
    "make_executor",
]


def make_executor(host: HostSettings) -> Executor:
    """The executor for ``host``'s transport; keep it for the process and ``close()`` it."""
    if host.transport == "ssh":
        from fleet_worker.executors.ssh import SSHExecutor  # paramiko only when needed

        return SSHExecutor(host)
    from fleet_worker.executors.local import LocalExecutor

    return LocalExecutor()
