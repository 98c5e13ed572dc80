"""A stateful fake Forgejo: a real HTTP server speaking Forgejo v16's shapes and status codes.

Objects are rendered from the constructed payloads in ``tests/forgejo/data/payloads`` (byte
copies of ``/work/shared/forgejo/payloads``), so every key Forgejo sends is there, and
``tests/forgejo/test_forgejo_fake_schema.py`` validates the answers against Forgejo's swagger.
Every endpoint needs ``Authorization: token <t>`` (401 otherwise). Lists paginate with
``page``/``limit`` (default 30, at most 50) and answer ``Link`` and ``X-Total-Count`` as Forgejo.

Failure injection: ``fake.fail_mode = "refuse"`` closes the listening socket (connections are
refused), ``"503"`` answers 503 to everything, ``None`` restores; ``fail_next(n)`` fails only
the next ``n`` requests; ``hang()`` holds every answer until ``release()``.
``delivery(...)`` builds a signed webhook shaped like Forgejo's.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from fleet_common.forgejo.references import closing_issue_numbers
from fleet_common.forgejo.signatures import sign

DATA_DIR = Path(__file__).resolve().parent.parent / "forgejo" / "data"
PAYLOAD_DIR = DATA_DIR / "payloads"
SWAGGER_PATH = DATA_DIR / "forgejo-v16.0-swagger.v1.json"
WEBHOOK_SECRET = "test-secret"
_EXAMPLE_ROOT = "https://forgejo.example.com/"
Json = dict[str, Any]
Args = dict[str, Any]
Reply = tuple[int, Any, dict[str, str]]

# (method, swagger path, handler); the swagger path is also what the schema test looks up.
ROUTES: list[tuple[str, str, str]] = [
    ("GET", "/user", "get_user"),
    ("GET", "/version", "get_version"),
    ("GET", "/repos/{owner}/{repo}", "get_repo"),
    ("GET", "/repos/{owner}/{repo}/issues", "list_issues"),
    ("GET", "/repos/{owner}/{repo}/issues/{index}", "get_issue"),
    ("PATCH", "/repos/{owner}/{repo}/issues/{index}", "edit_issue"),
    ("GET", "/repos/{owner}/{repo}/issues/{index}/comments", "list_comments"),
    ("POST", "/repos/{owner}/{repo}/issues/{index}/comments", "create_comment"),
    ("PATCH", "/repos/{owner}/{repo}/issues/comments/{id}", "edit_comment"),
    ("DELETE", "/repos/{owner}/{repo}/issues/comments/{id}", "delete_comment"),
    ("GET", "/repos/{owner}/{repo}/labels", "list_labels"),
    ("POST", "/repos/{owner}/{repo}/labels", "create_label"),
    ("GET", "/repos/{owner}/{repo}/issues/{index}/labels", "get_issue_labels"),
    ("POST", "/repos/{owner}/{repo}/issues/{index}/labels", "add_issue_labels"),
    ("PUT", "/repos/{owner}/{repo}/issues/{index}/labels", "replace_issue_labels"),
    ("DELETE", "/repos/{owner}/{repo}/issues/{index}/labels", "clear_issue_labels"),
    ("DELETE", "/repos/{owner}/{repo}/issues/{index}/labels/{identifier}", "remove_issue_label"),
    ("GET", "/repos/{owner}/{repo}/pulls", "list_pulls"),
    ("POST", "/repos/{owner}/{repo}/pulls", "create_pull"),
    ("GET", "/repos/{owner}/{repo}/pulls/{index}", "get_pull"),
    ("GET", "/repos/{owner}/{repo}/pulls/{index}/merge", "is_merged"),
    ("GET", "/repos/{owner}/{repo}/statuses/{sha}", "list_statuses"),
    ("POST", "/repos/{owner}/{repo}/statuses/{sha}", "create_status"),
]


def load_payload(name: str) -> tuple[dict[str, str], bytes]:
    """A constructed payload (e.g. ``"issues.opened"``): its headers and its exact bytes."""
    headers = json.loads((PAYLOAD_DIR / f"{name}.headers.json").read_text())
    headers.pop("_note", None)
    return headers, (PAYLOAD_DIR / f"{name}.json").read_bytes()


def payload_names() -> list[str]:
    """Names of all constructed payloads."""
    files = PAYLOAD_DIR.glob("*.json")
    return sorted(p.name[:-5] for p in files if not p.name.endswith(".headers.json"))


def marshal(payload: Any) -> bytes:
    """Serialise like Go's ``json.MarshalIndent(v, "", "  ")``: ``< > &`` escaped, no newline."""
    text = json.dumps(payload, indent=2, ensure_ascii=False)
    for char in "<>&\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text.encode()


