"""Capability routing: requirement keys, queue names and the subsets an agent can serve."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable

from fleet_common.errors import InvalidInput

AGENT_LABEL_PREFIX = "agent:"
NO_REQUIREMENTS = "_"
# Capabilities become queue names (and, on the filesystem broker, file names): no "/" or "+".
CAPABILITY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


def requirements_from_labels(labels: Iterable[str]) -> list[str]:
    """``agent:code:rust`` → ``code:rust``; every other label is metadata."""
    found = {
        label[len(AGENT_LABEL_PREFIX) :].strip()
        for label in labels
        if label.startswith(AGENT_LABEL_PREFIX)
    }
    return sorted(found)


def validate_capabilities(values: Iterable[str], field: str) -> list[str]:
    result = sorted(set(values))
    for value in result:
        if not CAPABILITY_RE.match(value) or "+" in value:
            raise InvalidInput(
                f"{field}: {value!r} is not a valid capability "
                "(letters, digits and . _ : -, at most 64 characters)"
            )
    return result


def req_key(requirements: Iterable[str]) -> str:
    """The routing key: sorted requirements joined with ``+``, ``_`` when there are none."""
    reqs = sorted(set(requirements))
    return "+".join(reqs) if reqs else NO_REQUIREMENTS


def requirements_of(key: str) -> list[str]:
    """The requirements a routing key stands for (:func:`req_key` undone)."""
    return [] if key == NO_REQUIREMENTS else key.split("+")


def queue_for_key(key: str) -> str:
    return f"fleet.cap.{key}"


def agent_queue(agent_id: str) -> str:
    return f"fleet.agent.{agent_id}"


def servable_keys(capabilities: Iterable[str], max_requirements: int) -> list[str]:
    """Every requirement key an agent with ``capabilities`` can serve (subsets up to
    ``max_requirements`` elements, plus the empty set)."""
    caps = sorted(set(capabilities))
    keys = [NO_REQUIREMENTS]
    for size in range(1, min(max_requirements, len(caps)) + 1):
        keys.extend("+".join(combo) for combo in itertools.combinations(caps, size))
    return keys


def can_serve(capabilities: Iterable[str], requirements: Iterable[str]) -> bool:
    return set(requirements) <= set(capabilities)
