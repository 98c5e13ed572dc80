"""The constructed Forgejo payloads (byte copies of ``/work/shared/forgejo/payloads``), Go's
JSON encoding, and the header set Forgejo sends with a signed delivery."""

from __future__ import annotations

import functools
import json
import uuid
from pathlib import Path
from typing import Any

from fleet_common.forgejo.signatures import sign

DATA_DIR = Path(__file__).resolve().parents[2] / "forgejo" / "data"
PAYLOAD_DIR = DATA_DIR / "payloads"
SWAGGER_PATH = DATA_DIR / "forgejo-v16.0-swagger.v1.json"
WEBHOOK_SECRET = "test-secret"


def load_payload(name: str) -> tuple[dict[str, str], bytes]:
    """A constructed payload (e.g. ``"issues.opened"``): its headers and its exact bytes."""
    headers = json.loads((PAYLOAD_DIR / f"{name}.headers.json").read_text())
    headers.pop("_note", None)
    return headers, (PAYLOAD_DIR / f"{name}.json").read_bytes()


def payload_names() -> list[str]:
    """Names of all constructed payloads."""
    files = PAYLOAD_DIR.glob("*.json")
    return sorted(p.name[:-5] for p in files if not p.name.endswith(".headers.json"))


def marshal(payload: Any) -> bytes:
    """Serialise like Go's ``json.MarshalIndent(v, "", "  ")``: ``< > &`` escaped, no newline."""
    text = json.dumps(payload, indent=2, ensure_ascii=False)
    for char in "<>&\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text.encode()


@functools.cache
def example(name: str) -> str:
    return (PAYLOAD_DIR / f"{name}.json").read_text()


def forgejo_event_type(event: str, action: str, *, is_pull: bool) -> str:
    """``X-Forgejo-Event-Type`` for an event and action (``modules/webhook/type.go``)."""
    if event == "issue_comment":
        return "pull_request_comment" if is_pull else "issue_comment"
    suffixes = {
        "label": ("label_updated", "label_cleared"),
        "assign": ("assigned", "unassigned"),
        "milestone": ("milestoned", "demilestoned"),
        "sync": ("synchronized",),
    }
    suffix = next((s for s, actions in suffixes.items() if action in actions), None)
    if event == "issues":
        return f"issue_{suffix}" if suffix else "issues"
    return f"{event}_{suffix}" if suffix else event


def delivery_headers(
    event: str, action: str, payload: bytes, secret: str, delivery_id: str | None, is_pull: bool
) -> dict[str, str]:
    """Forgejo's header set for a POST + JSON hook (``AddDefaultHeaders``)."""
    event_type = forgejo_event_type(event, action, is_pull=is_pull)
    delivery_id = delivery_id or str(uuid.uuid4())
    signatures = sign(payload, secret)
    headers = {"Content-Type": "application/json", "User-Agent": "Go-http-client/1.1"}
    for prefix in ("Forgejo", "Gitea", "Gogs"):
        headers[f"X-{prefix}-Delivery"] = delivery_id
        headers[f"X-{prefix}-Event"] = event
        headers[f"X-{prefix}-Event-Type"] = event_type
        headers[f"X-{prefix}-Signature"] = signatures[f"X-{prefix}-Signature"]
    headers["X-Hub-Signature"] = signatures["X-Hub-Signature"]
    headers["X-Hub-Signature-256"] = signatures["X-Hub-Signature-256"]
    headers.update(
        {
            "X-GitHub-Delivery": delivery_id,
            "X-GitHub-Event": event,
            "X-GitHub-Event-Type": event_type,
        }
    )
    return headers
