"""Parse a Forgejo webhook delivery into a small typed value, classified for routing.

Routing is on the coarse event (``X-Forgejo-Event``) plus ``action``, which is stable across
Forgejo and Gitea versions. The fine event type (``X-Forgejo-Event-Type``) is kept for logs.
Shapes that trip receivers (all from the Forgejo source, see ``/work/shared/forgejo/README.md``):

- label changes are ``issues`` + ``label_updated`` / ``label_cleared`` with the labels *after*
  the change in ``issue.labels``; there is no ``labeled`` action and no ``label`` object;
- a merge is ``pull_request`` + ``closed`` with ``pull_request.merged: true``;
- a comment on a PR conversation is ``issue_comment`` with ``is_pull: true`` (event type
  ``pull_request_comment``); a review comment is the event ``pull_request_comment`` (ignored);
- ``head.ref`` becomes ``refs/pull/N/head`` once the branch is deleted; ``head.label`` keeps the
  branch name and ``head.sha`` the commit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fleet_common.forgejo.signatures import Headers, fed, header, signed_bytes

EVENT_HEADERS = ("X-Forgejo-Event", "X-Gitea-Event", "X-Gogs-Event", "X-GitHub-Event")
EVENT_TYPE_HEADERS = ("X-Forgejo-Event-Type", "X-Gitea-Event-Type", "X-GitHub-Event-Type")
DELIVERY_HEADERS = (
    "X-Forgejo-Delivery",
    "X-Gitea-Delivery",
    "X-Gogs-Delivery",
    "X-GitHub-Delivery",
)
_PULL_REF_PREFIX = "refs/pull/"


class InvalidDelivery(ValueError):
    """The body is not a JSON object (or a form hook without a JSON ``payload``)."""


class EventKind(StrEnum):
    """What a delivery means to Fleet; everything else is ``IGNORED``."""

    ISSUE_OPENED = "issue_opened"
    ISSUE_EDITED = "issue_edited"
    ISSUE_CLOSED = "issue_closed"
    ISSUE_REOPENED = "issue_reopened"
    ISSUE_LABEL_UPDATED = "issue_label_updated"
    ISSUE_LABEL_CLEARED = "issue_label_cleared"
    ISSUE_COMMENT = "issue_comment"  # any action (created/edited/deleted) on a plain issue
    PR_COMMENT = "pr_comment"  # any action on a PR conversation comment
    PR_OPENED = "pr_opened"
    PR_EDITED = "pr_edited"
    PR_SYNCHRONIZED = "pr_synchronized"
    PR_MERGED = "pr_merged"
    PR_CLOSED = "pr_closed"  # closed without merge
    PR_REOPENED = "pr_reopened"
    IGNORED = "ignored"


_ISSUE_ACTIONS = {
    "opened": EventKind.ISSUE_OPENED,
    "edited": EventKind.ISSUE_EDITED,
    "closed": EventKind.ISSUE_CLOSED,
    "reopened": EventKind.ISSUE_REOPENED,
    "label_updated": EventKind.ISSUE_LABEL_UPDATED,
    "label_cleared": EventKind.ISSUE_LABEL_CLEARED,
}
_ECHO_KINDS = frozenset(
    {
        EventKind.ISSUE_COMMENT,
        EventKind.PR_COMMENT,
        EventKind.ISSUE_LABEL_UPDATED,
        EventKind.ISSUE_LABEL_CLEARED,
    }
)
_PR_ACTIONS = {
    "opened": EventKind.PR_OPENED,
    "edited": EventKind.PR_EDITED,
    "synchronized": EventKind.PR_SYNCHRONIZED,
    "reopened": EventKind.PR_REOPENED,
}


@dataclass(frozen=True, slots=True)
class IssueInfo:
    """The parts of ``issue`` Fleet reads."""

    number: int
    title: str
    body: str
    state: str
    labels: tuple[str, ...]
    is_pull: bool
    html_url: str


@dataclass(frozen=True, slots=True)
class PullInfo:
    """The parts of ``pull_request`` Fleet reads."""

    number: int
    title: str
    body: str
    state: str
    merged: bool
    head_ref: str
    head_label: str
    head_sha: str
    base_ref: str
    html_url: str
    labels: tuple[str, ...]

    @property
    def head_branch(self) -> str | None:
        """The head branch name, also after the branch was deleted (``None`` if unknown)."""
        if self.head_ref and not self.head_ref.startswith(_PULL_REF_PREFIX):
            return self.head_ref
        return self.head_label or None


@dataclass(frozen=True, slots=True)
class CommentInfo:
    """The parts of ``comment`` Fleet reads."""

    id: int
    body: str
    user_login: str
    html_url: str


@dataclass(frozen=True, slots=True)
class Delivery:
    """One parsed webhook delivery."""

    kind: EventKind
    event: str
    event_type: str
    action: str
    delivery_id: str
    digest: str  # sha256 hex of the signed bytes: a manual replay has a new id, same digest
    sender_login: str
    repo_full_name: str
    repo_clone_url: str
    number: int | None
    commit_id: str
    issue: IssueInfo | None
    pull_request: PullInfo | None
    comment: CommentInfo | None

    @property
    def ignored(self) -> bool:
        """True when Fleet has nothing to do with this delivery."""
        return self.kind is EventKind.IGNORED

    def is_echo(self, bot_login: str) -> bool:
        """A comment or label event Fleet's own account caused: the echo of its write-back.

        Pull-request events are never echoes: an agent may open PRs with the bot's account.
        """
        return self.kind in _ECHO_KINDS and self.sender_login.lower() == bot_login.lower() != ""


def parse_delivery(headers: Headers, body: bytes) -> Delivery:
    """Parse ``headers`` and the raw ``body`` of a delivery; raises ``InvalidDelivery``."""
    raw = signed_bytes(body, headers)
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidDelivery(f"body is not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise InvalidDelivery("body is not a JSON object")
    event = _first(headers, EVENT_HEADERS).lower()
    action = _str(payload.get("action"))
    repo = _obj(payload.get("repository"))
    issue = _issue(payload.get("issue"))
    pull = _pull(payload.get("pull_request"))
    comment = _comment(payload.get("comment"))
    number = payload.get("number")
    if not isinstance(number, int) or isinstance(number, bool):
        number = issue.number if issue else (pull.number if pull else None)
    return Delivery(
        kind=classify(event, action, payload),
        event=event,
        event_type=_first(headers, EVENT_TYPE_HEADERS).lower(),
        action=action,
        delivery_id=_first(headers, DELIVERY_HEADERS),
        digest=fed(hashlib.sha256(), raw).hexdigest(),
        sender_login=_str(_obj(payload.get("sender")).get("login")),
        repo_full_name=_str(repo.get("full_name")),
        repo_clone_url=_str(repo.get("clone_url")),
        number=number,
        commit_id=_str(payload.get("commit_id")),
        issue=issue,
        pull_request=pull,
        comment=comment,
    )


def classify(event: str, action: str, payload: Mapping[str, Any]) -> EventKind:
    """Route on the coarse event name plus ``action`` (and ``merged`` / ``is_pull``)."""
    if event == "issues":
        return _ISSUE_ACTIONS.get(action, EventKind.IGNORED)
    if event == "issue_comment":
        is_pull = payload.get("is_pull")
        if not isinstance(is_pull, bool):  # older senders: fall back on the issue itself
            is_pull = _obj(payload.get("issue")).get("pull_request") is not None
        return EventKind.PR_COMMENT if is_pull else EventKind.ISSUE_COMMENT
    if event == "pull_request":
        if action == "closed":
            merged = _obj(payload.get("pull_request")).get("merged") is True
            return EventKind.PR_MERGED if merged else EventKind.PR_CLOSED
        return _PR_ACTIONS.get(action, EventKind.IGNORED)
    return EventKind.IGNORED


def _first(headers: Headers, names: tuple[str, ...]) -> str:
    for name in names:
        value = header(headers, name).strip()
        if value:
            return value
    return ""


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _labels(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list) else []  # Go nil slices arrive as null
    return tuple(_str(item.get("name")) for item in items if isinstance(item, dict))


def _issue(value: Any) -> IssueInfo | None:
    if not isinstance(value, dict):
        return None
    return IssueInfo(
        number=_int(value.get("number")),
        title=_str(value.get("title")),
        body=_str(value.get("body")),
        state=_str(value.get("state")),
        labels=_labels(value.get("labels")),
        is_pull=value.get("pull_request") is not None,
        html_url=_str(value.get("html_url")),
    )


def _pull(value: Any) -> PullInfo | None:
    if not isinstance(value, dict):
        return None
    head, base = _obj(value.get("head")), _obj(value.get("base"))
    return PullInfo(
        number=_int(value.get("number")),
        title=_str(value.get("title")),
        body=_str(value.get("body")),
        state=_str(value.get("state")),
        merged=value.get("merged") is True,
        head_ref=_str(head.get("ref")),
        head_label=_str(head.get("label")),
        head_sha=_str(head.get("sha")),
        base_ref=_str(base.get("ref")),
        html_url=_str(value.get("html_url")),
        labels=_labels(value.get("labels")),
    )


def _comment(value: Any) -> CommentInfo | None:
    if not isinstance(value, dict):
        return None
    return CommentInfo(
        id=_int(value.get("id")),
        body=_str(value.get("body")),
        user_login=_str(_obj(value.get("user")).get("login")),
        html_url=_str(value.get("html_url")),
    )
