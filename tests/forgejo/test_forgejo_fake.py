"""The fake Forgejo itself: Forgejo's wire details, deliveries, state rules, failure modes."""

from __future__ import annotations

import json
import socket

import pytest
import requests

from fleet_common.forgejo.events import EventKind, parse_delivery
from fleet_common.forgejo.signatures import verify
from tests.fakes.forgejo import WEBHOOK_SECRET, FakeForgejo, load_payload, marshal, payload_names


def auth(fake: FakeForgejo) -> dict[str, str]:
    return {"Authorization": f"token {fake.token}"}


@pytest.mark.parametrize("name", payload_names())
def test_marshal_reproduces_forgejos_bytes(name: str) -> None:
    _, body = load_payload(name)
    assert marshal(json.loads(body)) == body


def _key_orders(value: object, path: str = "") -> dict[str, list[str]]:
    """The key order of every object, by path (into lists through their first element)."""
    if isinstance(value, list):
        return _key_orders(value[0], f"{path}[]") if value else {}
    if not isinstance(value, dict):
        return {}
    orders = {path: list(value)}
    for key, child in value.items():
        orders.update(_key_orders(child, f"{path}.{key}"))
    return orders


@pytest.mark.parametrize(
    ("template", "event", "action", "kind"),
    [
        ("issues.label_updated", "issues", "label_updated", EventKind.ISSUE_LABEL_UPDATED),
        ("issues.opened", "issues", "opened", EventKind.ISSUE_OPENED),
        ("issue_comment.created.on_pr", "issue_comment", "created", EventKind.PR_COMMENT),
        ("pull_request.closed.merged", "pull_request", "closed", EventKind.PR_MERGED),
        ("pull_request.synchronized", "pull_request", "synchronized", EventKind.PR_SYNCHRONIZED),
    ],
)
def test_deliveries_look_like_forgejos(
    fake: FakeForgejo, repo: str, template: str, event: str, action: str, kind: EventKind
) -> None:
    issue = fake.add_issue(repo, "Uploader <gives> up & stops", labels=("status/ready",))
    pr = fake.open_pr(repo, "fleet/t1", "Retry uploads", f"Closes #{issue}")
    fake.label_issue(repo, pr, "kind/bug")
    note = fake.add_comment(repo, pr, "on the PR", user="alice")
    if kind is EventKind.PR_MERGED:
        fake.merge_pr(repo, pr, merged_by="alice")
    number = issue if event == "issues" else pr
    headers, body = fake.delivery(
        event, action, repo=repo, number=number, comment_id=note, sender="alice"
    )
    want_headers, want_body = load_payload(template)
    assert set(headers) == set(want_headers)
    assert headers["X-Forgejo-Event-Type"] == want_headers["X-Forgejo-Event-Type"]
    got, want = _key_orders(json.loads(body)), _key_orders(json.loads(want_body))
    assert got[""] == want[""]
    for path in got.keys() & want.keys():  # objects both sides have (not null on one side)
        assert got[path] == want[path], path
    assert b"\\u003cgives\\u003e up \\u0026 stops" in body or event != "issues"
    assert verify(body, headers, WEBHOOK_SECRET)
    delivery = parse_delivery(headers, body)
    assert delivery.kind is kind and delivery.repo_full_name == repo
    assert delivery.number == number and delivery.sender_login == "alice"


def test_delivery_ids_are_fresh_unless_given(fake: FakeForgejo, repo: str) -> None:
    issue = fake.add_issue(repo, "a")
    first, _ = fake.delivery("issues", "opened", repo=repo, number=issue)
    second, _ = fake.delivery("issues", "opened", repo=repo, number=issue, delivery_id="d-1")
    assert first["X-Forgejo-Delivery"] != "d-1" == second["X-Gitea-Delivery"]


def test_pagination_headers_are_forgejos(fake: FakeForgejo, repo: str) -> None:
    for n in range(7):
        fake.add_issue(repo, f"i{n}")
    url = f"{fake.api_url}/repos/{repo}/issues"
    response = requests.get(url, params={"state": "all", "limit": 2, "page": 2}, headers=auth(fake))
    assert response.headers["X-Total-Count"] == "7"
    assert response.headers["Content-Type"] == "application/json;charset=utf-8"
    link = response.headers["Link"]
    assert ", " not in link
    rels = [part.split('rel="')[1].rstrip('"') for part in link.split(",")]
    assert rels == ["next", "last", "first", "prev"]
    assert link.startswith(f"<{url}?limit=2&page=3&state=all>")
    assert [i["number"] for i in response.json()] == [5, 4]
    last = requests.get(url, params={"limit": 2, "page": 4}, headers=auth(fake))
    assert 'rel="next"' not in last.headers["Link"] and len(last.json()) == 1


