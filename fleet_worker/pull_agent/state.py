"""The daemon's persistent identity: ``<state_dir>/agent.json`` (mode 0600) holds the agent
token and a stable ``host_uid``, so a restart reuses both and never needs a new join token."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class AgentState:
    host_uid: str
    server: str = ""
    agent_id: str = ""
    agent_token: str = ""


def load(state_dir: Path) -> AgentState:
    path = state_dir / "agent.json"
    if path.exists():
        data = json.loads(path.read_text())
        return AgentState(
            **{k: data.get(k, "") for k in ("host_uid", "server", "agent_id", "agent_token")}
        )
    return AgentState(host_uid=f"pull-{uuid.uuid4()}")


def save(state_dir: Path, state: AgentState) -> None:
    """Write atomically, readable by the owner only."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / "agent.json.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(asdict(state), handle)
    os.chmod(tmp, 0o600)
    os.replace(tmp, state_dir / "agent.json")
