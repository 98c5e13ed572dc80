"""The fake's state: users, repositories, labels, issues, PRs, comments and commit statuses,
with the helpers tests use to arrange it."""

from __future__ import annotations

import hashlib
import itertools
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fleet_common.forgejo.references import closing_issue_numbers

Json = dict[str, Any]


def timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sha(*parts: object) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()


@dataclass
class Label:
    id: int
    name: str
    color: str
    description: str = ""
    exclusive: bool = False
    is_archived: bool = False


@dataclass
class Comment:
    id: int
    repo: str
    number: int
    body: str
    login: str
    created: str
    updated: str


@dataclass
class Pull:
    head: str
    base: str
    head_sha: str
    base_sha: str
    merged: bool = False
    merged_at: str | None = None
    merge_commit_sha: str | None = None
    merged_by: str | None = None


@dataclass
class Issue:
    id: int
    number: int
    title: str
    body: str
    login: str
    created: str
    updated: str
    state: str = "open"
    labels: list[int] = field(default_factory=list)
    closed_at: str | None = None
    pull: Pull | None = None


@dataclass
class Repo:
    id: int
    owner: str
    name: str
    clone_url: str
    default_branch: str = "main"
    labels: dict[int, Label] = field(default_factory=dict)
    issues: dict[int, Issue] = field(default_factory=dict)
    statuses: dict[str, list[Json]] = field(default_factory=dict)

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


@dataclass
class Call:
    """One request the fake answered; ``route`` is the swagger path (``None`` if unrouted)."""

    method: str
    route: str | None
    status: int
    body: Any


