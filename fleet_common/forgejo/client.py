"""A small Forgejo REST client: the calls Fleet makes, with retries, timeouts and pagination.

Idempotent calls (GET, PUT, DELETE) are retried by urllib3 on connection errors and on
429/502/503/504, honouring ``Retry-After`` (capped); POST and PATCH are retried only when the
connection was never made, so a comment is never posted twice by the transport. Errors come
out as ``ForgejoError`` (with the HTTP status) or ``ForgejoUnavailable`` (down, timed out, 5xx).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.response import BaseHTTPResponse
from urllib3.util.retry import Retry

from fleet_common.settings import ForgejoSettings

Json = dict[str, Any]
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRY_STATUSES = (429, 502, 503, 504)
MAX_PAGE_SIZE = 50  # [api] MAX_RESPONSE_ITEMS default; larger limits are cut to this
MAX_PAGES = 1000  # a server that keeps saying rel="next" must not loop us forever


class ForgejoError(Exception):
    """Forgejo answered with an error; ``status`` is the HTTP status (``None`` if none)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        method: str = "",
        url: str = "",
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.method = method
        self.url = url
        self.body = body


class ForgejoNotFound(ForgejoError):
    """404: no such repository, issue, PR or comment (or no access to it)."""


class ForgejoUnavailable(ForgejoError):
    """Forgejo could not be reached, timed out, or answered 5xx (after retries)."""


class _CappedRetry(Retry):
    """urllib3 ``Retry`` whose ``Retry-After`` waits are capped: a proxy's hour is not ours."""

    max_retry_after: float = 30.0

    def new(self, **kw: Any) -> _CappedRetry:
        """Carry the cap over to the next attempt's copy."""
        retry = super().new(**kw)
        retry.max_retry_after = self.max_retry_after
        return retry

    def get_retry_after(self, response: BaseHTTPResponse) -> float | None:
        """The server's ``Retry-After``, capped at ``max_retry_after`` seconds."""
        seconds = super().get_retry_after(response)
        return None if seconds is None else min(seconds, self.max_retry_after)


