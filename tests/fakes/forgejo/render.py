"""Forgejo's JSON shapes, rendered from the constructed payloads so every key Forgejo sends is
there."""

from __future__ import annotations

import json

from tests.fakes.forgejo.payloads import example
from tests.fakes.forgejo.state import Comment, ForgejoState, Issue, Json, Label, Repo, sha

_EXAMPLE_ROOT = "https://forgejo.example.com/"


class Renderer(ForgejoState):
    """The state as Forgejo v16 renders it."""

    def _tpl(self, name: str, key: str) -> Json:
        node = json.loads(example(name).replace(_EXAMPLE_ROOT, self.url))[key]
        return dict(node)

    def _user_json(self, login: str) -> Json:
        return {
            **self._tpl("issues.opened", "sender"),
            "id": self._users.get(login, 0),
            "login": login,
            "username": login,
            "full_name": login,
            "email": f"{login}@noreply.forgejo.example.com",
            "html_url": f"{self.url}{login}",
            "avatar_url": f"{self.url}avatars/{sha(login)[:32]}",
        }

    def _repo_json(self, r: Repo) -> Json:
        web, api, ssh = (
            f"{self.url}{r.full_name}",
            f"{self.api_url}/repos/{r.full_name}",
            "ssh://git@127.0.0.1",
        )
        open_items = [i for i in r.issues.values() if i.state == "open"]
        return {
            **self._tpl("issues.opened", "repository"),
            "id": r.id,
            "owner": self._user_json(r.owner),
            "name": r.name,
            "full_name": r.full_name,
            "html_url": web,
            "url": api,
            "languages_url": f"{api}/languages",
            "clone_url": r.clone_url,
            "ssh_url": f"{ssh}/{r.full_name}.git",
            "wiki_clone_url": f"{web}.wiki.git",
            "wiki_ssh_url": f"{ssh}/{r.full_name}.wiki.git",
            "default_branch": r.default_branch,
            "open_issues_count": sum(1 for i in open_items if i.pull is None),
            "open_pr_counter": sum(1 for i in open_items if i.pull is not None),
        }

    def _label_json(self, r: Repo, label: Label) -> Json:
        return {
            "id": label.id,
            "name": label.name,
            "exclusive": label.exclusive,
            "is_archived": label.is_archived,
            "color": label.color,
            "description": label.description,
            "url": f"{self.api_url}/repos/{r.full_name}/labels/{label.id}",
        }

    def _common(self, r: Repo, issue: Issue) -> Json:
        # Fields an issue and a PR render alike (v16: a PR's issue url is …/pulls/N too).
        kind = "pulls" if issue.pull else "issues"
        return {
            "id": issue.id,
            "url": f"{self.api_url}/repos/{r.full_name}/{kind}/{issue.number}",
            "html_url": f"{self.url}{r.full_name}/{kind}/{issue.number}",
            "number": issue.number,
            "user": self._user_json(issue.login),
            "title": issue.title,
            "body": issue.body,
            "labels": [self._label_json(r, r.labels[i]) for i in issue.labels],
            "state": issue.state,
            "comments": len(self.comments_of(r.full_name, issue.number)),
            "created_at": issue.created,
            "updated_at": issue.updated,
            "closed_at": issue.closed_at,
        }

    def _issue_json(self, r: Repo, issue: Issue) -> Json:
        out = {**self._tpl("issues.opened", "issue"), **self._common(r, issue)}
        out["repository"] = {"id": r.id, "name": r.name, "owner": r.owner, "full_name": r.full_name}
        if issue.pull is not None:
            out["pull_request"] = {
                "merged": issue.pull.merged,
                "merged_at": issue.pull.merged_at,
                "draft": False,
                "html_url": out["html_url"],
            }
        return out

    def _pull_json(self, r: Repo, issue: Issue) -> Json:
        if issue.pull is None:
            raise KeyError(issue.number)
        p, repo = issue.pull, self._repo_json(r)
        out = {**self._tpl("pull_request.opened", "pull_request"), **self._common(r, issue)}
        return {
            **out,
            "diff_url": f"{out['html_url']}.diff",
            "patch_url": f"{out['html_url']}.patch",
            "merged": p.merged,
            "merged_at": p.merged_at,
            "merge_commit_sha": p.merge_commit_sha,
            "merged_by": self._user_json(p.merged_by) if p.merged_by else None,
            "merge_base": p.base_sha,
            "base": {
                "label": p.base,
                "ref": p.base,
                "sha": p.base_sha,
                "repo_id": r.id,
                "repo": repo,
            },
            "head": {
                "label": p.head,
                "ref": p.head,
                "sha": p.head_sha,
                "repo_id": r.id,
                "repo": repo,
            },
        }

    def _comment_json(self, r: Repo, c: Comment) -> Json:
        is_pull = r.issues[c.number].pull is not None
        page = f"{self.url}{r.full_name}/{'pulls' if is_pull else 'issues'}/{c.number}"
        return {
            **self._tpl("issue_comment.created", "comment"),
            "id": c.id,
            "html_url": f"{page}#issuecomment-{c.id}",
            "pull_request_url": page if is_pull else "",
            "issue_url": "" if is_pull else page,
            "user": self._user_json(c.login),
            "body": c.body,
            "created_at": c.created,
            "updated_at": c.updated,
        }