class ForgejoState:
    """What the fake knows, and the test helpers that change it (all under one lock)."""

    def __init__(self, *, token: str, bot_login: str) -> None:
        self.token, self.bot_login = token, bot_login
        self.port = 0
        self._lock = threading.RLock()
        self._ids = itertools.count(100)
        self._users: dict[str, int] = {}
        self._tokens: dict[str, str] = {}
        self._repos: dict[str, Repo] = {}
        self._comments: dict[int, Comment] = {}
        self.add_user(bot_login, token=token)

    @property
    def url(self) -> str:
        """The fake's ROOT_URL, with the trailing slash Forgejo always has."""
        return f"http://127.0.0.1:{self.port}/"

    @property
    def api_url(self) -> str:
        """``{url}api/v1``."""
        return f"{self.url}api/v1"

    def add_user(self, login: str, *, token: str | None = None) -> None:
        """A user (the other helpers create theirs implicitly); ``token`` lets it call the API."""
        with self._lock:
            self._users.setdefault(login, next(self._ids))
            if token:
                self._tokens[token] = login

    def add_repo(self, owner: str, name: str, clone_url: str | None = None) -> str:
        """A repository (default branch ``main``); returns its full name ``owner/name``."""
        with self._lock:
            self.add_user(owner)
            url = clone_url or f"{self.url}{owner}/{name}.git"
            repo = Repo(next(self._ids), owner, name, url)
            self._repos[repo.full_name] = repo
            return repo.full_name

    def add_label(
        self,
        repo: str,
        name: str,
        *,
        color: str = "ededed",
        exclusive: bool = False,
        description: str = "",
    ) -> int:
        """A repository label; returns its id (an existing label of that name is reused)."""
        with self._lock:
            r = self.repo(repo)
            found = next((lb.id for lb in r.labels.values() if lb.name == name), None)
            if found is None:
                found = next(self._ids)
                r.labels[found] = Label(found, name, color.lstrip("#"), description, exclusive)
            return found

    def add_issue(
        self,
        repo: str,
        title: str,
        body: str = "",
        *,
        labels: tuple[str, ...] = (),
        user: str | None = None,
    ) -> int:
        """An open issue (labels by name, created if missing); returns its number."""
        with self._lock:
            r, now = self.repo(repo), timestamp()
            self.add_user(user or r.owner)
            number = len(r.issues) + 1
            r.issues[number] = Issue(
                next(self._ids), number, title, body, user or r.owner, now, now
            )
            self.label_issue(repo, number, *labels)
            return number

    def label_issue(self, repo: str, number: int, *names: str, replace: bool = False) -> None:
        """Add labels by name (created if missing); ``replace`` drops the others first."""
        with self._lock:
            ids = [self.add_label(repo, name) for name in names]
            self._set_labels(self.repo(repo), self.issue(repo, number), ids, replace=replace)

    def unlabel_issue(self, repo: str, number: int, *names: str) -> None:
        """Remove labels by name."""
        with self._lock:
            r, issue = self.repo(repo), self.issue(repo, number)
            issue.labels = [i for i in issue.labels if r.labels[i].name not in names]
            issue.updated = timestamp()

    def set_issue_state(self, repo: str, number: int, state: str) -> None:
        """Close (``"closed"``) or reopen (``"open"``) an issue or PR."""
        with self._lock:
            issue = self.issue(repo, number)
            issue.state, issue.updated = state, timestamp()
            issue.closed_at = issue.updated if state == "closed" else None

    def add_comment(self, repo: str, number: int, body: str, *, user: str | None = None) -> int:
        """A comment on an issue or PR (by the bot unless ``user``); returns its id."""
        with self._lock:
            self.issue(repo, number)
            login, now = user or self.bot_login, timestamp()
            self.add_user(login)
            comment = Comment(next(self._ids), repo, number, body, login, now, now)
            self._comments[comment.id] = comment
            return comment.id

    def open_pr(
        self,
        repo: str,
        head: str,
        title: str,
        body: str = "",
        *,
        base: str | None = None,
        user: str | None = None,
    ) -> int:
        """A PR from branch ``head`` (by the bot unless ``user``); returns its number."""
        with self._lock:
            number = self.add_issue(repo, title, body, user=user or self.bot_login)
            base = base or self.repo(repo).default_branch
            pull = Pull(head, base, sha(repo, head, number), sha(repo, base))
            self.issue(repo, number).pull = pull
            return number

    def push_pr(self, repo: str, number: int, head_sha: str) -> None:
        """New commits on the PR's head branch (what ``synchronized`` reports)."""
        with self._lock:
            self.pull(repo, number).head_sha = head_sha
            self.issue(repo, number).updated = timestamp()

    def merge_pr(self, repo: str, number: int, *, merged_by: str | None = None) -> str:
        """Merge a PR and close the issues it closes, as Forgejo does; returns the merge SHA."""
        with self._lock:
            issue, pull, r = self.issue(repo, number), self.pull(repo, number), self.repo(repo)
            self.set_issue_state(repo, number, "closed")
            pull.merged, pull.merged_at = True, issue.updated
            pull.merge_commit_sha = sha("merge", repo, number)
            pull.merged_by = merged_by or r.owner
            for closed in closing_issue_numbers(issue.title, issue.body, repo, server_url=self.url):
                if closed in r.issues and r.issues[closed].pull is None:
                    self.set_issue_state(repo, closed, "closed")
            return pull.merge_commit_sha

    def repo(self, repo: str) -> Repo:
        """The state of a repository (KeyError if unknown)."""
        return self._repos[repo]

    def issue(self, repo: str, number: int) -> Issue:
        """The state of an issue or PR (KeyError if unknown)."""
        return self._repos[repo].issues[number]

    def pull(self, repo: str, number: int) -> Pull:
        """The PR part of a PR (KeyError for a plain issue)."""
        pull = self.issue(repo, number).pull
        if pull is None:
            raise KeyError(number)
        return pull

    def labels_of(self, repo: str, number: int) -> list[str]:
        """Names of the labels on an issue or PR."""
        r = self.repo(repo)
        return [r.labels[i].name for i in self.issue(repo, number).labels]

    def comments_of(self, repo: str, number: int) -> list[Comment]:
        """The comments on an issue or PR, oldest first."""
        return [c for c in self._comments.values() if (c.repo, c.number) == (repo, number)]

    def statuses_of(self, repo: str, sha: str) -> list[Json]:
        """Commit statuses posted for ``sha``, oldest first."""
        return list(self.repo(repo).statuses.get(sha, []))

    def _set_labels(self, r: Repo, issue: Issue, ids: list[int], *, replace: bool) -> None:
        def scope(label_id: int) -> str | None:
            label = r.labels[label_id]
            return label.name.rsplit("/", 1)[0] if label.exclusive and "/" in label.name else None

        current = [] if replace else list(issue.labels)
        for label_id in ids:
            if scope(label_id) is not None:  # an exclusive label evicts the rest of its scope
                current = [i for i in current if scope(i) != scope(label_id)]
            current += [] if label_id in current else [label_id]
        issue.labels, issue.updated = current, timestamp()