class ForgejoClient:
    """Forgejo's ``/api/v1`` for one token. ``repo`` arguments are ``"owner/name"``."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float | tuple[float, float] = 10.0,
        retries: int = 2,
        backoff_factor: float = 0.25,
        max_retry_after: float = 30.0,
    ) -> None:
        """``base_url`` is Forgejo's root (``https://forgejo.example.com``), with or without
        ``/api/v1``; ``timeout`` is seconds per connect and per read."""
        root = base_url.rstrip("/")
        self.api_url = root if root.endswith("/api/v1") else f"{root}/api/v1"
        self.timeout = timeout
        retry = _CappedRetry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            other=0,
            allowed_methods=IDEMPOTENT_METHODS,
            status_forcelist=RETRY_STATUSES,
            backoff_factor=backoff_factor,
            respect_retry_after_header=True,
            raise_on_status=False,
            raise_on_redirect=False,
        )
        retry.max_retry_after = max_retry_after
        self.session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update(
            {
                "Authorization": f"token {token}",
                "Accept": "application/json",
                "User-Agent": "fleet-forgejo-client",
            }
        )

    def close(self) -> None:
        """Release pooled connections."""
        self.session.close()

    def __enter__(self) -> ForgejoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- users and repositories ---------------------------------------------------------------

    def get_authenticated_user(self) -> Json:
        """``GET /user``: whoever owns the token (Fleet's ``bot_login``)."""
        return self._json("GET", "/user")

    def get_version(self) -> str:
        """``GET /version``: the server's version string."""
        return str(self._json("GET", "/version").get("version", ""))

    def get_repo(self, repo: str) -> Json:
        """``GET /repos/{owner}/{repo}``."""
        return self._json("GET", _repo_path(repo))

    # -- issues and comments ------------------------------------------------------------------

    def get_issue(self, repo: str, number: int) -> Json:
        """``GET /repos/{o}/{r}/issues/{n}`` (a PR number returns the PR's issue)."""
        return self._json("GET", f"{_repo_path(repo)}/issues/{int(number)}")

    def list_issues(
        self,
        repo: str,
        *,
        state: str = "open",
        labels: Sequence[str] = (),
        type: str = "issues",
        page_size: int = MAX_PAGE_SIZE,
    ) -> list[Json]:
        """All issues in ``state`` (open/closed/all) that carry every one of ``labels``.

        Forgejo drops label names the repository does not have and, when none is left, does
        not filter at all; the result is filtered here again so that cannot leak through.
        """
        params: dict[str, Any] = {"state": state, "type": type}
        if labels:
            params["labels"] = ",".join(labels)
        issues = self._paginate(f"{_repo_path(repo)}/issues", params, page_size)
        wanted = set(labels)
        return [i for i in issues if wanted <= {lb.get("name") for lb in i.get("labels") or []}]

    def edit_issue(self, repo: str, number: int, **fields: Any) -> Json:
        """``PATCH /repos/{o}/{r}/issues/{n}`` with ``EditIssueOption`` fields (answers 201)."""
        return self._json("PATCH", f"{_repo_path(repo)}/issues/{int(number)}", json=fields)

    def list_issue_comments(self, repo: str, number: int) -> list[Json]:
        """Every comment of an issue or PR (this endpoint is not paginated)."""
        return self._json_list("GET", f"{_repo_path(repo)}/issues/{int(number)}/comments")

    def create_issue_comment(self, repo: str, number: int, body: str) -> Json:
        """``POST /repos/{o}/{r}/issues/{n}/comments`` (201)."""
        path = f"{_repo_path(repo)}/issues/{int(number)}/comments"
        return self._json("POST", path, json={"body": body})

    def edit_issue_comment(self, repo: str, comment_id: int, body: str) -> Json | None:
        """``PATCH /repos/{o}/{r}/issues/comments/{id}``: the comment, or ``None`` on 204."""
        path = f"{_repo_path(repo)}/issues/comments/{int(comment_id)}"
        response = self._request("PATCH", path, json={"body": body})
        return None if response.status_code == 204 else _body(response)

    # -- labels -------------------------------------------------------------------------------

    def list_repo_labels(self, repo: str) -> list[Json]:
        """Every label defined in the repository."""
        return list(self._paginate(f"{_repo_path(repo)}/labels", {}, MAX_PAGE_SIZE))

    def create_label(
        self, repo: str, name: str, color: str, *, description: str = "", exclusive: bool = False
    ) -> Json:
        """``POST /repos/{o}/{r}/labels`` (201); ``color`` is ``#rrggbb`` (422 if invalid)."""
        body = {"name": name, "color": color, "description": description, "exclusive": exclusive}
        return self._json("POST", f"{_repo_path(repo)}/labels", json=body)

    def get_issue_labels(self, repo: str, number: int) -> list[Json]:
        """The labels on an issue or PR."""
        return self._json_list("GET", f"{_repo_path(repo)}/issues/{int(number)}/labels")

    def add_issue_labels(
        self, repo: str, number: int, labels: Sequence[int] | Sequence[str]
    ) -> list[Json]:
        """Add labels by id or by name (not mixed); returns the full set after the change."""
        path = f"{_repo_path(repo)}/issues/{int(number)}/labels"
        return self._json_list("POST", path, json={"labels": _label_refs(labels)})

    def replace_issue_labels(
        self, repo: str, number: int, labels: Sequence[int] | Sequence[str]
    ) -> list[Json]:
        """Set exactly these labels (by id or by name); returns the set after the change."""
        path = f"{_repo_path(repo)}/issues/{int(number)}/labels"
        return self._json_list("PUT", path, json={"labels": _label_refs(labels)})

    def remove_issue_label(self, repo: str, number: int, label_id: int) -> None:
        """``DELETE /repos/{o}/{r}/issues/{n}/labels/{id}`` (204; 422 for an unknown label)."""
        self._request("DELETE", f"{_repo_path(repo)}/issues/{int(number)}/labels/{int(label_id)}")

    # -- pull requests and statuses -----------------------------------------------------------

    def get_pull(self, repo: str, number: int) -> Json:
        """``GET /repos/{o}/{r}/pulls/{n}``; ``ForgejoNotFound`` if it is no PR."""
        return self._json("GET", f"{_repo_path(repo)}/pulls/{int(number)}")

    def list_pulls(
        self, repo: str, *, state: str = "open", page_size: int = MAX_PAGE_SIZE
    ) -> list[Json]:
        """All PRs in ``state`` (open/closed/all)."""
        return list(self._paginate(f"{_repo_path(repo)}/pulls", {"state": state}, page_size))

    def create_pull(self, repo: str, *, head: str, base: str, title: str, body: str = "") -> Json:
        """``POST /repos/{o}/{r}/pulls`` (201; 409 when one is already open for head/base)."""
        payload = {"head": head, "base": base, "title": title, "body": body}
        return self._json("POST", f"{_repo_path(repo)}/pulls", json=payload)

    def create_commit_status(
        self,
        repo: str,
        sha: str,
        *,
        state: str,
        context: str,
        description: str = "",
        target_url: str = "",
    ) -> Json:
        """``POST /repos/{o}/{r}/statuses/{sha}`` (201); the answer names it ``status``."""
        payload = {
            "state": state,
            "context": context,
            "description": description,
            "target_url": target_url,
        }
        path = f"{_repo_path(repo)}/statuses/{quote(sha, safe='')}"
        return self._json("POST", path, json=payload)

    def list_commit_statuses(
        self, repo: str, sha: str, *, limit: int = MAX_PAGE_SIZE
    ) -> list[Json]:
        """The newest ``limit`` statuses posted for ``sha``, newest first (Forgejo's default
        order; one page)."""
        path = f"{_repo_path(repo)}/statuses/{quote(sha, safe='')}"
        params = {"limit": min(limit, MAX_PAGE_SIZE), "page": 1}
        return self._json_list("GET", path, params=params)

    # -- plumbing -----------------------------------------------------------------------------

    def _json(self, method: str, path: str, **kwargs: Any) -> Json:
        body = _body(self._request(method, path, **kwargs))
        if not isinstance(body, dict):
            raise ForgejoError(f"{method} {path}: expected a JSON object", method=method)
        return body

    def _json_list(self, method: str, path: str, **kwargs: Any) -> list[Json]:
        body = _body(self._request(method, path, **kwargs))
        if not isinstance(body, list):
            raise ForgejoError(f"{method} {path}: expected a JSON array", method=method)
        return body

    def _paginate(self, path: str, params: Mapping[str, Any], page_size: int) -> Iterator[Json]:
        """Yield items page by page, following ``Link: <…>; rel="next"``.

        Only the next link's query is used, on our own URL: Forgejo builds links from its
        ROOT_URL, which is not always the address we reach it by.
        """
        query: dict[str, Any] = {**params, "limit": min(page_size, MAX_PAGE_SIZE), "page": 1}
        for _ in range(MAX_PAGES):
            response = self._request("GET", path, params=query)
            items = _body(response)
            if not isinstance(items, list):
                raise ForgejoError(f"GET {path}: expected a JSON array", method="GET")
            yield from items
            next_url = response.links.get("next", {}).get("url")
            if not next_url or not items:
                return
            query = dict(parse_qsl(urlsplit(next_url).query, keep_blank_values=True))
        raise ForgejoError(f"GET {path}: more than {MAX_PAGES} pages", method="GET")

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = f"{self.api_url}{path}"
        try:
            response = self.session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise ForgejoUnavailable(f"{method} {url}: {exc}", method=method, url=url) from exc
        if response.status_code < 400:
            return response
        body = _body(response, strict=False)
        message = body.get("message") if isinstance(body, dict) else None
        text = f"{method} {url}: HTTP {response.status_code}" + (f": {message}" if message else "")
        status = response.status_code
        error = ForgejoError
        if status == 404:
            error = ForgejoNotFound
        elif status >= 500 or status == 429:
            error = ForgejoUnavailable
        raise error(text, status=status, method=method, url=url, body=body)


def _repo_path(repo: str) -> str:
    owner, sep, name = repo.partition("/")
    if not (owner and sep and name) or "/" in name:
        raise ValueError(f"repository must be 'owner/name', not {repo!r}")
    return f"/repos/{quote(owner, safe='')}/{quote(name, safe='')}"


def _label_refs(labels: Sequence[int] | Sequence[str]) -> list[int] | list[str]:
    items: list[object] = list(labels)
    ids = [x for x in items if isinstance(x, int) and not isinstance(x, bool)]
    names = [x for x in items if isinstance(x, str)]
    if len(ids) == len(items):
        return ids
    if len(names) == len(items):
        return names
    raise ValueError("labels must be all ids or all names")  # Forgejo answers 400 otherwise


def _body(response: requests.Response, *, strict: bool = True) -> Any:
    if response.status_code == 204 or not response.content:
        return None
    try:
        return response.json()
    except ValueError as exc:
        if not strict:
            return response.text[:500]
        raise ForgejoError(
            f"{response.request.method} {response.url}: body is not JSON",
            status=response.status_code,
            url=response.url,
        ) from exc


def forgejo_client(
    settings: ForgejoSettings, *, timeout: float = 10.0, retries: int = 2
) -> ForgejoClient:
    """A client for ``[forgejo]`` (``url`` and ``token``)."""
    return ForgejoClient(settings.url, settings.token, timeout=timeout, retries=retries)
