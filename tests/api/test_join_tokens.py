"""Join tokens and registration: one-time, expiring, revocable tokens; a bad registration does
not burn its token; the same host again is the same agent with a new token; concurrent
registrations never answer 500."""

from __future__ import annotations

import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fleet_common.auth import service as auth
from fleet_common.auth.models import TokenKind
from fleet_common.db import utcnow
from tests.api_helpers import Api, assert_error, row_counts, snapshot


def join_token(api: Api, **body: Any) -> dict[str, Any]:
    response = api.post("/join-tokens", json=body)
    assert response.status_code == 201, response.get_json()
    minted = dict(response.get_json())
    assert minted["token"].startswith("flj_")
    return minted


def register(api: Api, token: str, name: str = "a1", **extra: Any) -> Any:
    body = {"join_token": token, "name": name, "host_uid": f"uid-{name}", **extra}
    return api.post("/agents/register", json=body, token="")


def test_join_tokens_are_one_time_expiring_and_revocable(
    client: Any, admin_token: str, db: Any
) -> None:
    api = Api(client, admin_token)
    minted = join_token(api, ttl_secs=600, name="for a1")
    assert minted["expires_at"] is not None
    listing = api.get("/join-tokens").get_json()
    assert [t["id"] for t in listing] == [minted["id"]]
    assert "token" not in listing[0]  # the secret is shown once

    first = register(api, minted["token"])
    assert first.status_code == 201, first.get_json()
    before = snapshot(db)
    assert_error(register(api, minted["token"], name="a2"), 401)  # used
    assert_error(register(api, minted["token"]), 401)  # used, even by the same host
    assert snapshot(db) == before
    used = api.get("/join-tokens").get_json()[0]
    assert used["used_at"] is not None and used["agent_id"] == first.get_json()["agent"]["id"]

    revoked = join_token(api)
    assert api.delete(f"/join-tokens/{revoked['id']}").status_code == 204
    assert_error(register(api, revoked["token"], name="a3"), 401)
    assert_error(api.delete("/join-tokens/tok_nope"), 404)
    # An admin token's id is not a join token's.
    admin_id = api.get("/admin-tokens").get_json()[0]["id"]
    assert_error(api.delete(f"/join-tokens/{admin_id}"), 404)

    with db.session() as session:
        _, expired = auth.mint(
            session,
            TokenKind.JOIN,
            actor="test",
            ttl_secs=60,
            now=utcnow() - dt.timedelta(seconds=61),
        )
    before = snapshot(db)
    assert_error(register(api, expired, name="a4"), 401)
    for wrong in ("flj_not-a-token", admin_token, first.get_json()["agent_token"]):
        assert_error(register(api, wrong, name="a5"), 401)
    assert snapshot(db) == before


def test_a_bad_registration_does_not_burn_the_token(client: Any, admin_token: str, db: Any) -> None:
    api = Api(client, admin_token)
    token = join_token(api)["token"]
    before = row_counts(db)
    bad_bodies: list[dict[str, Any]] = [
        {"join_token": token, "host_uid": "h1"},  # no name
        {"join_token": token, "name": "a1"},  # no host_uid
        {"join_token": token, "name": 5, "host_uid": "h1"},
        {"join_token": token, "name": "a1", "host_uid": ["h1"]},
        {"join_token": token, "name": "a1", "host_uid": "h1", "capabilities": "code"},
        {"join_token": token, "name": "a1", "host_uid": "h1", "capabilities": ["bad cap"]},
        {"join_token": token, "name": "a1", "host_uid": "h1", "capabilities": ["a+b"]},
        {"join_token": token, "name": "a1", "host_uid": "h1", "capabilities": [7]},
        {"join_token": token, "name": "a1", "host_uid": "h1", "max_concurrency": 0},
        {"join_token": token, "name": "a1", "host_uid": "h1", "max_concurrency": "two"},
        {"join_token": token, "name": "a1", "host_uid": "h1", "metadata": [1]},
        {"join_token": token, "name": "a1", "host_uid": "h1", "metadata": {"x": "y" * 20_000}},
        {"join_token": token, "name": "", "host_uid": "h1"},
    ]
    for body in bad_bodies:
        assert_error(api.post("/agents/register", json=body, token=""), 422)
    assert row_counts(db) == before
    good = register(api, token, capabilities=["code:python"], unknown_field=1)
    assert good.status_code == 201, good.get_json()
    assert good.get_json()["agent"]["capabilities"] == ["code:python"]


def test_the_same_host_again_is_the_same_agent_with_a_new_token(
    client: Any, admin_token: str
) -> None:
    api = Api(client, admin_token)
    first = register(api, join_token(api)["token"], capabilities=["a"]).get_json()
    old = first["agent_token"]
    assert api.post("/agents/heartbeat", json={}, token=old).status_code == 200

    second = register(api, join_token(api)["token"], capabilities=["b"], version="2")
    assert second.status_code == 201, second.get_json()
    again = second.get_json()
    assert again["agent"]["id"] == first["agent"]["id"]
    assert again["agent"]["capabilities"] == ["b"]
    assert again["agent"]["version"] == "2"
    assert again["agent_token"] != old
    assert_error(api.post("/agents/heartbeat", json={}, token=old), 401)
    assert api.post("/agents/heartbeat", json={}, token=again["agent_token"]).status_code == 200
    assert len(api.get("/agents").get_json()) == 1


def concurrently(app: Any, bodies: list[dict[str, Any]]) -> list[Any]:
    """POST every body to /agents/register at once, each from its own thread and client."""
    start = threading.Barrier(len(bodies))

    def one(body: dict[str, Any]) -> Any:
        client = app.test_client()
        start.wait(timeout=10)
        return client.post("/api/v1/agents/register", json=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def test_concurrent_registrations_never_fail(app: Any, client: Any, admin_token: str) -> None:
    api = Api(client, admin_token)
    n = 8
    # The same host from n join tokens at once: one agent, exactly one live token.
    same = [
        {"join_token": join_token(api)["token"], "name": "same", "host_uid": "uid-same"}
        for _ in range(n)
    ]
    results = concurrently(app, same)
    assert [r.status_code for r in results] == [201] * n, [r.get_json() for r in results]
    assert len({r.get_json()["agent"]["id"] for r in results}) == 1
    live = [
        r.get_json()["agent_token"]
        for r in results
        if api.post("/agents/heartbeat", json={}, token=r.get_json()["agent_token"]).status_code
        == 200
    ]
    assert len(live) == 1

    # n hosts at once: n agents.
    many = [
        {"join_token": join_token(api)["token"], "name": f"h{i}", "host_uid": f"uid-h{i}"}
        for i in range(n)
    ]
    results = concurrently(app, many)
    assert [r.status_code for r in results] == [201] * n, [r.get_json() for r in results]
    assert len({r.get_json()["agent"]["id"] for r in results}) == n

    # One join token raced by n hosts: one wins, the rest are 401.
    token = join_token(api)["token"]
    raced = [{"join_token": token, "name": f"r{i}", "host_uid": f"uid-r{i}"} for i in range(n)]
    codes = sorted(r.status_code for r in concurrently(app, raced))
    assert codes == [201] + [401] * (n - 1)
    assert len(api.get("/agents?page_size=100").get_json()) == 1 + n + 1
