"""A Fleet system of real processes connected to a fake Forgejo, for the whole-story tests.

The fake Forgejo runs in the test process; its repository's ``clone_url`` is a local bare git
repository (``main`` with one commit). The API is a real HTTP server with Forgejo configured
(webhook secret, token, bot login), ``fleet worker`` serves a host whose agent type runs the
demo agent with Forgejo's URL and a token in its environment (so it opens its PR through the
API), and ``fleet beat`` runs the sweeps and the write-back's syncs. Deliveries are signed
payloads built by the fake from its state, posted to the API as Forgejo would.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from fleet_common.settings import load_settings
from tests.e2e.conftest import backend
from tests.e2e.system import HTTP_TIMEOUT, Backend, System, local_host
from tests.fakes.forgejo import WEBHOOK_SECRET, FakeForgejo
from tests.forgejo_story.gitrepo import bare_repo

HOST = "h1"
AGENT_TYPE = "demo-forgejo"
#: The fleet/* labels of the issue, one expected at a time.
FLEET_PREFIX = "fleet/"


class ForgejoSystem(System):
    """A :class:`System` whose API and processes are configured for the fake Forgejo."""

    def __init__(self, root: Path, urls: Backend, fake: FakeForgejo, **config: Any) -> None:
        self.fake = fake
        self.bare = bare_repo(root / "git")
        self.repo = fake.add_repo("alice", "widgets", clone_url=str(self.bare))
        self._forgejo_env = {
            "FLEET_FORGEJO_URL": fake.url,
            "FLEET_FORGEJO_TOKEN": fake.token,
            "FLEET_FORGEJO_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "FLEET_FORGEJO_BOT_LOGIN": fake.bot_login,
        }
        agent_env = {
            "FLEET_FORGEJO_URL": fake.url,
            "FLEET_FORGEJO_TOKEN": fake.token,
            "FLEET_DEMO_SLEEP": str(config.pop("agent_sleep", 0)),
        }
        agent = {
            "command": [sys.executable, "-m", "fleet_worker.demo_agent", "{prompt_file}"],
            "env": agent_env,
            "timeout_secs": 120,
        }
        super().__init__(
            root,
            urls,
            hosts=[local_host(HOST, root, {"agent_type": AGENT_TYPE})],
            agent_types={AGENT_TYPE: agent},
            orchestrator={"sweep_interval_secs": 1, **config.pop("orchestrator", {})},
            **config,
        )

    def _start_api(self) -> None:
        # Forgejo's settings for the API in this process and for every process spawned later.
        self.env.update(self._forgejo_env)
        self.settings = load_settings(env=self.env)
        super()._start_api()

    # -- Forgejo -----------------------------------------------------------------------------

    def deliver(self, event: str, action: str, number: int, sender: str = "alice") -> Any:
        """Post the signed delivery of ``event``/``action`` about ``number`` as it is now."""
        headers, body = self.fake.delivery(
            event, action, repo=self.repo, number=number, sender=sender
        )
        reply = requests.post(
            f"{self.url}/api/v1/webhooks/forgejo", data=body, headers=headers, timeout=HTTP_TIMEOUT
        )
        assert reply.status_code == 202, (reply.status_code, reply.text)
        return reply.json()

    def fleet_labels(self, number: int) -> list[str]:
        return [n for n in self.fake.labels_of(self.repo, number) if n.startswith(FLEET_PREFIX)]

    def comments(self, number: int) -> list[str]:
        return [c.body for c in self.fake.comments_of(self.repo, number)]

    def shows(self, number: int, label: str | None, *phrases: str) -> bool:
        """Whether the issue carries exactly ``label`` of the fleet/* labels and its one
        status comment contains every phrase."""
        labels = self.fleet_labels(number)
        comments = self.comments(number)
        return (
            labels == ([label] if label else [])
            and len(comments) == 1
            and all(p in comments[0] for p in phrases)
        )

    def wait_shows(self, number: int, label: str | None, *phrases: str, timeout: float) -> None:
        """Wait (at most ``timeout``) until :meth:`shows`; fail showing what the issue shows."""
        deadline = time.monotonic() + timeout
        while not self.shows(number, label, *phrases):
            if time.monotonic() > deadline:
                pytest.fail(
                    f"timed out after {timeout}s waiting for issue #{number} to show {label} "
                    f"and {phrases}; it shows {self.fleet_labels(number)} and comments "
                    f"{self.comments(number)}\n{self.logs()}"
                )
            time.sleep(0.1)


@contextmanager
def forgejo_system(
    root: Path, backend_name: str, fake: FakeForgejo, **config: Any
) -> Iterator[ForgejoSystem]:
    with backend(backend_name, root) as urls:
        system = ForgejoSystem(root, urls, fake, **config)
        try:
            yield system
        finally:
            system.close()
