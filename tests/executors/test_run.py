"""Whole task attempts on the local executor: workspace, demo agent, receipts, hooks, cleanup."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fleet_common.settings import HostSettings
from fleet_worker.executors.base import DirsStep
from fleet_worker.executors.local import LocalExecutor
from fleet_worker.redaction import Redactor
from fleet_worker.workspace import plan_run
from tests.executors.helpers import CancelFlag, Output, agent, demo_agent, git

SHOW_WORKSPACE = (
    "sh",
    "-c",
    'echo "branch=$(git rev-parse --abbrev-ref HEAD)"; '
    'echo "status=$(git status --porcelain | tr "\\n" " ")"; '
    'echo "prompt=$(cat "$1")"',
    "sh",
    "{prompt_file}",
)


def test_workspace_is_a_clone_on_the_task_branch(local_host: HostSettings, bare_repo: Path) -> None:
    spec = plan_run(
        local_host,
        agent(*SHOW_WORKSPACE),
        task_id="t-clone",
        prompt="Do it",
        clone_url=str(bare_repo),
    )
    out = Output()
    result = LocalExecutor().run(spec, out)
    assert result.succeeded, (result, out.text)
    assert result.receipt == {"exit_code": 0}
    assert out.value("branch") == "fleet/t-clone"
    assert out.value("status") == ""  # the prompt and receipt directory is excluded from git
    assert out.value("prompt") == "Do it"
    assert spec.branch == "fleet/t-clone" and spec.env["FLEET_BRANCH"] == "fleet/t-clone"


def test_demo_agent_commits_and_pushes_its_branch(
    local_host: HostSettings, bare_repo: Path
) -> None:
    spec = plan_run(
        local_host,
        demo_agent(),
        task_id="t-demo",
        prompt="Add a greeting\n\nSay hello.",
        clone_url=str(bare_repo),
    )
    out = Output()
    result = LocalExecutor().run(spec, out)
    assert result.succeeded, (result, out.text)
    assert "demo-agent: pushed fleet/t-demo to origin" in out.text
    receipt = result.receipt or {}
    assert receipt["branch"] == "fleet/t-demo"
    assert receipt["summary"].endswith("Add a greeting")
    assert receipt["commit_sha"] == git("--git-dir", str(bare_repo), "rev-parse", "fleet/t-demo")
    pushed = git("--git-dir", str(bare_repo), "show", "fleet/t-demo:FLEET_DEMO.md")
    assert "## Task t-demo" in pushed and "Say hello." in pushed
    files = git("--git-dir", str(bare_repo), "ls-tree", "--name-only", "fleet/t-demo")
    assert files.split() == ["FLEET_DEMO.md", "README.md"]
    assert result.workspace_removed and not Path(spec.workspace).exists()


def test_demo_agent_without_git_writes_a_receipt(local_host: HostSettings) -> None:
    spec = plan_run(local_host, demo_agent(), task_id="t-plain", prompt="Hello")
    result = LocalExecutor().run(spec, Output())
    assert result.succeeded
    assert result.receipt is not None and "branch" not in result.receipt
    assert result.receipt["agent_version"] == "fleet-demo 1"


def test_a_failed_run_keeps_its_workspace_for_inspection(local_host: HostSettings) -> None:
    spec = plan_run(local_host, demo_agent(FLEET_DEMO_EXIT="3"), task_id="t-fail", prompt="x")
    result = LocalExecutor().run(spec, Output())
    assert result.exit_code == 3 and result.failure == "exit_code: 3"
    assert result.receipt is not None and result.receipt["exit_code"] == 3
    assert not result.workspace_removed
    assert (Path(spec.workspace) / "FLEET_DEMO.md").exists()


@pytest.mark.parametrize(
    ("cleanup", "exit_code", "removed"),
    [("always", "3", True), ("never", "0", False), ("on_success", "0", True)],
)
def test_cleanup_policy(
    local_host: HostSettings, cleanup: str, exit_code: str, removed: bool
) -> None:
    host = dataclasses.replace(local_host, cleanup=cleanup)
    spec = plan_run(host, demo_agent(FLEET_DEMO_EXIT=exit_code), task_id="t-clean", prompt="x")
    result = LocalExecutor().run(spec, Output())
    assert result.workspace_removed is removed
    assert Path(spec.workspace).exists() is not removed


def test_a_run_replaces_the_workspace_of_a_previous_attempt(local_host: HostSettings) -> None:
    stale = Path(local_host.work_dir) / "t-again" / "stale.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("old")
    spec = plan_run(local_host, agent("ls", "-A"), task_id="t-again", prompt="x")
    out = Output()
    assert LocalExecutor().run(spec, out).succeeded
    assert "stale.txt" not in out.text and ".fleet" in out.text


def test_malformed_receipt_fails_the_attempt(local_host: HostSettings) -> None:
    spec = plan_run(
        local_host,
        agent("sh", "-c", 'echo "{{oops" > "$FLEET_RECEIPT_PATH"'),  # {{: a literal brace
        task_id="t-bad",
        prompt="x",
    )
    result = LocalExecutor().run(spec, Output())
    assert result.exit_code == 0 and result.receipt is None
    assert result.receipt_error is not None
    assert result.receipt_error.startswith("receipt_invalid: not valid JSON")
    assert result.failure == result.receipt_error


def test_valid_receipt_is_read_back(local_host: HostSettings) -> None:
    receipt = {"exit_code": 0, "summary": "done", "tests": {"passed": 3, "failed": 0}}
    literal = json.dumps(receipt).replace("{", "{{").replace("}", "}}")
    spec = plan_run(
        local_host,
        agent("sh", "-c", f"echo '{literal}' > \"$FLEET_RECEIPT_PATH\""),
        task_id="t-good",
        prompt="x",
    )
    assert LocalExecutor().run(spec, Output()).receipt == receipt


def test_nonzero_exit_without_receipt(local_host: HostSettings) -> None:
    spec = plan_run(local_host, agent("sh", "-c", "exit 2"), task_id="t-two", prompt="x")
    result = LocalExecutor().run(spec, Output())
    assert (result.exit_code, result.receipt, result.receipt_error) == (2, None, None)
    assert result.failure == "exit_code: 2"


def test_hooks_run_around_the_agent(local_host: HostSettings) -> None:
    host = dataclasses.replace(
        local_host,
        before_hook=("sh", "-c", "echo prepared-for-$FLEET_TASK_ID > before.txt"),
        after_hook=("sh", "-c", "test -s after.txt"),
    )
    spec = plan_run(
        host, agent("sh", "-c", "cat before.txt; echo x > after.txt"), task_id="t-h", prompt="x"
    )
    out = Output()
    result = LocalExecutor().run(spec, out)
    assert result.succeeded, out.text
    assert "prepared-for-t-h" in out.text


def test_a_failing_after_hook_fails_the_attempt(local_host: HostSettings) -> None:
    host = dataclasses.replace(local_host, after_hook=("false",))
    result = LocalExecutor().run(
        plan_run(host, agent("true"), task_id="t-ah", prompt="x"), Output()
    )
    assert result.exit_code == 0
    assert result.failure == "after_hook_failed: exit code 1"


def test_a_clone_failure_is_reported_and_the_agent_never_runs(
    local_host: HostSettings, tmp_path: Path
) -> None:
    spec = plan_run(
        local_host,
        agent("sh", "-c", "echo agent-ran"),
        task_id="t-nc",
        prompt="x",
        clone_url=str(tmp_path / "missing.git"),
    )
    out = Output()
    result = LocalExecutor().run(spec, out)
    assert result.exit_code is None and result.failure == "clone_failed: exit code 128"
    assert "agent-ran" not in out.text


def test_cancel_during_a_run(local_host: HostSettings) -> None:
    spec = plan_run(local_host, demo_agent(FLEET_DEMO_SLEEP="60"), task_id="t-cancel", prompt="x")
    cancel = CancelFlag()
    out = Output()
    out.when(b"thinking for", cancel.set)
    result = LocalExecutor().run(spec, out, cancel)
    assert result.cancelled and result.failure == "cancelled"
    assert result.duration_secs < 30
    assert Path(spec.workspace).exists()  # kept for inspection


def test_output_and_receipt_are_redacted(local_host: HostSettings) -> None:
    script = (
        "import json, os, sys\n"
        "sys.stdout.write('key=sk-abcdefghij'); sys.stdout.flush()\n"
        "sys.stdout.write('klmnopqrstuvwxyz and hunter2\\n')\n"
        "json.dump({{'summary': 'used hunter2'}}, open(os.environ['FLEET_RECEIPT_PATH'], 'w'))\n"
    )
    spec = plan_run(
        local_host,
        agent("{python}", "-c", script),
        task_id="t-red",
        prompt="x",
        redactor=Redactor(secrets=["hunter2"]),
    )
    out = Output()
    result = LocalExecutor().run(spec, out)
    assert "key=[REDACTED] and [REDACTED]\n" in out.text
    assert "hunter2" not in out.text and "sk-abcdefghijklm" not in out.text
    assert result.receipt == {"exit_code": 0, "summary": "used [REDACTED]"}


@pytest.mark.parametrize("task_id", ["../x", "", ".hidden", "a/b", "x" * 200])
def test_unsafe_task_ids_cannot_name_a_workspace(local_host: HostSettings, task_id: str) -> None:
    with pytest.raises(ValueError, match="cannot name a workspace"):
        plan_run(local_host, agent("true"), task_id=task_id, prompt="x")


def test_demo_agent_on_an_empty_repository(local_host: HostSettings, tmp_path: Path) -> None:
    empty = tmp_path / "empty.git"
    git("init", "--quiet", "--bare", str(empty))
    spec = plan_run(local_host, demo_agent(), task_id="t-empty", prompt="x", clone_url=str(empty))
    result = LocalExecutor().run(spec, Output())
    assert result.succeeded
    assert (
        git("--git-dir", str(empty), "rev-parse", "fleet/t-empty")
        == (result.receipt or {})["commit_sha"]
    )


def test_workspace_steps_are_done_in_process_like_rm_rf_and_mkdir_p(tmp_path: Path) -> None:
    target = tmp_path / "target"
    (target / "keep").mkdir(parents=True)
    link, plain, tree = tmp_path / "link", tmp_path / "plain", tmp_path / "tree"
    link.symlink_to(target)
    plain.write_text("x")
    (tree / "a" / "b").mkdir(parents=True)
    step = DirsStep(
        "prepare",
        remove=(str(link), str(plain), str(tree), str(tmp_path / "missing")),
        make=(str(tmp_path / "new" / "deep"), str(target)),
    )
    result = LocalExecutor().dirs(step, on_output=Output())
    assert result.exit_code == 0
    assert not link.exists() and not link.is_symlink() and (target / "keep").is_dir()
    assert not plain.exists() and not tree.exists()
    assert (tmp_path / "new" / "deep").is_dir()


def test_a_workspace_that_cannot_be_made_fails_the_attempt(local_host: HostSettings) -> None:
    Path(local_host.work_dir).parent.mkdir(parents=True, exist_ok=True)
    Path(local_host.work_dir).write_text("a file where the work dir should be")
    spec = plan_run(local_host, agent("true"), task_id="t-nodir", prompt="x")
    out = Output()
    result = LocalExecutor().run(spec, out)
    assert result.exit_code is None
    assert result.failure == "prepare_failed: exit code 1"
    assert "[fleet] prepare: " in out.text
