"""Helpers for executor tests: output capture, process checks, git, agent types."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleet_common.settings import AgentTypeSettings

GIT_ID = ["-c", "user.name=Test", "-c", "user.email=test@example.invalid"]


@dataclass
class Output:
    """An ``on_output`` sink that records chunks and lets a test react to them."""

    chunks: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    triggers: list[tuple[tuple[bytes, ...], Callable[[], None]]] = field(default_factory=list)

    def __call__(self, chunk: bytes) -> None:
        with self.lock:
            self.chunks.append(chunk)
            data = b"".join(self.chunks)
        for markers, action in list(self.triggers):
            if all(marker in data for marker in markers):
                self.triggers.remove((markers, action))
                action()

    def when(self, markers: bytes | tuple[bytes, ...], action: Callable[[], None]) -> None:
        """Call ``action`` (once) as soon as all ``markers`` have appeared in the output."""
        self.triggers.append((markers if isinstance(markers, tuple) else (markers,), action))

    @property
    def text(self) -> str:
        with self.lock:
            return b"".join(self.chunks).decode(errors="replace")

    def value(self, key: str) -> str:
        """The value printed as ``key=value`` on a line of its own."""
        for line in self.text.splitlines():
            if line.startswith(f"{key}="):
                return line.split("=", 1)[1].strip()
        raise AssertionError(f"{key}= not in output:\n{self.text}")


class CancelFlag:
    """A ``should_cancel`` that records when it was set."""

    def __init__(self) -> None:
        self.set_at: float | None = None

    def set(self) -> None:
        self.set_at = time.monotonic()

    def __call__(self) -> bool:
        return self.set_at is not None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` is a live process (a zombie counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.02)


# Prints the pids of a child and a grandchild (TREE_READY once both are out), then waits.
TREE = 'sh -c "sleep 300 & echo grandchild=\\$!; wait" & echo child=$!; wait'
TREE_READY = (b"child=", b"grandchild=")


def git(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        ["git", *GIT_ID, *args], cwd=cwd, check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


def agent(*command: str, **kwargs: object) -> AgentTypeSettings:
    """An agent type running ``command`` (templates allowed)."""
    return AgentTypeSettings(name="test", command=tuple(command), **kwargs)  # type: ignore[arg-type]


def demo_agent(**env: str) -> AgentTypeSettings:
    return AgentTypeSettings(
        name="demo",
        command=("{python}", "-m", "fleet_worker.demo_agent", "{prompt_file}"),
        env=env,
        timeout_secs=60,
    )
