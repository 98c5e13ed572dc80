"""The built-in ``demo`` agent: behaves like a coding agent without any model or network.

``python -m fleet_worker.demo_agent PROMPT_FILE`` reads the prompt, appends it to
``FLEET_DEMO.md`` in the workspace, commits on the current branch and pushes it when the
workspace is a git repository with an ``origin``, then writes a receipt to
``$FLEET_RECEIPT_PATH``. For tests: ``FLEET_DEMO_SLEEP`` (seconds) slows it down,
``FLEET_DEMO_EXIT`` makes it exit with that code (after writing its receipt).

With ``FLEET_FORGEJO_URL``, ``FLEET_FORGEJO_TOKEN`` and ``FLEET_REPO`` in its environment (the
first two only if its agent type is configured with them) it opens a pull request for the
pushed branch through Forgejo's API, as a real coding agent would: into the repository's
default branch, with ``Closes #N`` for ``FLEET_ISSUE_NUMBER``, and names it in the receipt.
Only the standard library is used, so it runs wherever Python does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

DEMO_FILE = "FLEET_DEMO.md"
VERSION = "fleet-demo 1"
_GIT_IDENTITY = ("-c", "user.name=Fleet Demo Agent", "-c", "user.email=demo-agent@fleet.invalid")
#: Tries per Forgejo call when it is unreachable or answers 5xx, a second apart.
API_TRIES = 3
API_TIMEOUT_SECS = 10


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
            # The branch is the task's own: a retried attempt replaces what an earlier pushed.
            _git(workspace, "push", "--quiet", "--force", "origin", f"HEAD:refs/heads/{branch}")
            _say(f"pushed {branch} to origin")
            pull = open_pull_request(branch, title, task_id)
            if pull is not None:
                receipt["pr_number"] = pull["number"]
                receipt["pr_url"] = pull.get("html_url") or pull.get("url")
                _say(f"pull request #{pull['number']}: {receipt['pr_url']}")

    code = int(os.environ.get("FLEET_DEMO_EXIT", "0") or 0)
    receipt["exit_code"] = code
    receipt_path = os.environ.get("FLEET_RECEIPT_PATH")
    if receipt_path:
        Path(receipt_path).write_text(json.dumps(receipt, indent=2), encoding="utf-8")
        _say("wrote the receipt")
    _say("done" if code == 0 else f"failing on purpose with exit code {code}")
    return code


def open_pull_request(branch: str, title: str, task_id: str) -> dict[str, Any] | None:
    """Open (or find, if one is already open) the PR of ``branch`` when the environment names
    a Forgejo server, a token and the repository; ``None`` otherwise."""
    url = os.environ.get("FLEET_FORGEJO_URL", "").rstrip("/")
    token = os.environ.get("FLEET_FORGEJO_TOKEN", "")
    repo = os.environ.get("FLEET_REPO", "")
    if not (url and token and repo):
        return None
    if not url.startswith(("http://", "https://")):
        raise RuntimeError(f"FLEET_FORGEJO_URL must be an http(s) URL, not {url!r}")
    api = url if url.endswith("/api/v1") else f"{url}/api/v1"
    owner, _, name = repo.partition("/")
    base_path = f"/repos/{quote(owner, safe='')}/{quote(name, safe='')}"
    issue = os.environ.get("FLEET_ISSUE_NUMBER", "")
    body = f"Closes #{issue}\n\n" if issue.isdigit() else ""
    body += f"Opened by the Fleet demo agent for task `{task_id}`."
    base = _api(api, token, "GET", base_path)[1].get("default_branch") or "main"
    request = {"head": branch, "base": base, "title": f"Fleet demo: {title[:70]}", "body": body}
    status, pull = _api(api, token, "POST", f"{base_path}/pulls", request, accept=(409,))
    if status != 409:
        return dict(pull)
    for page in range(1, 21):  # already open for this branch (an earlier attempt's)
        query = f"{base_path}/pulls?state=open&limit=50&page={page}"
        pulls = _api(api, token, "GET", query)[1]
        for found in pulls:
            if (found.get("head") or {}).get("ref") == branch:
                return dict(found)
        if len(pulls) < 50:
            break
    raise RuntimeError(f"Forgejo says a PR for {branch} exists, but none is open")


def _api(
    api: str,
    token: str,
    method: str,
    path: str,
    payload: dict[str, Any] | None = None,
    *,
    accept: tuple[int, ...] = (),
) -> tuple[int, Any]:
    data = json.dumps(payload).encode() if payload is not None else None
    headers = {"Authorization": f"token {token}", "Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    for attempt in range(1, API_TRIES + 1):
        # The scheme was checked in open_pull_request: http(s) only.
        request = urllib.request.Request(f"{api}{path}", data, headers, method=method)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=API_TIMEOUT_SECS) as response:  # noqa: S310
                text = response.read().decode("utf-8") or "null"
                return response.status, json.loads(text)
        except urllib.error.HTTPError as error:
            if error.code in accept:
                return error.code, None
            if error.code < 500 or attempt == API_TRIES:
                detail = error.read().decode("utf-8", "replace")[:300]
                raise RuntimeError(
                    f"Forgejo: {method} {path}: HTTP {error.code}: {detail}"
                ) from None
        except (urllib.error.URLError, OSError) as error:
            if attempt == API_TRIES:
                raise RuntimeError(f"Forgejo: {method} {path}: {error}") from None
        _say(f"Forgejo did not answer {method} {path}; trying again")
        time.sleep(1.0)
    raise AssertionError("unreachable")


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
