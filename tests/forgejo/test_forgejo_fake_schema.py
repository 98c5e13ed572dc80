"""The fake's answers against Forgejo's own v16 swagger (``definitions`` made nullable).

Forgejo's swagger has no ``x-nullable`` although real answers are full of nulls, so every
schema also accepts null (README §6). It has no ``additionalProperties: false`` either; this
test adds it, so a key the fake invents fails too (``User.username`` is real: Forgejo's
``User.MarshalJSON`` adds it).
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jsonschema_rs
import pytest
import requests

from fleet_common.forgejo.client import ForgejoClient, ForgejoError
from tests.fakes.forgejo import ROUTES, SWAGGER_PATH, Call, FakeForgejo, load_payload, payload_names

SWAGGER: dict[str, Any] = json.loads(SWAGGER_PATH.read_text())


def _nullable(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        return {"anyOf": [{"$ref": schema["$ref"]}, {"type": "null"}]}
    out = dict(schema)
    if isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    if "properties" in out:
        out["properties"] = {k: _nullable(v) for k, v in out["properties"].items()}
        out.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _nullable(out[key])
    if "allOf" in out:
        out["allOf"] = [_nullable(s) for s in out["allOf"]]
    return out


@functools.cache
def _definitions() -> dict[str, Any]:
    definitions = {name: _nullable(schema) for name, schema in SWAGGER["definitions"].items()}
    definitions["User"]["properties"]["username"] = {"type": ["string", "null"]}
    return definitions


@functools.cache
def _validator(schema_json: str) -> jsonschema_rs.Draft4Validator:
    root = {**_nullable(json.loads(schema_json)), "definitions": _definitions()}
    return jsonschema_rs.Draft4Validator(root, validate_formats=True)


def errors_for(schema: dict[str, Any], instance: Any) -> list[str]:
    """Every validation error of ``instance`` against a swagger schema, as text."""
    validator = _validator(json.dumps(schema, sort_keys=True))
    return [f"{e.instance_path}: {e.message}" for e in validator.iter_errors(instance)]


def response_schema(method: str, route: str, status: int) -> dict[str, Any] | None:
    """The documented schema for an answer; fails if the status is not documented."""
    responses = SWAGGER["paths"][route][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {route} answered undocumented {status}"
    response = responses[str(status)]
    if "$ref" in response:
        response = SWAGGER["responses"][response["$ref"].rsplit("/", 1)[1]]
    return response.get("schema")


def exercise(fake: FakeForgejo, api: ForgejoClient) -> None:
    """Hit every route of the fake at least once with success, and the documented errors."""
    repo = fake.add_repo("alice", "widgets")
    issue = fake.add_issue(repo, "Uploader gives up", "Steps: <cut> & retry", labels=("fleet",))
    api.get_authenticated_user()
    api.get_version()
    api.get_repo(repo)
    api.list_issues(repo, state="all")
    api.edit_issue(repo, issue, title="Uploader gives up early")
    comment = api.create_issue_comment(repo, issue, "Queued")
    api.edit_issue_comment(repo, comment["id"], "Running")
    api.list_issue_comments(repo, issue)
    label = api.create_label(repo, "fleet/queued", "#00aabb", exclusive=True)
    api.list_repo_labels(repo)
    api.add_issue_labels(repo, issue, [label["id"]])
    api.replace_issue_labels(repo, issue, ["fleet", "fleet/queued"])
    api.get_issue_labels(repo, issue)
    api.remove_issue_label(repo, issue, label["id"])
    pr = api.create_pull(repo, head="fleet/t1", base="main", title="Fix", body=f"Closes #{issue}")
    api.get_issue(repo, pr["number"])
    api.list_pulls(repo)
    api.create_commit_status(repo, pr["head"]["sha"], state="pending", context="fleet")
    fake.add_comment(repo, pr["number"], "on the PR", user="alice")
    fake.merge_pr(repo, pr["number"])
    api.get_pull(repo, pr["number"])
    api.create_pull(repo, head="fleet/t1", base="main", title="Fix, again")
    api.list_issue_comments(repo, pr["number"])
    session = api.session
    base = f"{fake.api_url}/repos/{repo}"
    session.get(f"{base}/pulls/{pr['number']}/merge")
    session.get(f"{base}/statuses/{pr['head']['sha']}")
    session.delete(f"{base}/issues/{issue}/labels")
    session.delete(f"{base}/issues/comments/{comment['id']}")
    # documented errors
    for call in (
        lambda: api.get_issue(repo, 999),
        lambda: api.get_repo("alice/missing"),
        lambda: api.get_pull(repo, issue),
        lambda: api.create_label(repo, "x", "nope"),
        lambda: api.remove_issue_label(repo, issue, 999_999),
        lambda: api.create_pull(repo, head="fleet/t1", base="main", title="Again"),
        lambda: api.edit_issue_comment(repo, fake.add_comment(repo, issue, "x", user="bob"), "y"),
        lambda: api.create_commit_status(repo, "not-a-sha!", state="success", context="fleet"),
    ):
        with pytest.raises(ForgejoError):
            call()
    requests.get(f"{fake.api_url}/user", timeout=5)  # no token: 401


@pytest.fixture
def calls(fake: FakeForgejo) -> list[Call]:
    with ForgejoClient(fake.url, fake.token, retries=0) as api:
        exercise(fake, api)
    return fake.calls


def test_every_route_is_exercised(calls: list[Call]) -> None:
    succeeded = {(c.method, c.route) for c in calls if c.status < 300}
    assert succeeded == {(method, route) for method, route, _ in ROUTES}


def test_every_answer_is_documented_and_matches_the_swagger(calls: list[Call]) -> None:
    problems = []
    for call in calls:
        assert call.route is not None
        if call.status == 401:  # Forgejo's auth layer answers this on every route
            schema: dict[str, Any] | None = SWAGGER["responses"]["unauthorized"]["schema"]
        else:
            schema = response_schema(call.method, call.route, call.status)
        if schema is None:
            assert call.status in (204, 404), call  # empty answers, or a bare 404
            continue
        problems += [
            f"{call.method} {call.route} {call.status} {e}" for e in errors_for(schema, call.body)
        ]
    assert problems == []
    assert {c.status for c in calls} >= {200, 201, 204, 400, 401, 403, 404, 409, 422}


@pytest.mark.parametrize("name", payload_names())
def test_the_constructed_payloads_pass_the_same_check(name: str) -> None:
    payload = json.loads(load_payload(name)[1])
    assert _object_errors(payload) == []


def test_the_fakes_deliveries_pass_the_same_check(fake: FakeForgejo) -> None:
    repo = fake.add_repo("alice", "widgets")
    issue = fake.add_issue(repo, "bug", labels=("fleet",))
    pr = fake.open_pr(repo, "fleet/t1", "Fix", f"Closes #{issue}")
    note = fake.add_comment(repo, pr, "looks good", user="alice")
    fake.merge_pr(repo, pr)
    deliveries = [
        fake.delivery("issues", "label_updated", repo=repo, number=issue),
        fake.delivery("issue_comment", "created", repo=repo, number=pr, comment_id=note),
        fake.delivery("pull_request", "closed", repo=repo, number=pr, sender="alice"),
    ]
    for _, body in deliveries:
        assert _object_errors(json.loads(body)) == []


def test_the_check_catches_invented_keys_and_wrong_types() -> None:
    user = json.loads(load_payload("issues.opened")[1])["sender"]
    schema = {"$ref": "#/definitions/User"}
    assert errors_for(schema, user) == []
    assert errors_for(schema, {**user, "nickname": "x"}) != []
    assert errors_for(schema, {**user, "id": "5"}) != []
    assert errors_for(schema, {**user, "created": "yesterday"}) != []


_OBJECTS = {
    "issue": "Issue",
    "pull_request": "PullRequest",
    "repository": "Repository",
    "sender": "User",
    "pusher": "User",
    "comment": "Comment",
    "head_commit": "PayloadCommit",
}


def _object_errors(payload: dict[str, Any]) -> list[str]:
    found = []
    for key, definition in _OBJECTS.items():
        if payload.get(key) is not None:
            schema = {"$ref": f"#/definitions/{definition}"}
            found += [f"{key}{e}" for e in errors_for(schema, payload[key])]
    return found