@functools.cache
def _example(name: str) -> str:
    return (PAYLOAD_DIR / f"{name}.json").read_text()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha(*parts: object) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()


class _Abort(Exception):
    def __init__(self, status: int, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.errors = status, message, errors


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


class _QuietHandler(WSGIRequestHandler):
    # HTTP/1.0: one connection per request, so "refuse" bites on the very next call.
    protocol_version = "HTTP/1.0"

    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


class FakeForgejo:
    """The fake server and its state; a context manager, or call ``start``/``stop``."""

    def __init__(self, *, token: str = "fleet-token", bot_login: str = "fleet-bot") -> None:
        self.token, self.bot_login = token, bot_login
        self.calls: list[Call] = []
        self.retry_after: str | None = None  # sent with injected failures when set
        self.port = 0
        self._fail_mode: str | None = None
        self._fail_next: list[int] = []
        self._gate = threading.Event()  # cleared by hang(): requests wait, as on a stuck server
        self._gate.set()
        self._lock = threading.RLock()
        self._ids = itertools.count(100)
        self._users: dict[str, int] = {}
        self._tokens: dict[str, str] = {}
        self._repos: dict[str, Repo] = {}
        self._comments: dict[int, Comment] = {}
        self._caller = bot_login
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.add_user(bot_login, token=token)
        self._map = Map([Rule(_rule(p), methods=[m], endpoint=f"{m} {p}") for m, p, _ in ROUTES])
        self._handlers = {f"{m} {p}": (p, getattr(self, f"_{h}")) for m, p, h in ROUTES}

    # -- lifecycle and failure injection -------------------------------------------------------

    @property
    def url(self) -> str:
        """The fake's ROOT_URL, with the trailing slash Forgejo always has."""
        return f"http://127.0.0.1:{self.port}/"

    @property
    def api_url(self) -> str:
        """``{url}api/v1``."""
        return f"{self.url}api/v1"

    def start(self) -> FakeForgejo:
        """Listen on 127.0.0.1: a free port the first time, the same port after a refusal."""
        self._server = make_server(
            "127.0.0.1", self.port, self._wsgi, threaded=True, request_handler=_QuietHandler
        )
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,))
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listening socket: from now on connections are refused."""
        self.release()
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = self._thread = None

    def __enter__(self) -> FakeForgejo:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def fail_mode(self) -> str | None:
        """``None``, ``"refuse"`` (socket closed) or ``"503"`` (every answer a 503)."""
        return self._fail_mode

    @fail_mode.setter
    def fail_mode(self, mode: str | None) -> None:
        if mode not in (None, "refuse", "503"):
            raise ValueError(f"unknown fail mode {mode!r}")
        if mode == "refuse":
            self.stop()
        elif self._server is None and self.port:
            self.start()
        self._fail_mode = mode

    def hang(self) -> None:
        """Accept connections but answer nothing until ``release()`` (for timeouts)."""
        self._gate.clear()

    def release(self) -> None:
        """Let held and new requests through again."""
        self._gate.set()

    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the next ``count`` requests with ``status``, then behave again."""
        with self._lock:
            self._fail_next.extend([status] * count)

    # -- test helpers: state -------------------------------------------------------------------

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
            r, now = self.repo(repo), _now()
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
            issue.updated = _now()

    def set_issue_state(self, repo: str, number: int, state: str) -> None:
        """Close (``"closed"``) or reopen (``"open"``) an issue or PR."""
        with self._lock:
            issue = self.issue(repo, number)
            issue.state, issue.updated = state, _now()
            issue.closed_at = issue.updated if state == "closed" else None

    def add_comment(self, repo: str, number: int, body: str, *, user: str | None = None) -> int:
        """A comment on an issue or PR (by the bot unless ``user``); returns its id."""
        with self._lock:
            self.issue(repo, number)
            login, now = user or self.bot_login, _now()
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
            pull = Pull(head, base, _sha(repo, head, number), _sha(repo, base))
            self.issue(repo, number).pull = pull
            return number

    def push_pr(self, repo: str, number: int, head_sha: str) -> None:
        """New commits on the PR's head branch (what ``synchronized`` reports)."""
        with self._lock:
            self.pull(repo, number).head_sha = head_sha
            self.issue(repo, number).updated = _now()

    def merge_pr(self, repo: str, number: int, *, merged_by: str | None = None) -> str:
        """Merge a PR and close the issues it closes, as Forgejo does; returns the merge SHA."""
        with self._lock:
            issue, pull, r = self.issue(repo, number), self.pull(repo, number), self.repo(repo)
            self.set_issue_state(repo, number, "closed")
            pull.merged, pull.merged_at = True, issue.updated
            pull.merge_commit_sha = _sha("merge", repo, number)
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

    # -- test helpers: webhooks ----------------------------------------------------------------

    def delivery(
        self,
        event: str,
        action: str,
        *,
        repo: str,
        number: int,
        sender: str | None = None,
        comment_id: int | None = None,
        changes: Json | None = None,
        commit_id: str = "",
        secret: str = WEBHOOK_SECRET,
        delivery_id: str | None = None,
    ) -> tuple[dict[str, str], bytes]:
        """A signed delivery of ``event`` (``issues``, ``issue_comment`` or ``pull_request``)
        about issue/PR ``number`` as it is now, with Forgejo's key order and header set."""
        with self._lock:
            r, issue = self.repo(repo), self.issue(repo, number)
            is_pull, login = issue.pull is not None, sender or self.bot_login
            self.add_user(login)
            body: Json = {"action": action}
            if event == "issue_comment":
                if comment_id is None:
                    raise ValueError("an issue_comment delivery needs comment_id (add_comment)")
                body["issue"] = self._issue_json(r, issue)
                if is_pull:
                    body["pull_request"] = self._pull_json(r, issue)
                body["comment"] = self._comment_json(r, self._comments[comment_id])
            elif event == "pull_request":
                body.update(number=number, pull_request=self._pull_json(r, issue))
            else:
                body.update(number=number, issue=self._issue_json(r, issue))
            body.update({"changes": changes} if changes else {})
            body.update({"requested_reviewer": None} if event == "pull_request" else {})
            body.update(repository=self._repo_json(r), sender=self._user_json(login))
            if event == "issue_comment":
                body["is_pull"] = is_pull
            else:
                body["commit_id"] = commit_id
            body.update({"review": None} if event == "pull_request" else {})
            payload = marshal(body)
        return _delivery_headers(event, action, payload, secret, delivery_id, is_pull), payload

    # -- rendering, from the constructed payloads ----------------------------------------------

    def _tpl(self, name: str, key: str) -> Json:
        node = json.loads(_example(name).replace(_EXAMPLE_ROOT, self.url))[key]
        return dict(node)

    def _user_json(self, login: str) -> Json:
        return {
            **self._tpl("issues.opened", "sender"),
            "id": self._users.get(login, 0),
            "login": login,
            "username": login,
            "full_name": login,
            "email": f"{login}@noreply.forgejo.example.com",
            "html_url": f"{self.url}{login}",
            "avatar_url": f"{self.url}avatars/{_sha(login)[:32]}",
        }

    def _repo_json(self, r: Repo) -> Json:
        web, api, ssh = (
            f"{self.url}{r.full_name}",
            f"{self.api_url}/repos/{r.full_name}",
            "ssh://git@127.0.0.1",
        )
        open_items = [i for i in r.issues.values() if i.state == "open"]
        return {
            **self._tpl("issues.opened", "repository"),
            "id": r.id,
            "owner": self._user_json(r.owner),
            "name": r.name,
            "full_name": r.full_name,
            "html_url": web,
            "url": api,
            "languages_url": f"{api}/languages",
            "clone_url": r.clone_url,
            "ssh_url": f"{ssh}/{r.full_name}.git",
            "wiki_clone_url": f"{web}.wiki.git",
            "wiki_ssh_url": f"{ssh}/{r.full_name}.wiki.git",
            "default_branch": r.default_branch,
            "open_issues_count": sum(1 for i in open_items if i.pull is None),
            "open_pr_counter": sum(1 for i in open_items if i.pull is not None),
        }

    def _label_json(self, r: Repo, label: Label) -> Json:
        return {
            "id": label.id,
            "name": label.name,
            "exclusive": label.exclusive,
            "is_archived": label.is_archived,
            "color": label.color,
            "description": label.description,
            "url": f"{self.api_url}/repos/{r.full_name}/labels/{label.id}",
        }

    def _common(self, r: Repo, issue: Issue) -> Json:
        # Fields an issue and a PR render alike (v16: a PR's issue url is …/pulls/N too).
        kind = "pulls" if issue.pull else "issues"
        return {
            "id": issue.id,
            "url": f"{self.api_url}/repos/{r.full_name}/{kind}/{issue.number}",
            "html_url": f"{self.url}{r.full_name}/{kind}/{issue.number}",
            "number": issue.number,
            "user": self._user_json(issue.login),
            "title": issue.title,
            "body": issue.body,
            "labels": [self._label_json(r, r.labels[i]) for i in issue.labels],
            "state": issue.state,
            "comments": len(self.comments_of(r.full_name, issue.number)),
            "created_at": issue.created,
            "updated_at": issue.updated,
            "closed_at": issue.closed_at,
        }

    def _issue_json(self, r: Repo, issue: Issue) -> Json:
        out = {**self._tpl("issues.opened", "issue"), **self._common(r, issue)}
        out["repository"] = {"id": r.id, "name": r.name, "owner": r.owner, "full_name": r.full_name}
        if issue.pull is not None:
            out["pull_request"] = {
                "merged": issue.pull.merged,
                "merged_at": issue.pull.merged_at,
                "draft": False,
                "html_url": out["html_url"],
            }
        return out

    def _pull_json(self, r: Repo, issue: Issue) -> Json:
        if issue.pull is None:
            raise KeyError(issue.number)
        p, repo = issue.pull, self._repo_json(r)
        out = {**self._tpl("pull_request.opened", "pull_request"), **self._common(r, issue)}
        return {
            **out,
            "diff_url": f"{out['html_url']}.diff",
            "patch_url": f"{out['html_url']}.patch",
            "merged": p.merged,
            "merged_at": p.merged_at,
            "merge_commit_sha": p.merge_commit_sha,
            "merged_by": self._user_json(p.merged_by) if p.merged_by else None,
            "merge_base": p.base_sha,
            "base": {
                "label": p.base,
                "ref": p.base,
                "sha": p.base_sha,
                "repo_id": r.id,
                "repo": repo,
            },
            "head": {
                "label": p.head,
                "ref": p.head,
                "sha": p.head_sha,
                "repo_id": r.id,
                "repo": repo,
            },
        }

    def _comment_json(self, r: Repo, c: Comment) -> Json:
        is_pull = r.issues[c.number].pull is not None
        page = f"{self.url}{r.full_name}/{'pulls' if is_pull else 'issues'}/{c.number}"
        return {
            **self._tpl("issue_comment.created", "comment"),
            "id": c.id,
            "html_url": f"{page}#issuecomment-{c.id}",
            "pull_request_url": page if is_pull else "",
            "issue_url": "" if is_pull else page,
            "user": self._user_json(c.login),
            "body": c.body,
            "created_at": c.created,
            "updated_at": c.updated,
        }

    # -- HTTP ----------------------------------------------------------------------------------

    def _wsgi(self, environ: Any, start_response: Any) -> Any:
        request = Request(environ)
        self._gate.wait(timeout=60)
        with self._lock:
            route, (status, body, headers) = self._dispatch(request)
            self.calls.append(Call(request.method, route, status, body))
        response = Response(status=status)
        if status != 204:
            response = Response(json.dumps(body), status, mimetype="application/json")
            response.headers["Content-Type"] = "application/json;charset=utf-8"
        response.headers.update(headers)
        return response(environ, start_response)

    def _dispatch(self, request: Request) -> tuple[str | None, Reply]:
        if self._fail_mode == "503" or self._fail_next:
            status = self._fail_next.pop(0) if self._fail_next else 503
            extra = {"Retry-After": self.retry_after} if self.retry_after else {}
            return None, (status, {"message": "injected failure", "url": self._doc}, extra)
        try:
            endpoint, args = self._map.bind("fake").match(
                request.path.removeprefix("/api/v1"), method=request.method
            )
        except HTTPException as exc:
            return None, (exc.code or 404, self._error(exc.code or 404, "no route", None), {})
        route, handler = self._handlers[str(endpoint)]
        try:
            self._caller = self._authenticate(request)
            return route, handler(request, args)
        except _Abort as abort:
            return route, (abort.status, self._error(abort.status, abort.message, abort.errors), {})

    @property
    def _doc(self) -> str:
        return f"{self.url}api/swagger"

    def _error(self, status: int, message: str, errors: list[str] | None) -> Json:
        if status == 404:
            return {
                "errors": errors or [message],
                "message": "The target couldn't be found.",
                "url": self._doc,
            }
        return {"message": message, "url": self._doc}

    def _authenticate(self, request: Request) -> str:
        fields = request.headers.get("Authorization", "").split()
        if len(fields) != 2 or fields[0].lower() not in ("token", "bearer"):
            raise _Abort(401, "token is required")
        if fields[1] not in self._tokens:
            raise _Abort(401, "user does not exist [uid: 0, name: ]")
        return self._tokens[fields[1]]

    def _repo_of(self, a: Args) -> Repo:
        wanted = f"{a['owner']}/{a['repo']}".lower()
        for name, repo in self._repos.items():
            if name.lower() == wanted:
                return repo
        raise _Abort(
            404,
            "GetRepositoryByName",
            [
                f"repository does not exist [id: 0, uid: 0, "
                f"owner_name: {a['owner']}, name: {a['repo']}]"
            ],
        )

    def _issue_of(self, a: Args) -> tuple[Repo, Issue]:
        r = self._repo_of(a)
        if a["index"] not in r.issues:
            raise _Abort(
                404,
                "GetIssueByIndex",
                [f"issue does not exist [id: 0, repo_id: {r.id}, index: {a['index']}]"],
            )
        return r, r.issues[a["index"]]

    def _pull_of(self, a: Args) -> tuple[Repo, Issue]:
        r, issue = self._issue_of(a)
        if issue.pull is None:
            raise _Abort(
                404,
                "GetPullRequestByIndex",
                [f"pull request does not exist [id: 0, issue_id: {issue.id}]"],
            )
        return r, issue

    def _comment_of(self, a: Args) -> tuple[Repo, Comment]:
        r, comment = self._repo_of(a), self._comments.get(a["id"])
        if comment is None or comment.repo != r.full_name:
            raise _Abort(404, "GetCommentByID", [f"comment does not exist [id: {a['id']}]"])
        return r, comment

    def _page(self, request: Request, items: list[Any]) -> Reply:
        limit = min(max(request.args.get("limit", type=int) or 30, 1), 50)
        page = max(request.args.get("page", type=int) or 1, 1)
        pages = max((len(items) + limit - 1) // limit, 1)

        def link(n: int, rel: str) -> str:
            query = sorted({**request.args.to_dict(), "page": str(n), "limit": str(limit)}.items())
            return f'<{self.url.rstrip("/")}{request.path}?{urlencode(query)}>; rel="{rel}"'

        links = [link(page + 1, "next"), link(pages, "last")] if page < pages else []
        links += [link(1, "first"), link(page - 1, "prev")] if page > 1 else []
        headers = {
            "X-Total-Count": str(len(items)),
            "Access-Control-Expose-Headers": "Link, X-Total-Count",
        }
        headers.update({"Link": ",".join(links)} if links else {})
        return 200, items[(page - 1) * limit : page * limit], headers

    def _body(self, request: Request) -> Json:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise _Abort(422, "[]: invalid JSON body")
        return body

    def _set_labels(self, r: Repo, issue: Issue, ids: list[int], *, replace: bool) -> None:
        def scope(label_id: int) -> str | None:
            label = r.labels[label_id]
            return label.name.rsplit("/", 1)[0] if label.exclusive and "/" in label.name else None

        current = [] if replace else list(issue.labels)
        for label_id in ids:
            if scope(label_id) is not None:  # an exclusive label evicts the rest of its scope
                current = [i for i in current if scope(i) != scope(label_id)]
            current += [] if label_id in current else [label_id]
        issue.labels, issue.updated = current, _now()

    def _label_ids(self, r: Repo, request: Request) -> list[int]:
        refs = self._body(request).get("labels") or []
        if all(isinstance(x, int) and not isinstance(x, bool) for x in refs):
            return [x for x in refs if x in r.labels]
        if all(isinstance(x, str) for x in refs):
            by_name = {lb.name: lb.id for lb in r.labels.values()}
            return [by_name[x] for x in refs if x in by_name]  # unknown names are dropped
        raise _Abort(400, "a label must be an integer or a string")

    # -- handlers ------------------------------------------------------------------------------

    def _get_user(self, request: Request, a: Args) -> Reply:
        return 200, self._user_json(self._caller), {}

    def _get_version(self, request: Request, a: Args) -> Reply:
        return 200, {"version": "16.0.0+gitea-1.22.0"}, {}

    def _get_repo(self, request: Request, a: Args) -> Reply:
        return 200, self._repo_json(self._repo_of(a)), {}

    def _list_issues(self, request: Request, a: Args) -> Reply:
        r, args = self._repo_of(a), request.args
        state, kind = args.get("state", "open"), args.get("type", "")
        known = {lb.name for lb in r.labels.values()}  # Forgejo drops unknown names, and then
        wanted = {n for n in args.get("labels", "").split(",") if n in known}  # may not filter
        found = []
        for issue in sorted(r.issues.values(), key=lambda i: -i.number):  # newest first
            names = {r.labels[i].name for i in issue.labels}
            is_kind = kind in ("", "pulls" if issue.pull else "issues")
            if state in (issue.state, "all") and wanted <= names and is_kind:
                found.append(self._issue_json(r, issue))
        return self._page(request, found)

    def _get_issue(self, request: Request, a: Args) -> Reply:
        return 200, self._issue_json(*self._issue_of(a)), {}

    def _edit_issue(self, request: Request, a: Args) -> Reply:
        (r, issue), body = self._issue_of(a), self._body(request)
        issue.title = str(body.get("title") or issue.title)
        issue.body = body["body"] if isinstance(body.get("body"), str) else issue.body
        if body.get("state") in ("open", "closed"):
            self.set_issue_state(r.full_name, issue.number, body["state"])
        issue.updated = _now()
        return 201, self._issue_json(r, issue), {}

    def _list_comments(self, request: Request, a: Args) -> Reply:  # not paginated in Forgejo
        r, issue = self._issue_of(a)
        found = [self._comment_json(r, c) for c in self.comments_of(r.full_name, issue.number)]
        return 200, found, {"X-Total-Count": str(len(found))}

    def _create_comment(self, request: Request, a: Args) -> Reply:
        (r, issue), text = self._issue_of(a), self._body(request).get("body")
        if not isinstance(text, str) or not text:
            raise _Abort(422, "[Body]: Required")
        comment_id = self.add_comment(r.full_name, issue.number, text, user=self._caller)
        return 201, self._comment_json(r, self._comments[comment_id]), {}

    def _edit_comment(self, request: Request, a: Args) -> Reply:
        (r, comment), text = self._comment_of(a), self._body(request).get("body")
        if not isinstance(text, str):
            raise _Abort(422, "[Body]: Required")
        if comment.login != self._caller:
            raise _Abort(403, "user should be the poster or a writer")
        comment.body, comment.updated = text, _now()
        return 200, self._comment_json(r, comment), {}

    def _delete_comment(self, request: Request, a: Args) -> Reply:
        del self._comments[self._comment_of(a)[1].id]
        return 204, None, {}

    def _list_labels(self, request: Request, a: Args) -> Reply:
        r = self._repo_of(a)
        labels = sorted(r.labels.values(), key=lambda lb: lb.name)
        return self._page(request, [self._label_json(r, lb) for lb in labels])

    def _create_label(self, request: Request, a: Args) -> Reply:
        r, body = self._repo_of(a), self._body(request)
        name, color = body.get("name"), body.get("color")
        if not isinstance(name, str) or not name or not isinstance(color, str):
            raise _Abort(422, "[Name Color]: Required")
        if not re.fullmatch(r"#?(?:[0-9a-fA-F]{6}|[0-9a-fA-F]{3})", color):
            raise _Abort(422, f"invalid color: {color}")
        label = Label(
            next(self._ids),
            name,
            color.lstrip("#").lower(),
            str(body.get("description") or ""),
            bool(body.get("exclusive")),
            bool(body.get("is_archived")),
        )
        r.labels[label.id] = label  # Forgejo allows two labels of one name; so does the fake
        return 201, self._label_json(r, label), {}

    def _labels_reply(self, r: Repo, issue: Issue) -> Reply:
        return 200, [self._label_json(r, r.labels[i]) for i in issue.labels], {}

    def _get_issue_labels(self, request: Request, a: Args) -> Reply:
        return self._labels_reply(*self._issue_of(a))

    def _add_issue_labels(self, request: Request, a: Args) -> Reply:
        r, issue = self._issue_of(a)
        self._set_labels(r, issue, self._label_ids(r, request), replace=False)
        return self._labels_reply(r, issue)

    def _replace_issue_labels(self, request: Request, a: Args) -> Reply:
        r, issue = self._issue_of(a)
        self._set_labels(r, issue, self._label_ids(r, request), replace=True)
        return self._labels_reply(r, issue)

    def _clear_issue_labels(self, request: Request, a: Args) -> Reply:
        self._set_labels(*self._issue_of(a), [], replace=True)
        return 204, None, {}

    def _remove_issue_label(self, request: Request, a: Args) -> Reply:
        (r, issue), ident = self._issue_of(a), a["identifier"]
        by_name = {lb.name: lb.id for lb in r.labels.values()}  # name or id, as in v13+
        label_id = int(ident) if ident.isdigit() else by_name.get(ident)
        if label_id not in r.labels:
            raise _Abort(422, f"label does not exist [label_id: {ident}]")
        issue.labels, issue.updated = [i for i in issue.labels if i != label_id], _now()
        return 204, None, {}

    def _list_pulls(self, request: Request, a: Args) -> Reply:
        r, state = self._repo_of(a), request.args.get("state", "open")
        issues = sorted(r.issues.values(), key=lambda i: -i.number)
        found = [i for i in issues if i.pull is not None and state in (i.state, "all")]
        return self._page(request, [self._pull_json(r, i) for i in found])

    def _create_pull(self, request: Request, a: Args) -> Reply:
        r, body = self._repo_of(a), self._body(request)
        head, title = body.get("head"), body.get("title")
        base = str(body.get("base") or r.default_branch)
        if not (isinstance(head, str) and head and isinstance(title, str) and title):
            raise _Abort(422, "[Head Title]: Required")
        for i in r.issues.values():
            if i.pull and i.state == "open" and (i.pull.head, i.pull.base) == (head, base):
                raise _Abort(
                    409,
                    f"pull request already exists for these targets [id: "
                    f"{i.id}, head_branch: {head}, base_branch: {base}]",
                )
        text = str(body.get("body") or "")
        number = self.open_pr(r.full_name, head, title, text, base=base, user=self._caller)
        return 201, self._pull_json(r, r.issues[number]), {}

    def _get_pull(self, request: Request, a: Args) -> Reply:
        return 200, self._pull_json(*self._pull_of(a)), {}

    def _is_merged(self, request: Request, a: Args) -> Reply:
        pull = self._pull_of(a)[1].pull
        if pull is not None and pull.merged:
            return 204, None, {}
        raise _Abort(404, "pull request has not been merged")

    def _list_statuses(self, request: Request, a: Args) -> Reply:
        statuses = self._repo_of(a).statuses.get(a["sha"], [])
        return self._page(request, list(reversed(statuses)))  # newest first

    def _create_status(self, request: Request, a: Args) -> Reply:
        r, body, sha, now = self._repo_of(a), self._body(request), a["sha"], _now()
        if not re.fullmatch(r"[0-9a-fA-F]{4,64}", sha):
            raise _Abort(400, f"invalid sha: {sha}")
        status = {
            "id": next(self._ids),
            "status": str(body.get("state") or ""),  # the answer says "status", not "state"
            "target_url": str(body.get("target_url") or ""),
            "description": str(body.get("description") or ""),
            "url": f"{self.api_url}/repos/{r.full_name}/statuses/{sha}",
            "context": str(body.get("context") or "default"),
            "creator": self._user_json(self._caller),
            "created_at": now,
            "updated_at": now,
        }
        r.statuses.setdefault(sha, []).append(status)
        return 201, status, {}


def _rule(swagger_path: str) -> str:
    """A swagger path as a werkzeug rule: ``{index}`` and ``{id}`` are ints."""
    path = re.sub(r"\{(index|id)\}", r"<int:\1>", swagger_path)
    return path.replace("{", "<").replace("}", ">")


def _event_type(event: str, action: str, *, is_pull: bool) -> str:
    """``X-Forgejo-Event-Type`` for an event and action (``modules/webhook/type.go``)."""
    if event == "issue_comment":
        return "pull_request_comment" if is_pull else "issue_comment"
    suffixes = {
        "label": ("label_updated", "label_cleared"),
        "assign": ("assigned", "unassigned"),
        "milestone": ("milestoned", "demilestoned"),
        "sync": ("synchronized",),
    }
    suffix = next((s for s, actions in suffixes.items() if action in actions), None)
    if event == "issues":
        return f"issue_{suffix}" if suffix else "issues"
    return f"{event}_{suffix}" if suffix else event


def _delivery_headers(
    event: str, action: str, payload: bytes, secret: str, delivery_id: str | None, is_pull: bool
) -> dict[str, str]:
    """Forgejo's header set for a POST + JSON hook (``AddDefaultHeaders``)."""
    event_type = _event_type(event, action, is_pull=is_pull)
    delivery_id = delivery_id or str(uuid.uuid4())
    signatures = sign(payload, secret)
    headers = {"Content-Type": "application/json", "User-Agent": "Go-http-client/1.1"}
    for prefix in ("Forgejo", "Gitea", "Gogs"):
        headers[f"X-{prefix}-Delivery"] = delivery_id
        headers[f"X-{prefix}-Event"] = event
        headers[f"X-{prefix}-Event-Type"] = event_type
        headers[f"X-{prefix}-Signature"] = signatures[f"X-{prefix}-Signature"]
    headers["X-Hub-Signature"] = signatures["X-Hub-Signature"]
    headers["X-Hub-Signature-256"] = signatures["X-Hub-Signature-256"]
    headers.update(
        {
            "X-GitHub-Delivery": delivery_id,
            "X-GitHub-Event": event,
            "X-GitHub-Event-Type": event_type,
        }
    )
    return headers
