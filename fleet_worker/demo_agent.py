"""The built-in ``demo`` agent: behaves like a coding agent without any model or network.

``python -m fleet_worker.demo_agent PROMPT_FILE`` reads the prompt, appends it to
``FLEET_DEMO.md`` in the workspace, commits on the current branch and pushes it when the
workspace is a git repository with an ``origin``, then writes a receipt to
``$FLEET_RECEIPT_PATH``. For tests: ``FLEET_DEMO_SLEEP`` (seconds) slows it down,
``FLEET_DEMO_EXIT`` makes it exit with that code (after writing its receipt).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEMO_FILE = "FLEET_DEMO.md"
VERSION = "fleet-demo 1"
_GIT_IDENTITY = ("-c", "user.name=Fleet Demo Agent", "-c", "user.email=demo-agent@fleet.invalid")


def _say(message: str) -> None:
    print(f"demo-agent: {message}", flush=True)


def _git(workspace: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *_GIT_IDENTITY, "-c", "commit.gpgsign=false", *args],
        cwd=workspace,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"git {args[0]} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def _is_git_repo(workspace: Path) -> bool:
    probe = subprocess.run(
        ["git", "rev-parse", "--is-inside-work-tree"],
        cwd=workspace,
        capture_output=True,
        text=True,
        check=False,
    )
    return probe.returncode == 0 and probe.stdout.strip() == "true"


def run(prompt_file: str) -> int:
    """Do the demo work and write the receipt; returns the exit code."""
    workspace = Path(os.environ.get("FLEET_WORKSPACE") or os.getcwd())
    prompt = Path(prompt_file).read_text(encoding="utf-8")
    task_id = os.environ.get("FLEET_TASK_ID", "unknown")
    _say(f"task {task_id}: read a prompt of {len(prompt)} characters")

    delay = float(os.environ.get("FLEET_DEMO_SLEEP", "0") or 0)
    if delay > 0:
        _say(f"thinking for {delay:g} s")
        time.sleep(delay)

    title = prompt.strip().splitlines()[0] if prompt.strip() else "(empty prompt)"
    with (workspace / DEMO_FILE).open("a", encoding="utf-8") as fh:
        fh.write(f"## Task {task_id}\n\n{prompt.rstrip()}\n\n")
    _say(f"wrote {DEMO_FILE}")

    receipt: dict[str, Any] = {
        "exit_code": 0,
        "summary": f"Demo agent recorded the prompt in {DEMO_FILE}: {title[:200]}",
        "agent_version": VERSION,
        "tests": {"passed": 0, "failed": 0},
        "tokens": {"input": 0, "output": 0},
        "cost_usd": 0,
    }
    if _is_git_repo(workspace):
        branch = _git(workspace, "symbolic-ref", "--short", "HEAD")  # works on an unborn branch
        _git(workspace, "add", "--", DEMO_FILE)
        _git(workspace, "commit", "--quiet", "-m", f"fleet demo: {title[:60]}")
        receipt["branch"] = branch
        receipt["commit_sha"] = _git(workspace, "rev-parse", "HEAD")
        _say(f"committed {receipt['commit_sha'][:12]} on {branch}")
        if "origin" in _git(workspace, "remote").split():
            _git(workspace, "push", "--quiet", "origin", f"HEAD:refs/heads/{branch}")
            _say(f"pushed {branch} to origin")

    code = int(os.environ.get("FLEET_DEMO_EXIT", "0") or 0)
    receipt["exit_code"] = code
    receipt_path = os.environ.get("FLEET_RECEIPT_PATH")
    if receipt_path:
        Path(receipt_path).write_text(json.dumps(receipt, indent=2), encoding="utf-8")
        _say("wrote the receipt")
    _say("done" if code == 0 else f"failing on purpose with exit code {code}")
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m fleet_worker.demo_agent PROMPT_FILE``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fleet_worker.demo_agent PROMPT_FILE", file=sys.stderr)
        return 2
    try:
        return run(args[0])
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"demo-agent: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
