"""Small helpers for driving the API through Flask's test client."""

from __future__ import annotations

from typing import Any


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Api:
    """JSON calls with a token: ``api.post("/tasks", json={...}, token=...)``."""

    def __init__(self, client: Any, token: str) -> None:
        self.client = client
        self.token = token

    def call(self, method: str, path: str, *, token: str | None = None, **kwargs: Any) -> Any:
        headers = dict(kwargs.pop("headers", {}))
        tok = self.token if token is None else token
        if tok:
            headers.update(bearer(tok))
        url = path
        if not url.startswith(("/api/", "/healthz", "/readyz", "/metrics", "/openapi", "/docs")):
            url = "/api/v1" + url
        return getattr(self.client, method)(url, headers=headers, **kwargs)

    def get(self, path: str, **kw: Any) -> Any:
        return self.call("get", path, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.call("post", path, **kw)

    def patch(self, path: str, **kw: Any) -> Any:
        return self.call("patch", path, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.call("delete", path, **kw)

    def register(
        self,
        name: str,
        capabilities: list[str] | None = None,
        host_uid: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Mint a join token and register an agent; returns the 201 body."""
        join = self.post("/join-tokens", json={}).get_json()["token"]
        body = {
            "join_token": join,
            "name": name,
            "host_uid": host_uid or f"uid-{name}",
            "capabilities": capabilities or [],
            **extra,
        }
        response = self.post("/agents/register", json=body, token="")
        assert response.status_code == 201, response.get_json()
        return dict(response.get_json())
