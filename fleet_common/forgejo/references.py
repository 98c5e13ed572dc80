"""Which issues a PR closes, under Forgejo's own rules, and Fleet's ``fleet/<task_id>`` branches.

A port of ``modules/references/references.go`` (Forgejo/Gitea): a reference is ``#N``, ``!N``
or ``owner/repo#N`` between boundary characters, and it *closes* when the text right before it
ends in a close keyword, an optional colon and exactly one space. The PR title is scanned as
plain text; the body as markdown, after a light model of Forgejo's ``mdstripper`` (code is
dropped, link syntax and emphasis break the text the way goldmark's text nodes do). A
reference reached only through a markdown link ``[text](url)`` never closes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

CLOSE_KEYWORDS = (
    "close",
    "closes",
    "closed",
    "fix",
    "fixes",
    "fixed",
    "resolve",
    "resolves",
    "resolved",
)
REOPEN_KEYWORDS = ("reopen", "reopens", "reopened")
TASK_BRANCH_PREFIX = "fleet/"

Action = Literal["none", "closes", "reopens"]

# Go's \s is ASCII whitespace without \v; Go's $ (no multiline) is the very end of the text.
_WS = r"[\t\n\f\r ]"
_END = rf"(?:{_WS}|\Z|\)|\]|[:;,.?!]{_WS}|[:;,.?!]\Z)"
_NAME = r"[0-9a-zA-Z_.\-]+"
_ISSUE_NUMERIC = re.compile(rf"""(?:{_WS}|^|\(|\[|'|")([#!][0-9]+)(?:{_END}|'|")""")
_CROSS_NUMERIC = re.compile(rf"(?:{_WS}|^|\(|\[)({_NAME}/{_NAME}[#!][0-9]+){_END}")
_VALID_NAME = re.compile(r"[a-z0-9_.-]+")
_MAX_INDEX = 2**63 - 1  # strconv.ParseInt(…, 10, 64)
_KEYWORD_WINDOW = 16  # longest keyword + colon + space + one boundary character, with room


def _keyword_pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(rf"(?:{_WS}|^|\(|\[)({'|'.join(words)}):? \Z", re.IGNORECASE)


_CLOSE_PAT = _keyword_pattern(CLOSE_KEYWORDS)
_REOPEN_PAT = _keyword_pattern(REOPEN_KEYWORDS)

# Markdown, the parts that change what the reference scanner sees.
_FENCE_OPEN = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_LIST_ITEM = re.compile(r"^ {0,3}(?:[-+*]|[0-9]{1,9}[.)])(?: |$)")
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`).+?(?<!`)\1(?!`)", re.DOTALL)
_IMAGE = re.compile(r"!\[([^\]\n]*)\]\([^)\n]*\)")
_LINK = re.compile(r"\[[^\]\n]*\]\((?P<url>[^)\s]*)[^)\n]*\)")
_AUTOLINK = re.compile(
    r"<(?P<url>(?:https?|ftp)://[^\s<>]+)>|(?P<bare>(?:https?://|www\.)[^\s<>]+)"
)
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>")
_EMPHASIS = (
    re.compile(r"(?<![\\\w*])(\*\*|\*)(?=\S)(.+?)(?<=\S)\1(?!\*)", re.DOTALL),
    re.compile(r"(?<![\\\w_])(__|_)(?=\S)(.+?)(?<=\S)\1(?![\w_])", re.DOTALL),
    re.compile(r"(~~)(?=\S)(.+?)(?<=\S)\1", re.DOTALL),
)
_TRAILING_PUNCT = ".,:;!?'\")]*_~"


@dataclass(frozen=True, slots=True)
class IssueReference:
    """One reference found in a text; ``owner``/``name`` are ``None`` for a local ``#N``."""

    index: int
    owner: str | None
    name: str | None
    action: Action

    def points_to(self, repo_full_name: str) -> bool:
        """True when the reference targets ``repo_full_name`` (a local ``#N`` always does)."""
        if self.owner is None:
            return True
        return f"{self.owner}/{self.name}" == repo_full_name.lower()


def find_references(
    text: str, *, markdown: bool, server_url: str | None = None
) -> list[IssueReference]:
    """All references in ``text`` in Forgejo's order: local, cross-repo, then links.

    ``server_url`` is Forgejo's public root URL. In plain text (a title) a full issue or PR
    URL on that server counts as ``owner/repo#N`` and can close; in markdown, links and
    autolinks to that server are plain references that never close.
    """
    links: list[str] = []
    if markdown:
        text, links = strip_markdown(text)
    elif server_url:
        text = _shorten_plain_urls(text, server_url)
    refs = [r for r in _scan(text, _ISSUE_NUMERIC) if r]
    refs += [r for r in _scan(text, _CROSS_NUMERIC) if r]
    if server_url:
        refs += [r for r in (_link_reference(link, server_url) for link in links) if r]
    return refs


def closing_issue_numbers(
    title: str, body: str, repo_full_name: str, *, server_url: str | None = None
) -> list[int]:
    """Numbers of the issues in ``repo_full_name`` that a PR with this title and body closes.

    As in ``updateCrossReferenceList``: one entry per issue, a keyword anywhere wins over a
    plain mention, and the last keyword seen for an issue (close or reopen) decides.
    """
    actions: dict[int, Action] = {}
    refs = find_references(title, markdown=False, server_url=server_url)
    refs += find_references(body, markdown=True, server_url=server_url)
    for ref in refs:
        if not ref.points_to(repo_full_name):
            continue
        if ref.index not in actions or ref.action != "none":
            actions[ref.index] = ref.action
    return [index for index, action in actions.items() if action == "closes"]


def pull_links_task(
    *,
    title: str,
    body: str,
    head_branch: str | None,
    repo_full_name: str,
    issue_number: int | None,
    task_id: str,
    server_url: str | None = None,
) -> bool:
    """True when a PR belongs to a task: it comes from ``fleet/<task_id>`` or it closes the
    task's issue (for webhooks and for checking the PR a receipt names)."""
    if task_id_from_branch(head_branch) == task_id:
        return True
    if issue_number is None:
        return False
    return issue_number in closing_issue_numbers(title, body, repo_full_name, server_url=server_url)


def task_branch(task_id: str) -> str:
    """The branch an agent works on for ``task_id``."""
    return f"{TASK_BRANCH_PREFIX}{task_id}"


def task_id_from_branch(branch: str | None) -> str | None:
    """The task id in a ``fleet/<task_id>`` branch (``refs/heads/`` allowed), else ``None``."""
    if not branch:
        return None
    branch = branch.removeprefix("refs/heads/")
    match = re.fullmatch(rf"{re.escape(TASK_BRANCH_PREFIX)}([A-Za-z0-9][A-Za-z0-9_-]*)", branch)
    return match.group(1) if match else None


def _scan(text: str, pattern: re.Pattern[str]) -> list[IssueReference | None]:
    # Go loops FindSubmatchIndex(content[pos:]) from the end of each reference, so a boundary
    # character is never eaten by the previous match. search(text, pos) is the same here: the
    # character at pos ends a reference, so ^-at-pos (which Go allows) could never match.
    found: list[IssueReference | None] = []
    pos = 0
    while match := pattern.search(text, pos):
        found.append(_reference(text, match.start(1), match.end(1)))
        pos = match.end(1)
    return found


def _reference(text: str, start: int, end: int) -> IssueReference | None:
    token = text[start:end]
    sep = min(i for i in (token.find("#"), token.find("!")) if i >= 0)
    index = int(token[sep + 1 :])
    if not 0 < index <= _MAX_INDEX:  # ParseInt overflows past int64; no issue is number 0
        return None
    owner = name = None
    if sep:
        owner, _, name = token[:sep].lower().partition("/")
        if not (_VALID_NAME.fullmatch(owner) and _VALID_NAME.fullmatch(name)):
            return None
    return IssueReference(index, owner, name, _action(text, start))


def _action(text: str, start: int) -> Action:
    # The keyword must end right before the reference; endpos makes \Z match at `start` and a
    # bounded window keeps long texts linear (^ still means the real start of the text).
    window = max(0, start - _KEYWORD_WINDOW)
    if _CLOSE_PAT.search(text, window, start):
        return "closes"
    if _REOPEN_PAT.search(text, window, start):
        return "reopens"
    return "none"


def strip_markdown(text: str) -> tuple[str, list[str]]:
    """Approximate Forgejo's ``mdstripper``: the text to scan, and the link URLs taken out.

    Code is dropped; links, autolinks, inline HTML and emphasis break the text into separate
    lines as goldmark's text nodes do. (Forgejo's inline shortening of autolinks never fires
    on a real ``ROOT_URL``, which always ends in ``/``, so every link goes out of band.)
    """
    links: list[str] = []

    def take_link(match: re.Match[str]) -> str:
        bare = match.groupdict().get("bare")
        if bare:  # linkify leaves trailing punctuation out of the link
            stripped = bare.rstrip(_TRAILING_PUNCT)
            links.append(stripped)
            return f"\n{bare[len(stripped) :]}"
        links.append(match.group("url"))
        return "\n"

    text = _drop_code_blocks(text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CODE_SPAN.sub("\n", text)
    text = _IMAGE.sub(lambda m: f"\n{m.group(1)}\n", text)
    text = _LINK.sub(take_link, text)
    text = _AUTOLINK.sub(take_link, text)
    text = _HTML_TAG.sub("\n", text)
    for pattern in _EMPHASIS:
        previous = None
        while previous != text:
            previous, text = text, pattern.sub(lambda m: f"\n{m.group(2)}\n", text)
    return text, links


def _drop_code_blocks(text: str) -> str:
    kept: list[str] = []
    fence = ""
    previous_blank, in_list, in_code = True, False, False
    for line in text.split("\n"):
        if fence:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = ""
            continue
        if opened := _FENCE_OPEN.match(line):
            fence, in_code = opened.group(1), False
            continue
        blank = not line.strip()
        indented = line.expandtabs(4).startswith("    ")
        if indented and not blank and (in_code or (previous_blank and not in_list)):
            in_code = True
            continue
        in_code = in_code and blank
        if not blank:
            in_list = bool(_LIST_ITEM.match(line)) or (in_list and (indented or not previous_blank))
        kept.append(line)
        previous_blank = blank
    return "\n".join(kept)


def _link_reference(url: str, server_url: str) -> IssueReference | None:
    # The out-of-band links loop: same host (or none), path exactly /owner/repo/issues|pulls/N.
    link = urlsplit(url)
    if link.netloc and link.netloc.lower() != urlsplit(server_url).netloc.lower():
        return None
    parts = link.path.split("/")
    if len(parts) != 5 or parts[0] or parts[3] not in ("issues", "pulls"):
        return None
    if not (parts[4].isascii() and parts[4].isdigit()) or int(parts[4]) > _MAX_INDEX:
        return None
    owner, name = parts[1].lower(), parts[2].lower()
    if not (_VALID_NAME.fullmatch(owner) and _VALID_NAME.fullmatch(name)):
        return None
    return IssueReference(int(parts[4]), owner, name, "none")


def _shorten_plain_urls(text: str, server_url: str) -> str:
    # convertFullHTMLReferencesToShortRefs: only in plain text (the PR title).
    root = re.escape(server_url.strip().rstrip("/") + "/")
    pattern = re.compile(
        rf"({_WS}|^|\(|\[){root}({_NAME}/{_NAME})/(issues|pulls)/([0-9]+)(?={_END})"
    )
    return pattern.sub(
        lambda m: f"{m.group(1)}{m.group(2)}{'#' if m.group(3) == 'issues' else '!'}{m.group(4)}",
        text,
    )
