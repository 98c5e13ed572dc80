"""The embedded default's broker (``filesystem://``) never hands a consumer half a message.

Found end to end: under load, ``fleet beat`` died with "Unrecoverable error: JSONDecodeError"
because kombu's filesystem producer creates a message file before writing it and a consumer
took it in between. Large messages widen that window enough to show it every time.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fleet_common.settings import load_settings
from fleet_worker.celery_app import make_celery

MESSAGES = 60
SIZE = 1_000_000


def test_a_consumer_only_ever_reads_whole_messages(tmp_path: Path) -> None:
    settings = load_settings(env={"FLEET_ORCHESTRATOR_STATE_DIR": str(tmp_path / "state")})
    app = make_celery(settings)
    received: list[int] = []
    errors: list[str] = []

    def consume() -> None:
        with app.connection_for_read() as connection:
            queue = connection.SimpleQueue("e2e.whole")
            while len(received) + len(errors) < MESSAGES:
                try:
                    message: Any = queue.get(timeout=30)
                except queue.Empty:
                    errors.append("no message within 30 s")
                    return
                except Exception as error:  # what killed beat: a JSON error from the transport
                    errors.append(repr(error))
                    continue
                received.append(len(message.payload["data"]))
                message.ack()

    consumer = threading.Thread(target=consume, name="e2e-consumer")
    consumer.start()
    with app.connection_for_write() as connection:
        queue = connection.SimpleQueue("e2e.whole")
        for _ in range(MESSAGES):
            queue.put({"data": "x" * SIZE})
    consumer.join(120)
    assert not consumer.is_alive()
    assert errors == [], errors[:3]
    assert received == [SIZE] * MESSAGES
