"""Plan a task attempt: its workspace, its command, and the steps around it.

The plan is data: argv steps and file writes that any executor runs with its own primitives,
so preparing a workspace is written once and works the same locally and over SSH.

Layout on the host::

    <work_dir>/<task_id>/               the workspace (a clone on fleet/<task_id> with a clone_url)
    <work_dir>/<task_id>/.fleet/        prompt.md and receipt.json, excluded from git
"""

from __future__ import annotations

import posixpath
import re
import sys

from fleet_common.settings import AgentTypeSettings, HostSettings
from fleet_worker.executors.base import CommandStep, DirsStep, RunSpec, Step, WriteFileStep
from fleet_worker.executors.template import render_command
from fleet_worker.redaction import Redactor

CONTROL_DIR = ".fleet"
PROMPT_FILE = "prompt.md"
RECEIPT_FILE = "receipt.json"
BRANCH_PREFIX = "fleet/"

_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def workspace_path(work_dir: str, task_id: str) -> str:
    """``<work_dir>/<task_id>``; the task id must be a safe single path component."""
    if not _TASK_ID.fullmatch(task_id):
        raise ValueError(f"task id {task_id!r} cannot name a workspace directory")
    if not work_dir:
        raise ValueError("host has no work_dir")
    return posixpath.join(work_dir, task_id)


def task_branch(task_id: str) -> str:
    """The branch an agent works on for a task with a clone_url."""
    return f"{BRANCH_PREFIX}{task_id}"


def plan_run(
    host: HostSettings,
    agent_type: AgentTypeSettings,
    *,
    task_id: str,
    prompt: str,
    repo: str = "",
    clone_url: str = "",
    issue_number: int | None = None,
    timeout_secs: float | None = None,
    redactor: Redactor | None = None,
    python: str | None = None,
    step_timeout_secs: float = 600.0,
) -> RunSpec:
    """Build the :class:`RunSpec` for one attempt of ``task_id`` on ``host``.

    The agent's environment names the task (``FLEET_TASK_ID``, ``FLEET_REPO``,
    ``FLEET_ISSUE_NUMBER``, empty when unknown), its workspace, receipt path and branch; the
    agent type's ``env`` comes first, so Forgejo's URL and a token reach an agent only when its
    type is configured with them.
    ``timeout_secs`` defaults to the agent type's; ``python`` (the ``{python}`` placeholder)
    to this interpreter on local hosts and ``python3`` on SSH hosts. Without a ``redactor``
    only the built-in token patterns are redacted.
    """
    workspace = workspace_path(host.work_dir, task_id)
    control = posixpath.join(workspace, CONTROL_DIR)
    prompt_path = posixpath.join(control, PROMPT_FILE)
    receipt_path = posixpath.join(control, RECEIPT_FILE)
    branch = task_branch(task_id) if clone_url else ""
    if python is None:
        python = sys.executable if host.transport == "local" else "python3"
    values = {
        "prompt_file": prompt_path,
        "workspace": workspace,
        "task_id": task_id,
        "branch": branch,
        "repo": repo,
        "python": python,
    }
    argv = tuple(render_command(agent_type.command, values))
    fleet_env = {
        "FLEET_TASK_ID": task_id,
        "FLEET_RECEIPT_PATH": receipt_path,
        "FLEET_WORKSPACE": workspace,
        "FLEET_BRANCH": branch,
        "FLEET_REPO": repo,
        "FLEET_ISSUE_NUMBER": str(issue_number) if issue_number is not None else "",
    }
    # Directory housekeeping is data (DirsStep): done in-process locally, one command over SSH.
    setup: list[Step]
    if clone_url:
        setup = [
            DirsStep("prepare", remove=(workspace,)),
            CommandStep("clone", ("git", "clone", "--quiet", "--", clone_url, workspace)),
            CommandStep("branch", ("git", "checkout", "--quiet", "-b", branch), cwd=workspace),
            DirsStep("prepare", make=(control, posixpath.join(workspace, ".git", "info"))),
        ]
    else:
        setup = [DirsStep("prepare", remove=(workspace,), make=(workspace, control))]
    if clone_url:
        # Keep the prompt and receipt out of whatever the agent commits.
        exclude = posixpath.join(workspace, ".git", "info", "exclude")
        setup.append(WriteFileStep("exclude", exclude, f"\n/{CONTROL_DIR}/\n".encode(), True))
    setup.append(WriteFileStep("prompt", prompt_path, prompt.encode("utf-8")))
    if host.before_hook:
        hook = tuple(render_command(host.before_hook, values))
        setup.append(CommandStep("before_hook", hook, cwd=workspace))
    after: tuple[Step, ...] = ()
    if host.after_hook:
        after = (
            CommandStep("after_hook", tuple(render_command(host.after_hook, values)), workspace),
        )
    return RunSpec(
        task_id=task_id,
        argv=argv,
        workspace=workspace,
        prompt_path=prompt_path,
        receipt_path=receipt_path,
        env={**agent_type.env, **fleet_env},
        timeout_secs=timeout_secs or agent_type.timeout_secs,
        branch=branch,
        clone_url=clone_url,
        setup=tuple(setup),
        after=after,
        teardown=(DirsStep("cleanup", remove=(workspace,)),),
        cleanup=host.cleanup,
        step_env={**fleet_env, "GIT_TERMINAL_PROMPT": "0"},
        step_timeout_secs=step_timeout_secs,
        redactor=redactor or Redactor(),
    )
