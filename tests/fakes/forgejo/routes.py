"""The API endpoints the fake serves, with Forgejo's status codes and error bodies."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

from werkzeug.wrappers import Request

from tests.fakes.forgejo.render import Renderer
from tests.fakes.forgejo.state import Comment, Issue, Json, Label, Repo, timestamp

Args = dict[str, Any]
Reply = tuple[int, Any, dict[str, str]]

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


class _Abort(Exception):
    def __init__(self, status: int, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.errors = status, message, errors


def _rule(swagger_path: str) -> str:
    """A swagger path as a werkzeug rule: ``{index}`` and ``{id}`` are ints."""
    path = re.sub(r"\{(index|id)\}", r"<int:\1>", swagger_path)
    return path.replace("{", "<").replace("}", ">")


class Routes(Renderer):
    """One ``_<handler>`` per route in :data:`ROUTES`, and the lookups they share."""

    _caller: str

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
        issue.updated = timestamp()
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
        comment.body, comment.updated = text, timestamp()
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
        issue.labels, issue.updated = [i for i in issue.labels if i != label_id], timestamp()
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
        r, body, sha, now = self._repo_of(a), self._body(request), a["sha"], timestamp()
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
