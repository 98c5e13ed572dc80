"""Closing references under Forgejo's rules (README §5, ``modules/references``)."""

from __future__ import annotations

import pytest

from fleet_common.forgejo.references import (
    CLOSE_KEYWORDS,
    closing_issue_numbers,
    find_references,
    pull_links_task,
    strip_markdown,
    task_branch,
    task_id_from_branch,
)
from fleet_common.ids import new_id

REPO = "alice/widgets"
SERVER = "https://forgejo.example.com/"

BODY_CASES = [
    # the README's own examples
    ("Closes #12", [12]),
    ("fixes: #12", [12]),
    ("Resolves alice/widgets#12", [12]),
    ("Closes  #12", []),
    ("Closes#12", []),
    ("Closes #1, #2", [1]),
    ("Closes #1, closes #2", [1, 2]),
    ("Closes !12", [12]),
    # case, colon, exactly one space
    ("CLOSES #12", [12]),
    ("cLoSeD #12", [12]),
    ("Fixes: #12", [12]),
    ("Fixes:#12", []),
    ("Fixes : #12", []),
    ("Fixes:  #12", []),
    ("Fixes\t#12", []),
    ("Fixes\n#12", []),
    ("Fixes\u00a0#12", []),
    ("Fixes::#12", []),
    # the keyword must start at a boundary (whitespace, start, "(" or "[")
    ("(fixes #12)", [12]),
    ("[fixes #12]", [12]),
    ("- Fixes #12", [12]),
    ("> Fixes #12", [12]),
    ("## Fixes #12", [12]),
    ("Refs and fixes #12", [12]),
    ("prefixes #12", []),
    ("unresolved #12", []),
    ("-fixes #12", []),
    ("'fixes #12", []),
    ("Closing #12", []),
    ("Fixing #12", []),
    ("Close issue #12", []),
    # what may follow the number
    ("Closes #12.", [12]),
    ("Closes #12. Then more", [12]),
    ("Closes #12, and more", [12]),
    ("Closes #12: details", [12]),
    ("Closes #12; also", [12]),
    ("Closes #12? maybe", [12]),
    ("Closes #12!", [12]),
    ("Closes #12\n\nMore text", [12]),
    ("Closes #12)", [12]),
    ("Closes #12abc", []),
    ("Closes #12.5", []),
    ("Closes #12,13", []),
    ("Closes #12-fix", []),
    ("Closes #12/x", []),
    ("Closes #12\u00a0", []),
    ("Closes '#12'", []),  # a reference, but the quote sits between keyword and "#"
    ("Closes #", []),
    ("Closes #abc", []),
    ("Closes #0", []),
    ("Closes #99999999999999999999", []),
    ("Closes #012", [12]),
    # other repositories
    ("Closes other/repo#12", []),
    ("Closes alice/widgets-fork#12", []),
    ("Closes Alice/Widgets#12", [12]),
    ("Closes alice/widgets!12", [12]),
    ("Closes alice/widgets#12 and #13", [12]),
    ("Fixes #3, fixes bob/x#4, resolves alice/widgets#5", [3, 5]),
    # several references and the last keyword per issue
    ("Closes #1 #2", [1]),
    ("Closes #1 and fixes #2", [1, 2]),
    ("See #12.\n\nCloses #12", [12]),
    ("Closes #12\n\nReopens #12", []),
    ("Reopens #12\n\nCloses #12", [12]),
    ("Reopens #12", []),
    ("Closes #12\nCloses #12", [12]),
    # markdown: code is not scanned, links never close, emphasis breaks the text
    ("`Closes #12`", []),
    ("Run `make` then closes #12", [12]),
    ("Closes `#12`", []),
    ("```\nCloses #12\n```", []),
    ("~~~python\nCloses #12\n~~~\nCloses #13", [13]),
    ("Intro\n\n    Closes #12\n", []),
    ("- item\n\n    Closes #12", [12]),  # a list continuation, not code
    ("[Closes #12](https://example.com/x)", []),
    ("Closes [#12](https://forgejo.example.com/alice/widgets/issues/12)", []),
    ("Closes https://forgejo.example.com/alice/widgets/issues/12", []),
    ("Closes <https://forgejo.example.com/alice/widgets/issues/12>", []),
    ("**Closes #12**", [12]),
    ("_Fixes #12_", [12]),
    ("Fixes **#12**", []),
    ("Fixes <b>#12</b>", []),
    ("<b>Fixes #12</b>", [12]),
    ("- [x] Closes #12", [12]),
    ("| a | Closes #12 |", [12]),
]


@pytest.mark.parametrize(("body", "expected"), BODY_CASES)
def test_closing_references_in_the_body(body: str, expected: list[int]) -> None:
    assert closing_issue_numbers("", body, REPO, server_url=SERVER) == expected


