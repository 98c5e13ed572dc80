"""The demo agent, given Forgejo's URL, a token and the repository in its environment, pushes
its branch and opens a pull request through the API, as a real coding agent would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.fakes.forgejo import FakeForgejo
from tests.forgejo_story.gitrepo import bare_repo, branches, git


def run_agent(workspace: Path, env: dict[str, str]) -> tuple[int, dict[str, Any], str]:
    control = workspace / ".fleet"
    control.mkdir(exist_ok=True)
    (control / "prompt.md").write_text("Add retries\n\nPlease.", encoding="utf-8")
    full = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "FLEET_TASK_ID": "tsk_demo",
        "FLEET_WORKSPACE": str(workspace),
        "FLEET_RECEIPT_PATH": str(control / "receipt.json"),
        **env,
    }
    done = subprocess.run(
        [sys.executable, "-m", "fleet_worker.demo_agent", str(control / "prompt.md")],
        env=full,
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=60,
    )
    receipt = json.loads((control / "receipt.json").read_text()) if done.returncode == 0 else {}
    return done.returncode, receipt, done.stdout + done.stderr


def clone(bare: Path, into: Path, branch: str) -> Path:
    git(into.parent, "clone", "--quiet", str(bare), str(into))
    git(into, "checkout", "--quiet", "-b", branch)
    (into / ".git" / "info" / "exclude").write_text("/.fleet/\n")
    return into


def test_opens_a_pr_that_closes_the_issue(tmp_path: Path) -> None:
    bare = bare_repo(tmp_path)
    with FakeForgejo() as fake:
        repo = fake.add_repo("alice", "widgets", clone_url=str(bare))
        issue = fake.add_issue(repo, "Add retries", labels=("fleet",))
        env = {
            "FLEET_FORGEJO_URL": fake.url,
            "FLEET_FORGEJO_TOKEN": fake.token,
            "FLEET_REPO": repo,
            "FLEET_ISSUE_NUMBER": str(issue),
        }
        workspace = clone(bare, tmp_path / "ws", "fleet/tsk_demo")
        code, receipt, output = run_agent(workspace, env)
        assert code == 0, output
        assert fake.token not in output
        pr = receipt["pr_number"]
        pull = fake.pull(repo, pr)
        assert (pull.head, pull.base) == ("fleet/tsk_demo", "main")
        assert f"Closes #{issue}" in fake.issue(repo, pr).body
        assert receipt["pr_url"] == f"{fake.url}{repo}/pulls/{pr}"
        assert branches(bare)["fleet/tsk_demo"] == receipt["commit_sha"]

        # A retried attempt (a fresh clone, the same branch) replaces the branch and finds
        # the PR already open instead of failing on Forgejo's 409.
        again = clone(bare, tmp_path / "ws2", "fleet/tsk_demo")
        code, second, output = run_agent(again, env)
        assert code == 0, output
        assert second["pr_number"] == pr
        assert branches(bare)["fleet/tsk_demo"] == second["commit_sha"]
        assert len([i for i in fake.repo(repo).issues.values() if i.pull]) == 1


def test_without_forgejo_in_its_environment_it_opens_nothing(tmp_path: Path) -> None:
    bare = bare_repo(tmp_path)
    workspace = clone(bare, tmp_path / "ws", "fleet/tsk_demo")
    code, receipt, output = run_agent(workspace, {"FLEET_REPO": "alice/widgets"})
    assert code == 0, output
    assert "pr_number" not in receipt and receipt["branch"] == "fleet/tsk_demo"


def test_forgejo_down_fails_the_attempt(tmp_path: Path) -> None:
    bare = bare_repo(tmp_path)
    with FakeForgejo() as fake:
        repo = fake.add_repo("alice", "widgets", clone_url=str(bare))
        fake.fail_mode = "503"
        env = {"FLEET_FORGEJO_URL": fake.url, "FLEET_FORGEJO_TOKEN": fake.token, "FLEET_REPO": repo}
        workspace = clone(bare, tmp_path / "ws", "fleet/tsk_demo")
        code, _, output = run_agent(workspace, env)
        assert code == 1 and "HTTP 503" in output
