"""Parsing deliveries: every constructed payload with its own headers, and the pitfalls."""

from __future__ import annotations

import hashlib
import json
import urllib.parse

import pytest

from fleet_common.forgejo.events import EventKind, InvalidDelivery, parse_delivery
from tests.fakes.forgejo import load_payload, marshal, payload_names

EXPECTED = {
    "issue_comment.created": EventKind.ISSUE_COMMENT,
    "issue_comment.created.on_pr": EventKind.PR_COMMENT,
    "issues.assigned": EventKind.IGNORED,
    "issues.closed.by_pr_merge": EventKind.ISSUE_CLOSED,
    "issues.label_cleared": EventKind.ISSUE_LABEL_CLEARED,
    "issues.label_updated": EventKind.ISSUE_LABEL_UPDATED,
    "issues.opened": EventKind.ISSUE_OPENED,
    "pull_request.closed.merged": EventKind.PR_MERGED,
    "pull_request.closed.unmerged": EventKind.PR_CLOSED,
    "pull_request.label_updated": EventKind.IGNORED,
    "pull_request.opened": EventKind.PR_OPENED,
    "pull_request.synchronized": EventKind.PR_SYNCHRONIZED,
    "push": EventKind.IGNORED,
    "push.new_branch": EventKind.IGNORED,
}


def test_the_table_covers_every_payload_file() -> None:
    assert sorted(EXPECTED) == payload_names()


@pytest.mark.parametrize("name", payload_names())
def test_every_payload_parses_with_its_own_headers(name: str) -> None:
    headers, body = load_payload(name)
    delivery = parse_delivery(headers, body)
    assert delivery.kind is EXPECTED[name]
    assert delivery.event == headers["X-Forgejo-Event"]
    assert delivery.event_type == headers["X-Forgejo-Event-Type"]
    assert delivery.delivery_id == headers["X-Forgejo-Delivery"]
    assert delivery.digest == hashlib.sha256(body).hexdigest()
    assert delivery.repo_full_name == "alice/widgets"
    assert delivery.repo_clone_url == "https://forgejo.example.com/alice/widgets.git"
    assert delivery.sender_login in ("alice", "fleet-bot")
    assert delivery.ignored is (EXPECTED[name] is EventKind.IGNORED)


def test_issue_opened() -> None:
    d = parse_delivery(*load_payload("issues.opened"))
    assert d.action == "opened" and d.number == 12 and d.sender_login == "alice"
    assert d.issue is not None and d.pull_request is None and d.comment is None
    assert d.issue.number == 12
    assert d.issue.title == "Uploader gives up after the first network error"
    assert "& no retry" in d.issue.body  # \u0026 decoded
    assert d.issue.state == "open" and not d.issue.is_pull
    assert d.issue.html_url == "https://forgejo.example.com/alice/widgets/issues/12"


def test_label_updated_carries_the_labels_after_the_change() -> None:
    d = parse_delivery(*load_payload("issues.label_updated"))
    assert d.event_type == "issue_label" and d.action == "label_updated"
    assert d.issue is not None and d.issue.labels == ("status/ready", "kind/bug")


def test_label_cleared_has_no_labels() -> None:
    d = parse_delivery(*load_payload("issues.label_cleared"))
    assert d.kind is EventKind.ISSUE_LABEL_CLEARED
    assert d.issue is not None and d.issue.labels == ()


def test_issue_closed_by_a_merge_names_the_merge_commit() -> None:
    d = parse_delivery(*load_payload("issues.closed.by_pr_merge"))
    assert d.issue is not None and d.issue.state == "closed"
    assert d.commit_id == "e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4"


def test_pr_opened() -> None:
    d = parse_delivery(*load_payload("pull_request.opened"))
    pr = d.pull_request
    assert pr is not None and d.issue is None
    assert (pr.number, pr.state, pr.merged) == (13, "open", False)
    assert pr.title == "Retry uploads with exponential back-off"
    assert pr.body.startswith("Closes #12")
    assert pr.head_ref == pr.head_branch == "agent/issue-12-uploader-retry"
    assert pr.head_sha == "3b7e9c1f2a4d6e8f0a1b3c5d7e9f1a2b3c4d5e6f"
    assert pr.base_ref == "main"
    assert pr.html_url == "https://forgejo.example.com/alice/widgets/pulls/13"


def test_merged_is_closed_with_merged_true() -> None:
    merged = parse_delivery(*load_payload("pull_request.closed.merged"))
    unmerged = parse_delivery(*load_payload("pull_request.closed.unmerged"))
    assert merged.action == unmerged.action == "closed"
    assert merged.pull_request is not None and merged.pull_request.merged
    assert unmerged.pull_request is not None and not unmerged.pull_request.merged


def test_synchronized_is_a_pull_request_event() -> None:
    d = parse_delivery(*load_payload("pull_request.synchronized"))
    assert (d.event, d.event_type, d.action) == (
        "pull_request",
        "pull_request_sync",
        "synchronized",
    )


def test_comment_on_a_plain_issue() -> None:
    d = parse_delivery(*load_payload("issue_comment.created"))
    assert d.comment is not None and d.comment.id == 101 and d.comment.user_login == "fleet-bot"
    assert d.issue is not None and not d.issue.is_pull
    assert d.pull_request is None  # the key is absent on plain issues


