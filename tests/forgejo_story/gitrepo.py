"""A local bare git repository with a ``main`` branch and one commit: the "remote" that the
fake Forgejo's repository stands for, which agents clone and push to."""

from __future__ import annotations

import subprocess
from pathlib import Path

IDENTITY = ("-c", "user.name=Test", "-c", "user.email=test@example.invalid")


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *IDENTITY, "-c", "commit.gpgsign=false", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def bare_repo(root: Path, name: str = "widgets") -> Path:
    """``root/<name>.git``: bare, default branch ``main`` holding a README."""
    bare = root / f"{name}.git"
    seed = root / f"{name}-seed"
    seed.mkdir(parents=True)
    git(root, "init", "--quiet", "--bare", "--initial-branch=main", str(bare))
    git(seed, "init", "--quiet", "--initial-branch=main")
    (seed / "README.md").write_text(f"# {name}\n", encoding="utf-8")
    git(seed, "add", "README.md")
    git(seed, "commit", "--quiet", "-m", "initial commit")
    git(seed, "push", "--quiet", str(bare), "main")
    return bare


def branches(bare: Path) -> dict[str, str]:
    """Branch name → head SHA in the bare repository."""
    out = git(bare, "for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads")
    return dict(line.split(" ", 1) for line in out.splitlines() if line)
