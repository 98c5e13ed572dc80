"""Fixtures for the Forgejo building blocks: a running fake Forgejo and a client for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fleet_common.forgejo.client import ForgejoClient
from tests.fakes.forgejo import FakeForgejo


@pytest.fixture
def client(fake: FakeForgejo) -> Iterator[ForgejoClient]:
    with ForgejoClient(fake.url, fake.token, timeout=5, backoff_factor=0) as api:
        yield api


@pytest.fixture
def repo(fake: FakeForgejo) -> str:
    return fake.add_repo("alice", "widgets")
