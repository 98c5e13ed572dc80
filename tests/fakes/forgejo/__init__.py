"""A stateful fake Forgejo: a real HTTP server speaking Forgejo v16's shapes and status codes.

Objects are rendered from the constructed payloads in ``tests/forgejo/data/payloads`` (byte
copies of ``/work/shared/forgejo/payloads``), so every key Forgejo sends is there, and
``tests/forgejo/test_forgejo_fake_schema.py`` validates the answers against Forgejo's swagger.
Every endpoint needs ``Authorization: token <t>`` (401 otherwise). Lists paginate with
``page``/``limit`` (default 30, at most 50) and answer ``Link`` and ``X-Total-Count`` as Forgejo.

Failure injection: ``fake.fail_mode = "refuse"`` closes the listening socket (connections are
refused), ``"503"`` answers 503 to everything, ``None`` restores; ``fail_next(n)`` fails only
the next ``n`` requests; ``hang()`` holds every answer until ``release()``.
``delivery(...)`` builds a signed webhook shaped like Forgejo's.
"""

from tests.fakes.forgejo.payloads import (
    PAYLOAD_DIR,
    SWAGGER_PATH,
    WEBHOOK_SECRET,
    load_payload,
    marshal,
    payload_names,
)
from tests.fakes.forgejo.routes import ROUTES
from tests.fakes.forgejo.server import FakeForgejo
from tests.fakes.forgejo.state import Call

__all__ = [
    "PAYLOAD_DIR",
    "ROUTES",
    "SWAGGER_PATH",
    "WEBHOOK_SECRET",
    "Call",
    "FakeForgejo",
    "load_payload",
    "marshal",
    "payload_names",
]
