"""The Forgejo client against the fake Forgejo: calls, pagination, errors, retries."""

from __future__ import annotations

import time

import pytest

from fleet_common.forgejo.client import (
    ForgejoClient,
    ForgejoError,
    ForgejoNotFound,
    ForgejoUnavailable,
)
from tests.fakes.forgejo import FakeForgejo


def routes(fake: FakeForgejo, method: str, route: str) -> list[int]:
    return [c.status for c in fake.calls if (c.method, c.route) == (method, route)]


def test_whoami_and_repository(client: ForgejoClient, repo: str) -> None:
    assert client.get_authenticated_user()["login"] == "fleet-bot"
    got = client.get_repo(repo)
    assert got["full_name"] == repo and got["owner"]["login"] == "alice"
    assert got["clone_url"].endswith("/alice/widgets.git")
    assert client.get_version().startswith("16.")


def test_unknown_objects_raise_not_found(client: ForgejoClient, repo: str) -> None:
    with pytest.raises(ForgejoNotFound) as info:
        client.get_issue(repo, 99)
    assert info.value.status == 404
    assert info.value.body["message"] == "The target couldn't be found."
    with pytest.raises(ForgejoNotFound):
        client.get_repo("alice/nothing")


def test_list_issues_follows_the_link_header(
    fake: FakeForgejo, client: ForgejoClient, repo: str
) -> None:
    for n in range(7):
        fake.add_issue(repo, f"issue {n}", labels=("fleet",))
    issues = client.list_issues(repo, page_size=2)
    assert [i["number"] for i in issues] == [7, 6, 5, 4, 3, 2, 1]
    assert routes(fake, "GET", "/repos/{owner}/{repo}/issues") == [200] * 4


def test_list_issues_filters(fake: FakeForgejo, client: ForgejoClient, repo: str) -> None:
    a = fake.add_issue(repo, "a", labels=("fleet", "kind/bug"))
    b = fake.add_issue(repo, "b", labels=("fleet",))
    fake.add_issue(repo, "c")
    closed = fake.add_issue(repo, "d", labels=("fleet",))
    fake.set_issue_state(repo, closed, "closed")
    fake.open_pr(repo, "fleet/x", "a PR")
    fake.label_issue(repo, 5, "fleet")
    assert [i["number"] for i in client.list_issues(repo, labels=["fleet"])] == [b, a]
    assert [i["number"] for i in client.list_issues(repo, labels=["fleet", "kind/bug"])] == [a]
    assert [i["number"] for i in client.list_issues(repo, state="closed")] == [closed]
    assert len(client.list_issues(repo, state="all")) == 4
    assert [i["number"] for i in client.list_issues(repo, type="pulls")] == [5]


def test_a_label_the_repository_lacks_filters_everything_out(
    fake: FakeForgejo, client: ForgejoClient, repo: str
) -> None:
    fake.add_issue(repo, "unlabelled")
    raw = client.session.get(f"{fake.api_url}/repos/{repo}/issues", params={"labels": "fleet"})
    assert len(raw.json()) == 1  # Forgejo ignores an unknown label instead of matching nothing
    assert client.list_issues(repo, labels=["fleet"]) == []


def test_comments(fake: FakeForgejo, client: ForgejoClient, repo: str) -> None:
    number = fake.add_issue(repo, "a")
    created = client.create_issue_comment(repo, number, "Queued <b>&</b>")
    assert routes(fake, "POST", "/repos/{owner}/{repo}/issues/{index}/comments") == [201]
    assert created["user"]["login"] == "fleet-bot" and created["body"] == "Queued <b>&</b>"
    edited = client.edit_issue_comment(repo, created["id"], "Running")
    assert edited is not None and edited["body"] == "Running"
    other = fake.add_comment(repo, number, "mine", user="alice")
    assert [c["body"] for c in client.list_issue_comments(repo, number)] == ["Running", "mine"]
    with pytest.raises(ForgejoError) as info:
        client.edit_issue_comment(repo, other, "hijack")
    assert info.value.status == 403
    with pytest.raises(ForgejoNotFound):
        client.create_issue_comment(repo, 99, "x")


def test_labels(fake: FakeForgejo, client: ForgejoClient, repo: str) -> None:
    number = fake.add_issue(repo, "a", labels=("fleet",))
    queued = client.create_label(repo, "fleet/queued", "#00aabb", exclusive=True)
    assert routes(fake, "POST", "/repos/{owner}/{repo}/labels") == [201]
    assert queued["color"] == "00aabb" and queued["exclusive"] is True
    running = client.create_label(repo, "fleet/running", "#ff0000", exclusive=True)
    assert {lb["name"] for lb in client.list_repo_labels(repo)} == {
        "fleet",
        "fleet/queued",
        "fleet/running",
    }
    after = client.add_issue_labels(repo, number, [queued["id"]])
    assert [lb["name"] for lb in after] == ["fleet", "fleet/queued"]
    after = client.add_issue_labels(repo, number, ["fleet/running", "no-such-label"])
    assert [lb["name"] for lb in after] == ["fleet", "fleet/running"]  # exclusive scope
    client.remove_issue_label(repo, number, running["id"])
    assert [lb["name"] for lb in client.get_issue_labels(repo, number)] == ["fleet"]
    after = client.replace_issue_labels(repo, number, ["fleet/queued"])
    assert fake.labels_of(repo, number) == ["fleet/queued"] == [lb["name"] for lb in after]