def test_page_size_is_capped_at_50(fake: FakeForgejo, repo: str) -> None:
    for n in range(55):
        fake.add_label(repo, f"l{n:02}")
    url = f"{fake.api_url}/repos/{repo}/labels"
    assert len(requests.get(url, params={"limit": 100}, headers=auth(fake)).json()) == 50
    assert len(requests.get(url, headers=auth(fake)).json()) == 30


def test_comments_are_not_paginated(fake: FakeForgejo, repo: str) -> None:
    issue = fake.add_issue(repo, "a")
    for n in range(35):
        fake.add_comment(repo, issue, f"c{n}")
    response = requests.get(
        f"{fake.api_url}/repos/{repo}/issues/{issue}/comments", headers=auth(fake)
    )
    assert len(response.json()) == 35 and response.headers["X-Total-Count"] == "35"
    assert "Link" not in response.headers


def test_error_bodies_are_forgejos(fake: FakeForgejo, repo: str) -> None:
    missing = requests.get(f"{fake.api_url}/repos/{repo}/issues/9", headers=auth(fake))
    assert missing.status_code == 404
    assert set(missing.json()) == {"errors", "message", "url"}
    unrouted = requests.get(f"{fake.api_url}/nothing/here", headers=auth(fake))
    assert unrouted.status_code == 404
    no_token = requests.get(f"{fake.api_url}/user")
    assert no_token.status_code == 401 and set(no_token.json()) == {"message", "url"}
    basic = requests.get(f"{fake.api_url}/user", headers={"Authorization": "Basic abc"})
    assert basic.status_code == 401
    bearer = requests.get(f"{fake.api_url}/user", headers={"Authorization": f"Bearer {fake.token}"})
    assert bearer.status_code == 200


def test_merge_closes_the_referenced_issue_only(fake: FakeForgejo, repo: str) -> None:
    closes, mentioned = fake.add_issue(repo, "a"), fake.add_issue(repo, "b")
    pr = fake.open_pr(repo, "fleet/t1", "Fix", f"Closes #{closes}, see #{mentioned}")
    sha = fake.merge_pr(repo, pr)
    assert fake.pull(repo, pr).merge_commit_sha == sha and fake.pull(repo, pr).merged
    assert fake.issue(repo, closes).state == "closed"
    assert fake.issue(repo, mentioned).state == "open"


def test_closing_a_pr_without_merge_leaves_its_issue_open(fake: FakeForgejo, repo: str) -> None:
    issue = fake.add_issue(repo, "a")
    pr = fake.open_pr(repo, "fleet/t1", "Fix", f"Closes #{issue}")
    fake.set_issue_state(repo, pr, "closed")
    assert fake.issue(repo, issue).state == "open" and not fake.pull(repo, pr).merged


def test_exclusive_labels_evict_their_scope_only(fake: FakeForgejo, repo: str) -> None:
    for name in ("fleet/queued", "fleet/running"):
        fake.add_label(repo, name, exclusive=True)
    issue = fake.add_issue(repo, "a", labels=("fleet", "fleet/queued", "kind/bug"))
    fake.label_issue(repo, issue, "fleet/running")
    assert fake.labels_of(repo, issue) == ["fleet", "kind/bug", "fleet/running"]


def test_refuse_closes_the_port_and_none_reopens_it(fake: FakeForgejo) -> None:
    port = fake.port
    fake.fail_mode = "refuse"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    fake.fail_mode = None
    assert fake.port == port
    assert requests.get(f"{fake.api_url}/user", headers=auth(fake)).status_code == 200


def test_503_mode_answers_everything_with_503(fake: FakeForgejo) -> None:
    fake.fail_mode = "503"
    fake.retry_after = "2"
    response = requests.get(f"{fake.api_url}/user", headers=auth(fake))
    assert response.status_code == 503 and response.headers["Retry-After"] == "2"
    fake.fail_mode = None
    assert requests.get(f"{fake.api_url}/user", headers=auth(fake)).status_code == 200


def test_unknown_fail_mode_is_rejected(fake: FakeForgejo) -> None:
    with pytest.raises(ValueError, match="fail mode"):
        fake.fail_mode = "slow"
