"""The fake server: HTTP on 127.0.0.1, failure injection, and signed deliveries."""

from __future__ import annotations

import json
import threading
from typing import Any

from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from tests.fakes.forgejo.payloads import WEBHOOK_SECRET, delivery_headers, marshal
from tests.fakes.forgejo.routes import ROUTES, Reply, Routes, _Abort, _rule
from tests.fakes.forgejo.state import Call, Json


class _QuietHandler(WSGIRequestHandler):
    # HTTP/1.0: one connection per request, so "refuse" bites on the very next call.
    protocol_version = "HTTP/1.0"

    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


class FakeForgejo(Routes):
    """The fake server and its state; a context manager, or call ``start``/``stop``."""

    def __init__(self, *, token: str = "fleet-token", bot_login: str = "fleet-bot") -> None:
        super().__init__(token=token, bot_login=bot_login)
        self.calls: list[Call] = []
        self.retry_after: str | None = None  # sent with injected failures when set
        self._fail_mode: str | None = None
        self._fail_next: list[int] = []
        self._gate = threading.Event()  # cleared by hang(): requests wait, as on a stuck server
        self._gate.set()
        self._caller = bot_login
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._map = Map([Rule(_rule(p), methods=[m], endpoint=f"{m} {p}") for m, p, _ in ROUTES])
        self._handlers = {f"{m} {p}": (p, getattr(self, f"_{h}")) for m, p, h in ROUTES}

    # -- lifecycle and failure injection -------------------------------------------------------

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
        return delivery_headers(event, action, payload, secret, delivery_id, is_pull), payload

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