@pytest.mark.parametrize("keyword", [*CLOSE_KEYWORDS, *(k.upper() for k in CLOSE_KEYWORDS)])
def test_every_close_keyword(keyword: str) -> None:
    assert closing_issue_numbers(f"{keyword} #7", "", REPO) == [7]


@pytest.mark.parametrize(
    ("title", "expected"),
    [
        ("Fix #12: retry uploads", [12]),
        ("Retry uploads (closes #12)", [12]),
        ("Retry uploads #12", []),
        ("`Closes #12`", []),  # titles are plain text: backticks are just boundaries that fail
        ("**Closes #12**", []),
        ("Closes https://forgejo.example.com/alice/widgets/issues/12", [12]),
        ("Closes https://forgejo.example.com/alice/widgets/pulls/12", [12]),
        ("Closes https://elsewhere.example.com/alice/widgets/issues/12", []),
        ("Closes https://forgejo.example.com/bob/other/issues/12", []),
    ],
)
def test_closing_references_in_the_title(title: str, expected: list[int]) -> None:
    assert closing_issue_numbers(title, "", REPO, server_url=SERVER) == expected


def test_title_urls_need_the_server_url() -> None:
    title = "Closes https://forgejo.example.com/alice/widgets/issues/12"
    assert closing_issue_numbers(title, "", REPO) == []


def test_title_and_body_combine() -> None:
    assert closing_issue_numbers("Fixes #1", "Closes #2\n\nSee #3", REPO) == [1, 2]
    assert closing_issue_numbers("Fixes #1", "Reopens #1", REPO) == []


def test_the_constructed_pr_closes_issue_12() -> None:
    body = (
        "Closes #12\n\nAdds `RetryPolicy` (max 5 attempts, jittered back-off).\n\n- [x] unit tests"
    )
    assert closing_issue_numbers("Retry uploads with exponential back-off", body, REPO) == [12]


def test_find_references_reports_every_reference_with_its_action() -> None:
    refs = find_references("Closes #1, see #2 and bob/x#3; reopens !4", markdown=False)
    found = [(r.index, r.owner, r.name, r.action) for r in refs]
    assert found == [
        (1, None, None, "closes"),
        (2, None, None, "none"),
        (4, None, None, "reopens"),
        (3, "bob", "x", "none"),
    ]


def test_markdown_links_to_this_server_are_plain_references() -> None:
    body = "See [the bug](https://forgejo.example.com/alice/widgets/issues/9) and <https://x.org/a>"
    refs = find_references(body, markdown=True, server_url=SERVER)
    assert [(r.index, r.owner, r.name, r.action) for r in refs] == [(9, "alice", "widgets", "none")]
    assert find_references(body, markdown=True) == []


def test_strip_markdown_drops_code_and_collects_links() -> None:
    text, links = strip_markdown("a `code` b\n```\nx\n```\n[t](http://u) **c**")
    assert "code" not in text and "x" not in text.split()
    assert links == ["http://u"]
    assert "\nc\n" in text


def test_long_texts_stay_fast() -> None:
    body = "Closes #1 " * 20_000 + "\n" + "`x` " * 5_000
    assert closing_issue_numbers("", body, REPO) == [1]


@pytest.mark.parametrize(
    ("branch", "task_id"),
    [
        ("fleet/tsk_01j9z8", "tsk_01j9z8"),
        ("refs/heads/fleet/tsk_01j9z8", "tsk_01j9z8"),
        ("fleet/abc-123", "abc-123"),
        ("fleet/", None),
        ("fleet", None),
        ("fleet/a/b", None),
        ("fleet/-x", None),
        ("Fleet/tsk_1", None),
        ("feature/tsk_1", None),
        ("agent/issue-12-uploader-retry", None),
        ("refs/pull/13/head", None),
        ("", None),
        (None, None),
    ],
)
def test_task_id_from_branch(branch: str | None, task_id: str | None) -> None:
    assert task_id_from_branch(branch) == task_id


def test_task_branch_round_trips_real_ids() -> None:
    task_id = new_id("task")
    assert task_branch(task_id) == f"fleet/{task_id}"
    assert task_id_from_branch(task_branch(task_id)) == task_id


@pytest.mark.parametrize(
    ("body", "head", "issue", "linked"),
    [
        ("Closes #12", "agent/x", 12, True),
        ("Closes #13", "agent/x", 12, False),
        ("See #12", "agent/x", 12, False),
        ("", "fleet/tsk_1", 12, True),
        ("", "refs/heads/fleet/tsk_1", None, True),
        ("", "fleet/tsk_2", 12, False),
        ("Closes #12", None, None, False),  # a task without an issue links by branch only
    ],
)
def test_pull_links_task(body: str, head: str | None, issue: int | None, linked: bool) -> None:
    found = pull_links_task(
        title="Fix",
        body=body,
        head_branch=head,
        repo_full_name=REPO,
        issue_number=issue,
        task_id="tsk_1",
    )
    assert found is linked
