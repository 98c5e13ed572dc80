"""The agent side of Fleet's pull protocol over HTTP, with backoff and jitter on errors and 429s."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import requests

log = logging.getLogger("fleet.agent")


class ApiError(Exception):
    """The server answered with an error; ``status`` and ``reason`` say which."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"{status}: {body.get('message', body)}")
        self.status = status
        self.reason = body.get("reason")
        self.body = body


class Unreachable(Exception):
    """The server could not be reached, or answered 5xx/429 for longer than we retried;
    ``retry_after`` is how long its last answer asked us to wait (0 when it did not say)."""

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def backoff(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Full jitter: a random delay up to ``base × 2^attempt``, capped."""
    # The exponent is bounded too: 2.0**1100 overflows, and an outage of hours gets there.
    return random.uniform(0, min(cap, base * 2.0 ** min(attempt, 32)))


class AgentClient:
    def __init__(self, server: str, token: str = "", *, timeout: float = 10.0) -> None:
        self.server = server.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.http = requests.Session()

    def call(
        self,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        wait: float = 0.0,
        retry_for: float = 60.0,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> dict[str, Any] | None:
        """POST ``body`` to ``/api/v1/<path>``: the JSON reply, None for 204. Connection errors,
        5xx and 429 are retried with jittered backoff for ``retry_for`` seconds; 4xx raise."""
        deadline = time.monotonic() + retry_for
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        attempt = 0
        while True:
            try:
                response = self.http.post(
                    f"{self.server}/api/v1/{path}",
                    json=body or {},
                    headers=headers,
                    timeout=self.timeout + wait,
                )
            except requests.RequestException as error:
                problem: str = f"{type(error).__name__}: {error}"
                retry_after = None
            else:
                if response.status_code == 204:
                    return None
                if response.status_code < 400:
                    return dict(response.json())
                if response.status_code != 429 and response.status_code < 500:
                    raise ApiError(response.status_code, _json(response))
                problem = f"HTTP {response.status_code}"
                retry_after = response.headers.get("Retry-After")
            asked = float(retry_after) if retry_after and retry_after.isdigit() else 0.0
            delay = max(backoff(attempt), asked)
            if time.monotonic() + delay > deadline or should_stop():
                raise Unreachable(f"{path}: {problem}", asked)
            log.warning("%s failed (%s); retrying in %.1fs", path, problem, delay)
            time.sleep(delay)
            attempt += 1


def _json(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"message": response.text[:500]}
    return body if isinstance(body, dict) else {"message": str(body)}
