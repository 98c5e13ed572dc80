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
from fleet_worker.celery_app import broker_dir, make_celery

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


def test_a_bind_makes_sure_the_exchange_file_holds_it(tmp_path: Path) -> None:
    # kombu's binding state is process-wide and recorded before the file is written: a
    # second connection's bind found it there, wrote nothing, and published into no queue.
    settings = load_settings(env={"FLEET_ORCHESTRATOR_STATE_DIR": str(tmp_path / "state")})
    app = make_celery(settings)
    with app.connection_for_write() as first, app.connection_for_write() as second:
        consumer = first.SimpleQueue("e2e.bind")
        (broker_dir(settings) / "control" / "e2e.bind.exchange").unlink()  # not written yet
        producer = second.SimpleQueue("e2e.bind")
        producer.put({"n": 1})
        assert consumer.get(timeout=10).payload == {"n": 1}


def test_binding_tables_change_whole_under_concurrent_binds(tmp_path: Path) -> None:
    # kombu rewrote a table in place: a reader could find it empty, two binders lose one.
    settings = load_settings(env={"FLEET_ORCHESTRATOR_STATE_DIR": str(tmp_path / "state")})
    app = make_celery(settings)
    errors: list[str] = []

    def bind(n: int) -> None:
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            for k in range(25):
                try:
                    channel._queue_bind("e2e.table", f"q{n}.{k}", "", f"q{n}.{k}")
                    channel.get_table("e2e.table")
                except Exception as error:
                    errors.append(repr(error))

    threads = [threading.Thread(target=bind, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with app.connection_for_write() as connection:
        table = connection.default_channel.get_table("e2e.table")
    assert sorted(entry.queue for entry in table) == sorted(
        f"q{n}.{k}" for n in range(4) for k in range(25)
    )
