"""The HTTP client every API command uses: auth, the one error shape, and exit codes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests

from fleet_api.cli.errors import CliError, ExitCode

API_PREFIX = "/api/v1"
CONNECT_TIMEOUT_SECS = 5.0
READ_TIMEOUT_SECS = 60.0
# flask-smorest's default maximum page size.
MAX_PAGE_SIZE = 100


@dataclass(frozen=True)
class Response:
    """A successful API answer: its status, decoded JSON body (None when empty) and headers."""

    status: int
    body: Any
    headers: Mapping[str, str]

    @property
    def pagination(self) -> dict[str, Any]:
        """flask-smorest's ``X-Pagination`` header (totals of a list), or ``{}``."""
        raw = self.headers.get("X-Pagination")
        if not raw:
            return {}
        try:
            value = json.loads(raw)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


class ApiClient:
    """Talks to one Fleet API server with one bearer token."""

    def __init__(self, server: str, token: str, session: requests.Session | None = None) -> None:
        self.server = server.rstrip("/")
        self.session = session or requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.session.headers["Accept"] = "application/json"
        self.session.headers["User-Agent"] = "fleet-cli"

    def url(self, path: str) -> str:
        return f"{self.server}{API_PREFIX}{path}"

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send one request; any failure becomes a :class:`CliError` with its exit code."""
        url = self.url(path)
        try:
            reply = self.session.request(
                method,
                url,
                json=json_body,
                params=_clean(params),
                headers=dict(headers or {}),
                timeout=(CONNECT_TIMEOUT_SECS, READ_TIMEOUT_SECS),
            )
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as exc:
            raise CliError(f"invalid server URL {self.server!r}: {exc}", ExitCode.USAGE) from None
        except requests.exceptions.Timeout:
            raise CliError(
                f"the Fleet API at {self.server} did not answer in time", ExitCode.UNREACHABLE
            ) from None
        except requests.exceptions.ConnectionError as exc:
            raise CliError(
                f"cannot reach the Fleet API at {self.server} ({_reason(exc)}); "
                "is `fleet api` running? Point to it with --server or FLEET_SERVER",
                ExitCode.UNREACHABLE,
            ) from None
        if reply.status_code >= 400:
            raise api_error(reply)
        body = _body(reply)
        if body is None and reply.content:
            raise CliError(
                f"{self.server} answered {method} {path} with something other than JSON: "
                "is it a Fleet API server?",
                ExitCode.GENERAL,
            )
        return Response(reply.status_code, body, reply.headers)

    def get(self, path: str, **params: Any) -> Response:
        return self.request("GET", path, params=params)

    def post(
        self, path: str, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> Response:
        return self.request("POST", path, json_body={} if body is None else body, headers=headers)

    def delete(self, path: str) -> Response:
        return self.request("DELETE", path)

    def get_all(self, path: str, **params: Any) -> list[Any]:
        """Every item of a paginated list, following ``X-Pagination`` page by page."""
        items: list[Any] = []
        page = 1
        while True:
            reply = self.get(path, page=page, page_size=MAX_PAGE_SIZE, **params)
            batch = reply.body if isinstance(reply.body, list) else []
            items.extend(batch)
            next_page = reply.pagination.get("next_page")
            if not batch or not next_page or next_page <= page:
                return items
            page = int(next_page)


def api_error(reply: requests.Response) -> CliError:
    """The API's one error shape ``{"code","status","message","errors"?,"reason"?}`` as a
    CliError whose exit code says what kind of failure it was."""
    body = _body(reply)
    message = ""
    details: list[str] = []
    if isinstance(body, dict):
        message = str(body.get("message") or body.get("status") or "")
        details = field_errors(body.get("errors"))
        if body.get("reason"):
            details.append(f"reason: {body['reason']}")
    if not message:
        message = f"HTTP {reply.status_code} {reply.reason or ''}".strip()
    code = {401: ExitCode.AUTH, 403: ExitCode.AUTH, 404: ExitCode.NOT_FOUND}.get(
        reply.status_code, ExitCode.GENERAL
    )
    if reply.status_code == 401:
        details.append("check --token / FLEET_TOKEN / .fleet/admin-token")
    return CliError(message, code, details)


def field_errors(errors: Any, prefix: str = "") -> list[str]:
    """Flatten webargs' nested ``{"json": {"title": ["..."]}}`` into ``title: ...`` lines."""
    if isinstance(errors, dict):
        lines: list[str] = []
        for key, value in errors.items():
            # The top level names where the field was (json, query, headers): not useful here.
            top = not prefix and key in {"json", "query", "headers", "form", "files", "path"}
            lines.extend(field_errors(value, "" if top else f"{prefix}{key}."))
        return lines
    if isinstance(errors, list) and all(isinstance(item, str) for item in errors):
        label = prefix.rstrip(".") or "request"
        return [f"{label}: {' '.join(errors)}"]
    if errors is None or errors == []:
        return []
    return [f"{prefix.rstrip('.') or 'request'}: {errors}"]


def _body(reply: requests.Response) -> Any:
    if not reply.content:
        return None
    try:
        return reply.json()
    except ValueError:
        return None


def _clean(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Drop unset query parameters (None or empty lists)."""
    return {k: v for k, v in (params or {}).items() if v is not None and v != [] and v != ()}


def _reason(exc: requests.exceptions.ConnectionError) -> str:
    text = str(exc).lower()
    if "refused" in text:
        return "connection refused"
    if "name or service not known" in text or "nodename nor servname" in text:
        return "unknown host name"
    if "timed out" in text:
        return "connection timed out"
    return "connection failed"
