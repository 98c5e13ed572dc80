"""Receipt validation: the PR an agent's receipt names, checked through Forgejo's API.

A task is connected to Forgejo when Forgejo is configured and the task has a ``repo``. For such
a task the PR named by ``pr_number`` (or by the number in ``pr_url``) must be in the task's
repository, be open or merged, and either come from ``fleet/<task_id>`` or close the task's
issue; otherwise the attempt fails ``receipt_invalid``. A valid open PR sends the task to
``in_review``; a PR that is already merged completes it at once (its merge event has come and
gone). Either way the PR is attached to the task (``pr_attached``).

When Forgejo cannot be asked (down, timing out, refusing the token), the receipt is accepted
provisionally: the task goes to ``in_review`` with the PR attached but no head SHA, and the
reconcile sweep verifies it later (``fleet_common.forgejo.reconcile``). Failing the attempt
would burn an attempt, and the agent's work, on an outage that is not the agent's fault.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.orm import object_session

from fleet_common.forgejo import prs
from fleet_common.forgejo.client import (
    ForgejoClient,
    ForgejoError,
    ForgejoNotFound,
    forgejo_client,
)
from fleet_common.settings import Settings
from fleet_common.tasks.lease import PrCheck
from fleet_common.tasks.models import Task

log = logging.getLogger("fleet.forgejo")

ClientFactory = Callable[[], ForgejoClient]
#: The check runs while the task row is locked and the agent waits for its answer: one try,
#: a short timeout, and an outage means "accepted provisionally" (see the module docstring).
RECEIPT_TIMEOUT_SECS = 5.0
# …/owner/repo/pulls/N, also a tab of it (/files, /commits) and the API's …/repos/o/r/pulls/N.
_PR_PATH = re.compile(
    r"(?:^|/)(?P<owner>[^/]+)/(?P<name>[^/]+)/pulls/(?P<number>[0-9]+)(?:/[a-z]+)?/?$"
)


class InvalidPr(ValueError):
    """The receipt's PR does not qualify; the message says why."""


def make_pr_check(settings: Settings, client_factory: ClientFactory | None = None) -> PrCheck:
    """The ``lease.complete`` hook for ``settings``; ``client_factory`` makes a client per call
    (by default one for ``[forgejo]`` with a short timeout)."""
    forgejo = settings.forgejo
    server_url = forgejo.url or None

    def default_factory() -> ForgejoClient:
        return forgejo_client(forgejo, timeout=RECEIPT_TIMEOUT_SECS, retries=0)

    factory = client_factory or default_factory

    def check(task: Task, receipt: dict[str, Any]) -> tuple[bool, str | None]:
        if not forgejo.enabled or not task.repo:
            return False, None  # not connected: the PR is kept as an artifact
        try:
            number = receipt_pr_number(receipt, task.repo)
        except InvalidPr as error:
            return False, str(error)
        try:
            with factory() as client:
                pull = prs.PullRef.from_api(client.get_pull(task.repo, number))
        except ForgejoNotFound:
            return False, f"pull request #{number} does not exist in {task.repo}"
        except ForgejoError as error:
            log.warning("task %s: cannot verify PR #%s now (%s); accepted", task.id, number, error)
            _attach(task, _unverified(receipt, number))
            return True, None
        problem = verify_pull(task, pull, server_url)
        if problem:
            return False, problem
        _attach(task, pull)
        return not pull.merged, None

    return check


def receipt_pr_number(receipt: dict[str, Any], repo: str) -> int:
    """The PR number a receipt names (``pr_number``, or parsed from ``pr_url``)."""
    number = receipt.get("pr_number")
    if number is not None and (not isinstance(number, int) or isinstance(number, bool)):
        raise InvalidPr(f"pr_number {number!r} is not a number")
    url = receipt.get("pr_url")
    if url:
        match = _PR_PATH.search(urlsplit(str(url)).path)
        if match is None:
            raise InvalidPr(
                f"pr_url {url} is not a pull request URL of the form …/owner/repo/pulls/N"
            )
        named = f"{match['owner']}/{match['name']}"
        if named.lower() != repo.lower():
            raise InvalidPr(f"pr_url {url} is in {named}, not in the task's repository {repo}")
        from_url = int(match["number"])
        if number is not None and number != from_url:
            raise InvalidPr(f"pr_number {number} and pr_url {url} name different pull requests")
        number = from_url
    if not number or number <= 0:
        raise InvalidPr("the receipt names no pull request number")
    return int(number)


def verify_pull(task: Task, pull: prs.PullRef, server_url: str | None) -> str | None:
    """Why ``pull`` cannot be the task's PR, or ``None`` when it can."""
    repo = task.repo or ""
    if pull.base_repo and pull.base_repo.lower() != repo.lower():
        return f"pull request #{pull.number} is in {pull.base_repo}, not in {repo}"
    if pull.closed_unmerged:
        return f"pull request #{pull.number} was closed without being merged"
    if pull.state not in ("open", "closed"):
        return f"pull request #{pull.number} is in state {pull.state!r}"
    if not prs.links(task, pull, server_url):
        issue = f"close issue #{task.issue_number}" if task.issue_number else "close an issue"
        return (
            f"pull request #{pull.number} does not {issue} (Closes #N in its title or body) "
            f"and does not come from branch fleet/{task.id}"
        )
    return None


def _unverified(receipt: dict[str, Any], number: int) -> prs.PullRef:
    url = receipt.get("pr_url")
    return prs.PullRef(number, "", "", "open", False, None, "", str(url or ""), "")


def _attach(task: Task, pull: prs.PullRef) -> None:
    session = object_session(task)
    if session is None:  # a detached task (unit tests of the check alone): set, no event
        task.pr_number, task.pr_url = pull.number, pull.html_url or task.pr_url
        task.pr_head_sha = pull.head_sha or None
        return
    prs.attach(session, task, pull, actor=f"agent:{task.agent_id}")