def test_comment_on_a_pr_conversation_arrives_as_issue_comment() -> None:
    headers, body = load_payload("issue_comment.created.on_pr")
    d = parse_delivery(headers, body)
    assert (d.event, d.event_type) == ("issue_comment", "pull_request_comment")
    assert d.kind is EventKind.PR_COMMENT
    assert d.issue is not None and d.issue.is_pull
    assert d.pull_request is not None and d.pull_request.number == 13


def test_deleted_head_branch_keeps_its_name_in_the_label() -> None:
    headers, body = load_payload("pull_request.closed.merged")
    payload = json.loads(body)
    payload["pull_request"]["head"]["ref"] = "refs/pull/13/head"
    d = parse_delivery(headers, marshal(payload))
    assert d.pull_request is not None
    assert d.pull_request.head_ref == "refs/pull/13/head"
    assert d.pull_request.head_branch == "agent/issue-12-uploader-retry"
    payload["pull_request"]["head"]["label"] = ""  # AGit: nothing to go by
    d = parse_delivery(headers, marshal(payload))
    assert d.pull_request is not None and d.pull_request.head_branch is None


def test_a_replay_has_a_new_id_and_the_same_digest() -> None:
    headers, body = load_payload("issues.opened")
    replay = {**headers, "X-Forgejo-Delivery": "00000000-0000-4000-8000-000000000000"}
    first, second = parse_delivery(headers, body), parse_delivery(replay, body)
    assert first.delivery_id != second.delivery_id
    assert first.digest == second.digest


@pytest.mark.parametrize(
    ("header", "value"),
    [("X-Gitea-Event", "issues"), ("X-GitHub-Event", "issues"), ("x-forgejo-event", "issues")],
)
def test_event_header_fallbacks(header: str, value: str) -> None:
    _, body = load_payload("issues.opened")
    d = parse_delivery({header: value, "X-Gitea-Delivery": "abc"}, body)
    assert d.kind is EventKind.ISSUE_OPENED and d.delivery_id == "abc"


@pytest.mark.parametrize(
    ("event", "action", "payload", "kind"),
    [
        ("issues", "edited", {}, EventKind.ISSUE_EDITED),
        ("issues", "reopened", {}, EventKind.ISSUE_REOPENED),
        ("issues", "milestoned", {}, EventKind.IGNORED),
        ("issues", "labeled", {}, EventKind.IGNORED),  # GitHub's name; Forgejo never sends it
        ("pull_request", "edited", {}, EventKind.PR_EDITED),
        ("pull_request", "reopened", {}, EventKind.PR_REOPENED),
        ("pull_request", "reviewed", {}, EventKind.IGNORED),
        ("pull_request", "merged", {}, EventKind.IGNORED),  # there is no merged action
        ("pull_request", "closed", {"pull_request": {"merged": True}}, EventKind.PR_MERGED),
        ("pull_request", "closed", {"pull_request": None}, EventKind.PR_CLOSED),
        ("pull_request_comment", "reviewed", {}, EventKind.IGNORED),  # a review comment
        ("issue_comment", "created", {"issue": {"pull_request": {}}}, EventKind.PR_COMMENT),
        ("issue_comment", "edited", {"is_pull": False}, EventKind.ISSUE_COMMENT),
        ("create", "", {}, EventKind.IGNORED),
        ("", "", {}, EventKind.IGNORED),
    ],
)
def test_classification(
    event: str, action: str, payload: dict[str, object], kind: EventKind
) -> None:
    body = json.dumps({"action": action, **payload}).encode()
    assert parse_delivery({"X-Forgejo-Event": event}, body).kind is kind


def test_nulls_and_missing_objects_do_not_break_parsing() -> None:
    body = json.dumps(
        {"action": "opened", "issue": {"number": 3, "labels": None, "body": None}, "sender": None}
    ).encode()
    d = parse_delivery({"X-Forgejo-Event": "issues"}, body)
    assert d.issue is not None and d.issue.labels == () and d.issue.body == ""
    assert d.sender_login == "" and d.repo_full_name == "" and d.number == 3


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_a_body_that_is_not_a_json_object_is_invalid(body: bytes) -> None:
    with pytest.raises(InvalidDelivery):
        parse_delivery({"X-Forgejo-Event": "issues"}, body)


@pytest.mark.parametrize(
    ("name", "echo"),
    [
        ("issue_comment.created", True),  # the bot's own status comment
        ("issues.label_updated", True),  # the bot set a status label
        ("issues.label_cleared", True),
        ("pull_request.opened", False),  # opened with the bot's account by an agent: real work
        ("pull_request.synchronized", False),
        ("issues.opened", False),  # sender alice
    ],
)
def test_echo_guard(name: str, echo: bool) -> None:
    delivery = parse_delivery(*load_payload(name))
    assert delivery.is_echo("fleet-bot") is echo
    assert delivery.is_echo("FLEET-BOT") is echo  # Forgejo logins are case-insensitive
    assert not delivery.is_echo("someone-else")
    assert not delivery.is_echo("")


def test_a_form_hook_is_parsed_from_its_payload_field() -> None:
    headers, body = load_payload("issues.opened")
    form = urllib.parse.urlencode({"payload": body.decode()}).encode()
    d = parse_delivery({**headers, "Content-Type": "application/x-www-form-urlencoded"}, form)
    assert d.kind is EventKind.ISSUE_OPENED
    assert d.digest == hashlib.sha256(body).hexdigest()  # the same delivery as the JSON hook
