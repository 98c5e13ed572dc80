"""The publisher: wake-ups reach the broker and stay there until consumed; a down broker never
blocks or fails the caller, and sending resumes by itself when the broker is back."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fleet_common.settings import Settings, load_settings
from fleet_common.sweeps import Publish
from fleet_worker import publisher as publisher_module
from fleet_worker.celery_app import make_celery
from fleet_worker.publisher import (
    DISPATCH_TASK,
    Message,
    Publisher,
    coalesce,
    queue_name,
    wake_queue,
)
from tests import services
from tests.api_helpers import wait_until


def broker_settings(tmp_path: Path, broker_url: str, **env: str) -> Settings:
    return load_settings(
        env={
            "FLEET_ORCHESTRATOR_STATE_DIR": str(tmp_path / "state"),
            "FLEET_BROKER_URL": broker_url,
            **env,
        }
    )


@contextlib.contextmanager
def publisher_for(settings: Settings, **options: Any) -> Iterator[Publisher]:
    publisher = Publisher(make_celery(settings), **options)
    try:
        yield publisher
    finally:
        publisher.close()


def items(count: int) -> list[Publish]:
    return [Publish(f"tsk_{n}", "code:python", None) for n in range(count)]


def take(settings: Settings, name: str) -> Any:
    """One message from queue ``name`` (waiting a little for it), or fail."""
    with make_celery(settings).connection_for_read() as connection:
        bound = wake_queue(name)(connection.default_channel)
        return wait_until(lambda: bound.get(no_ack=True), timeout=10, what=f"a message on {name}")


def test_queue_names_follow_assignment_then_requirements() -> None:
    assert queue_name(Publish("t", "code:python+tests", None)) == "fleet.cap.code:python+tests"
    assert queue_name(Publish("t", "_", None)) == "fleet.cap._"
    assert queue_name(Publish("t", "code:python", "agt_1")) == "fleet.agent.agt_1"


def test_publish_never_blocks_when_the_broker_is_unreachable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    closed = services.free_port()  # nothing listens there: every connect is refused
    settings = broker_settings(tmp_path, f"redis://127.0.0.1:{closed}/0")
    caplog.set_level(logging.WARNING, logger="fleet_worker.publisher")
    with publisher_for(settings) as publisher:
        started = time.monotonic()
        publisher.publish(items(500))
        assert time.monotonic() - started < 0.2
        assert publisher.flush(timeout=10)
        assert (publisher.sent, publisher.dropped) == (0, 500)
        started = time.monotonic()
        publisher.publish(items(1))  # still down: still no wait
        assert time.monotonic() - started < 0.2
    warnings = [r for r in caplog.records if "cannot send" in r.getMessage()]
    assert len(warnings) == 1  # one warning per outage, not one per message


def test_a_full_backlog_drops_instead_of_blocking(tmp_path: Path) -> None:
    settings = broker_settings(tmp_path, f"redis://127.0.0.1:{services.free_port()}/0")
    with publisher_for(settings, max_pending=5) as publisher:
        started = time.monotonic()
        publisher.publish(items(1000))
        assert time.monotonic() - started < 0.2
        assert publisher.flush(timeout=10)
        assert publisher.sent == 0 and publisher.dropped == 1000


def check_delivery(settings: Settings) -> None:
    with publisher_for(settings) as publisher:
        publisher.publish(
            [Publish("tsk_cap", "code:python+tests", None), Publish("tsk_mine", "_", "agt_7")]
        )
        assert publisher.flush(timeout=10)
        assert publisher.sent == 2
    # Nobody consumed these queues when the messages were sent: they were kept.
    for task_id, name in (
        ("tsk_cap", "fleet.cap.code:python+tests"),
        ("tsk_mine", "fleet.agent.agt_7"),
    ):
        message = take(settings, name)
        assert message.headers["task"] == DISPATCH_TASK
        assert message.decode()[:2] == [[task_id], {}]
        assert message.delivery_info["routing_key"] == name


def test_wake_ups_reach_the_filesystem_broker(tmp_path: Path) -> None:
    check_delivery(broker_settings(tmp_path, "filesystem://"))


def test_one_refused_message_does_not_stop_the_others(tmp_path: Path) -> None:
    # "/" is valid in a capability, but a filesystem broker stores a queue's messages in files
    # named after the queue: the broker refuses that one message, and only that one.
    settings = broker_settings(tmp_path, "filesystem://")
    with publisher_for(settings) as publisher:
        publisher.publish([Publish("tsk_bad", "code/rust", None), Publish("tsk_ok", "ok", None)])
        assert publisher.flush(timeout=10)
        assert (publisher.sent, publisher.dropped) == (1, 1)
    assert take(settings, "fleet.cap.ok").decode()[0] == ["tsk_ok"]


def test_what_is_published_while_holding_is_queued_at_the_end(tmp_path: Path) -> None:
    settings = broker_settings(tmp_path, "filesystem://")
    with publisher_for(settings) as publisher:
        with publisher.holding():
            publisher.publish([Publish("tsk_a", "held", None)])
            with publisher.holding():  # nested: still held until the outer block ends
                publisher.publish([Publish("tsk_b", "held", None)])
            assert publisher.flush(timeout=1) and publisher.sent == 0
        assert publisher.flush(timeout=10)
        assert (publisher.sent, publisher.dropped) == (2, 0)
    # Taken together by the sending thread, the two wake-ups went as one message for both.
    assert take(settings, "fleet.cap.held").decode()[:2] == [["tsk_a"], {"count": 2}]


def test_what_follows_a_send_within_the_linger_goes_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long linger, so that a slow machine cannot split what the test publishes at once.
    monkeypatch.setattr(publisher_module, "LINGER_SECS", 1.0)
    settings = broker_settings(tmp_path, "filesystem://")
    with publisher_for(settings) as publisher:
        publisher.publish([Publish("tsk_0", "linger", None)])  # after a quiet spell: at once
        assert publisher.flush(timeout=10) and publisher.sent == 1
        for n in range(1, 6):  # one by one, 50 ms apart, as five requests would
            publisher.publish([Publish(f"tsk_{n}", "linger", None)])
            time.sleep(0.05)  # without the linger, each would go on its own
        assert publisher.flush(timeout=10)
        assert (publisher.sent, publisher.dropped) == (6, 0)
    assert take(settings, "fleet.cap.linger").decode()[:2] == [["tsk_0"], {}]
    assert take(settings, "fleet.cap.linger").decode()[:2] == [["tsk_1"], {"count": 5}]


def test_a_batch_sends_one_wake_up_per_queue_counting_its_tasks() -> None:
    sync = Message("fleet.forgejo.sync", "fleet.forgejo", ("tsk_s",))
    batch: list[Publish | Message] = [
        Publish("tsk_1", "code:python", None),
        sync,
        Publish("tsk_2", "code:rust", None),
        Publish("tsk_3", "code:python", None),
        Publish("tsk_4", "_", "agt_7"),
        Publish("tsk_5", "code:python", None),
        sync,
    ]
    assert coalesce(batch) == [
        (Publish("tsk_1", "code:python", None), 3),
        (sync, 1),
        (Publish("tsk_2", "code:rust", None), 1),
        (Publish("tsk_4", "_", "agt_7"), 1),
        (sync, 1),
    ]
    assert coalesce([]) == []


def test_wake_ups_reach_redis(tmp_path: Path, redis_url: str) -> None:
    check_delivery(broker_settings(tmp_path, redis_url))


class TcpProxy:
    """A TCP relay to ``target`` on ``port`` that can be taken down and brought back."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port, self.target = port, target
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []

    def up(self) -> None:
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()

    def down(self) -> None:
        for sock in [self._server, *self._sockets]:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self._server, self._sockets = None, []

    def _accept(self, server: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = server.accept()
                upstream = socket.create_connection(self.target)
                self._sockets += [client, upstream]
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def test_sending_resumes_when_the_broker_comes_back(tmp_path: Path, redis_url: str) -> None:
    host_port, db = redis_url.removeprefix("redis://").rsplit("/", 1)
    proxy = TcpProxy(services.free_port(), ("127.0.0.1", int(host_port.rsplit(":", 1)[1])))
    settings = broker_settings(tmp_path, f"redis://127.0.0.1:{proxy.port}/{db}")
    with publisher_for(settings, cooldown_secs=0.2) as publisher:
        publisher.publish([Publish("tsk_lost", "outage", None)])  # the broker is down
        assert publisher.flush(timeout=10) and publisher.dropped == 1
        proxy.up()
        try:

            def delivered() -> bool:
                publisher.publish([Publish("tsk_back", "outage", None)])
                publisher.flush(timeout=10)
                return publisher.sent > 0

            wait_until(delivered, timeout=10, what="the publisher to send again")
            assert take(settings, "fleet.cap.outage").decode()[0] == ["tsk_back"]
        finally:
            proxy.down()


def test_each_message_goes_with_its_task_sent_event(tmp_path: Path, redis_url: str) -> None:
    # With [orchestrator] task_events: the queues and the event exchange are bound to the
    # publisher's channel once; every message still goes out with its own Celery task-sent
    # event, on every connection.
    import redis

    settings = broker_settings(tmp_path, redis_url, FLEET_ORCHESTRATOR_TASK_EVENTS="true")
    client = redis.Redis.from_url(redis_url)
    events = client.pubsub()
    # Pub/sub channels span the server's databases: only this database's task-sent events
    # (kombu's fanout channel "/<db>.<exchange>/<routing key>"), not other tests' or runs'.
    events.subscribe(f"/{client.connection_pool.connection_kwargs['db']}.celeryev/task.sent")
    confirmed = wait_until(lambda: events.get_message(timeout=0.1), timeout=5, what="subscribe")
    assert confirmed["type"] == "subscribe"
    with publisher_for(settings) as publisher:
        # One queue each: a batch's wake-ups for one queue would go as one message.
        first = [Publish("tsk_0", "code:python", None), Publish("tsk_1", "code:go", None)]
        for batch in (first, [Publish("tsk_9", "code:rust", None)]):
            publisher.publish(batch)
            assert publisher.flush(timeout=10)
            publisher._release_connection()  # the next batch binds to a new connection
        assert (publisher.sent, publisher.dropped) == (3, 0)
    sent: list[dict[str, Any]] = []

    def three() -> bool:
        while message := events.get_message(timeout=0.1):
            envelope = json.loads(message["data"])
            assert envelope["properties"]["body_encoding"] == "base64"
            event = json.loads(base64.b64decode(envelope["body"]))
            # Other tests' processes may send events in this database (a worker: lists).
            if isinstance(event, dict) and event.get("pid") == os.getpid():
                sent.append(event)
        return len(sent) == 3

    wait_until(three, timeout=10, what="three task-sent events")
    assert [(e["type"], e["name"], e["queue"], e["args"]) for e in sent] == [
        ("task-sent", DISPATCH_TASK, "fleet.cap.code:python", "['tsk_0']"),
        ("task-sent", DISPATCH_TASK, "fleet.cap.code:go", "['tsk_1']"),
        ("task-sent", DISPATCH_TASK, "fleet.cap.code:rust", "['tsk_9']"),
    ]
    for name, task_id in (("fleet.cap.code:python", "tsk_0"), ("fleet.cap.code:go", "tsk_1")):
        assert take(settings, name).decode()[0] == [task_id]
    assert take(settings, "fleet.cap.code:rust").decode()[0] == ["tsk_9"]


#: Fields that differ between any two sends: the task's id (and the ids derived from it), the
#: sending thread's oid, kombu's delivery tag, the event's time and clock.
_PER_SEND = {"id", "root_id", "correlation_id", "reply_to", "delivery_tag", "uuid"}
_PER_EVENT = {"timestamp", "clock", "utcoffset"}


def _about(iso_time: str) -> int:
    """An absolute time to within 10 s (as sent a few milliseconds apart)."""
    return round(dt.datetime.fromisoformat(iso_time).timestamp() / 10)


def _normalized(envelope: dict[str, Any], per_send: set[str]) -> dict[str, Any]:
    headers = {k: v for k, v in envelope["headers"].items() if k not in per_send}
    if headers.get("expires"):  # an absolute time, a few milliseconds apart
        headers["expires"] = _about(headers["expires"])
    properties = envelope["properties"]
    body = json.loads(base64.b64decode(envelope["body"]))
    if isinstance(body, dict):  # an event
        body = {k: v for k, v in body.items() if k not in per_send | _PER_EVENT}
        if body.get("expires"):
            body["expires"] = _about(body["expires"])
    return {
        **{k: v for k, v in envelope.items() if k not in ("headers", "properties", "body")},
        "headers": headers,
        "properties": {
            k: v for k, v in properties.items() if k not in per_send and k != "delivery_info"
        }
        | {"delivery_info": properties["delivery_info"]},
        "body": body,
    }


@pytest.mark.parametrize("finalized", [False, True], ids=["api-app", "worker-app"])
def test_messages_and_events_are_the_ones_send_task_sends(
    tmp_path: Path, redis_url: str, finalized: bool
) -> None:
    # The publisher builds its messages itself (Celery's as_task_v2, a header template):
    # what reaches the broker is what app.send_task sent for the same wake-ups and syncs,
    # whether the sending app has the sync task's options registered (a worker) or not.
    import redis

    from fleet_worker.tasks import dispatch
    from fleet_worker.tasks.forgejo import sync_message

    settings = broker_settings(tmp_path, redis_url, FLEET_ORCHESTRATOR_TASK_EVENTS="true")
    client = redis.Redis.from_url(redis_url)
    events = client.pubsub()
    events.psubscribe("*celeryev*")
    confirmed = wait_until(lambda: events.get_message(timeout=0.1), timeout=5, what="psubscribe")
    assert confirmed["type"] == "psubscribe"
    # Queues of their own: another test's worker may consume fleet.forgejo in this database.
    own = uuid.uuid4().hex
    sends: list[Publish | Any] = [
        Publish("tsk_cap", own, None),
        Publish("tsk_agent", "code:python", f"agt_{own}"),
        Publish("tsk_cap_2", own, None),  # goes with tsk_cap's: one message, count 2
        replace(sync_message("tsk_sync"), queue=f"fleet.sync.{own}"),
        replace(sync_message("tsk_sweep", force=True, retry=False), queue=f"fleet.sync.{own}"),
    ]
    app = make_celery(settings)
    if finalized:  # a worker's app: every task registered, with its options
        dispatch.register(app)
        app.finalize()
    publisher = Publisher(app)
    try:
        publisher._send(sends)  # one batch, as the sending thread sends it
        assert publisher.sent == len(sends)
    finally:
        publisher.close()
    messages = coalesce(sends)
    assert len(messages) == len(sends) - 1
    reference = make_celery(settings)
    if finalized:
        dispatch.register(reference)
        reference.finalize()
    for item, count in messages:  # the publisher's former call
        if isinstance(item, Publish):
            task, name, args, kwargs, extra = (
                DISPATCH_TASK,
                queue_name(item),
                [item.task_id],
                {"count": count} if count > 1 else {},
                {},
            )
        else:
            task, name, args, kwargs = item.task, item.queue, list(item.args), item.kwargs
            extra = {"expires": item.expires} if item.expires else {}
        reference.send_task(
            task,
            args=args,
            kwargs=kwargs,
            queue=wake_queue(name),
            retry=False,
            ignore_result=True,
            add_to_parent=False,
            **extra,
        )
    for name in (f"fleet.cap.{own}", f"fleet.agent.agt_{own}", f"fleet.sync.{own}"):
        queued = [json.loads(m) for m in reversed(client.lrange(name, 0, -1))]  # oldest first
        half = len(queued) // 2
        for ours, theirs in zip(queued[:half], queued[half:], strict=True):
            for envelope in (ours, theirs):  # the fields left out of the comparison
                assert envelope["headers"]["id"] == envelope["properties"]["correlation_id"]
                assert envelope["properties"]["reply_to"]
            assert _normalized(ours, _PER_SEND) == _normalized(theirs, _PER_SEND)
    sent: list[dict[str, Any]] = []

    def all_events() -> bool:
        while message := events.get_message(timeout=0.1):
            event = json.loads(message["data"])
            body = json.loads(base64.b64decode(event["body"]))  # a worker's: a list of events
            if isinstance(body, dict) and own in body.get("queue", ""):
                sent.append(event)
        return len(sent) == 2 * len(messages)

    wait_until(all_events, timeout=10, what="the task-sent events")
    ours_events, theirs_events = sent[: len(messages)], sent[len(messages) :]
    for ours, theirs in zip(ours_events, theirs_events, strict=True):
        assert _normalized(ours, _PER_SEND) == _normalized(theirs, _PER_SEND)


def test_no_fleet_task_sets_an_option_the_publisher_cannot_honour(tmp_path: Path) -> None:
    from fleet_worker.task_messages import _exec_options
    from fleet_worker.tasks import dispatch

    app = make_celery(broker_settings(tmp_path, "filesystem://"))
    dispatch.register(app)  # a worker's app
    app.finalize()
    assert DISPATCH_TASK in app.tasks
    for name in app.tasks:
        _exec_options(app, name)  # raises for a routing option
