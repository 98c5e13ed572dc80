"""Fixtures for executor tests: a real sshd, a bare git repository, a local host."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_common.settings import HostSettings
from tests.executors.helpers import git
from tests.sshd import SSHServer, sshd_server

__all__ = ["SSHServer", "sshd_server"]


@pytest.fixture
def bare_repo(tmp_path: Path) -> Path:
    """A bare repository with one commit on ``main`` (a stand-in for a Forgejo repo)."""
    bare = tmp_path / "origin.git"
    git("init", "--quiet", "--bare", "-b", "main", str(bare))
    seed = tmp_path / "seed"
    git("clone", "--quiet", str(bare), str(seed))
    (seed / "README.md").write_text("# demo\n")
    git("add", "README.md", cwd=seed)
    git("commit", "--quiet", "-m", "initial", cwd=seed)
    git("push", "--quiet", "origin", "HEAD:main", cwd=seed)
    return bare


@pytest.fixture
def local_host(tmp_path: Path) -> HostSettings:
    return HostSettings(host_id="local-test", transport="local", work_dir=str(tmp_path / "work"))