def test_label_errors(client: ForgejoClient, repo: str, fake: FakeForgejo) -> None:
    number = fake.add_issue(repo, "a")
    with pytest.raises(ForgejoError) as info:
        client.create_label(repo, "x", "not-a-colour")
    assert info.value.status == 422
    with pytest.raises(ForgejoError) as info:
        client.remove_issue_label(repo, number, 424242)
    assert info.value.status == 422
    with pytest.raises(ValueError, match="all ids or all names"):
        client.add_issue_labels(repo, number, [1, "fleet"])  # type: ignore[list-item]


def test_pulls(fake: FakeForgejo, client: ForgejoClient, repo: str) -> None:
    issue = fake.add_issue(repo, "bug")
    pr = client.create_pull(
        repo, head="fleet/t1", base="main", title="Fix", body=f"Closes #{issue}"
    )
    assert routes(fake, "POST", "/repos/{owner}/{repo}/pulls") == [201]
    assert (pr["head"]["ref"], pr["base"]["ref"], pr["state"]) == ("fleet/t1", "main", "open")
    with pytest.raises(ForgejoError) as info:
        client.create_pull(repo, head="fleet/t1", base="main", title="Again")
    assert info.value.status == 409
    with pytest.raises(ForgejoNotFound):
        client.get_pull(repo, issue)  # an issue is not a PR
    fake.merge_pr(repo, pr["number"])
    merged = client.get_pull(repo, pr["number"])
    assert merged["merged"] is True and merged["merge_commit_sha"]
    assert client.get_issue(repo, issue)["state"] == "closed"  # "Closes #N" did its job
    assert client.list_pulls(repo) == []
    assert [p["number"] for p in client.list_pulls(repo, state="closed")] == [pr["number"]]


def test_commit_status(fake: FakeForgejo, client: ForgejoClient, repo: str) -> None:
    sha = "c41d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d"
    status = client.create_commit_status(
        repo, sha, state="pending", context="fleet", description="running", target_url="http://x"
    )
    assert routes(fake, "POST", "/repos/{owner}/{repo}/statuses/{sha}") == [201]
    assert status["status"] == "pending" and "state" not in status
    assert [s["description"] for s in fake.statuses_of(repo, sha)] == ["running"]


def test_bad_or_missing_token_is_401_not_unavailable(fake: FakeForgejo, repo: str) -> None:
    for token in ("wrong", ""):
        with ForgejoClient(fake.url, token) as api, pytest.raises(ForgejoError) as info:
            api.get_repo(repo)
        assert info.value.status == 401 and not isinstance(info.value, ForgejoUnavailable)


def test_idempotent_calls_retry_through_503s(
    fake: FakeForgejo, client: ForgejoClient, repo: str
) -> None:
    fake.fail_next(2)
    assert client.get_repo(repo)["full_name"] == repo
    assert [c.status for c in fake.calls] == [503, 503, 200]


def test_retries_give_up_with_unavailable(
    fake: FakeForgejo, client: ForgejoClient, repo: str
) -> None:
    fake.fail_mode = "503"
    with pytest.raises(ForgejoUnavailable) as info:
        client.get_repo(repo)
    assert info.value.status == 503 and len(fake.calls) == 3  # first try + 2 retries
    fake.fail_mode = None
    assert client.get_repo(repo)["full_name"] == repo


def test_posts_are_not_retried_after_an_answer(
    fake: FakeForgejo, client: ForgejoClient, repo: str
) -> None:
    number = fake.add_issue(repo, "a")
    fake.fail_next(1)
    with pytest.raises(ForgejoUnavailable):
        client.create_issue_comment(repo, number, "once")
    assert len(fake.calls) == 1 and fake.comments_of(repo, number) == []


def test_retry_after_is_honoured_and_capped(fake: FakeForgejo, repo: str) -> None:
    fake.retry_after = "1"
    fake.fail_next(1)
    with ForgejoClient(fake.url, fake.token, backoff_factor=0) as api:
        started = time.monotonic()
        api.get_repo(repo)
        assert time.monotonic() - started >= 0.9
    fake.retry_after = "3600"
    fake.fail_next(1)
    with ForgejoClient(fake.url, fake.token, backoff_factor=0, max_retry_after=0.1) as api:
        started = time.monotonic()
        api.get_repo(repo)
        assert time.monotonic() - started < 5


def test_connection_refused_is_unavailable_quickly(fake: FakeForgejo, repo: str) -> None:
    with ForgejoClient(fake.url, fake.token) as api:  # default retries and backoff
        fake.fail_mode = "refuse"
        started = time.monotonic()
        with pytest.raises(ForgejoUnavailable) as info:
            api.get_repo(repo)
        assert time.monotonic() - started < 3 and info.value.status is None
        with pytest.raises(ForgejoUnavailable):
            api.create_issue_comment(repo, 1, "x")
        fake.fail_mode = None
        assert api.get_repo(repo)["full_name"] == repo


def test_a_hanging_server_times_out_as_unavailable(fake: FakeForgejo, repo: str) -> None:
    fake.hang()
    with ForgejoClient(fake.url, fake.token, timeout=0.3, retries=0) as api:
        started = time.monotonic()
        with pytest.raises(ForgejoUnavailable):
            api.get_repo(repo)
        assert time.monotonic() - started < 3
    fake.release()


def test_base_url_may_include_the_api_path(fake: FakeForgejo) -> None:
    with ForgejoClient(fake.api_url + "/", fake.token) as api:
        assert api.api_url == fake.api_url
        assert api.get_authenticated_user()["login"] == "fleet-bot"


@pytest.mark.parametrize("bad", ["widgets", "alice/", "/widgets", "a/b/c"])
def test_repository_names_are_checked(client: ForgejoClient, bad: str) -> None:
    with pytest.raises(ValueError, match="owner/name"):
        client.get_repo(bad)
