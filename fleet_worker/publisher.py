"""Publish after commit: wake-up messages for queued tasks, sent without blocking the caller.

A wake-up is a Celery message named ``fleet.dispatch`` with args ``[task_id]`` on the queue of
the task's requirement set (``fleet.cap.<key>``) or, for an assigned task, on its agent's queue
(``fleet.agent.<id>``). The worker that receives one claims the best eligible task for its
agent, so a wake-up is a hint, not an order: duplicates and strays are harmless, and a lost one
is re-sent by the relay sweep once the task's last publish is older than ``relay_after_secs``.

That is what lets :meth:`Publisher.publish` never block or fail: it only appends to a bounded
in-memory queue; a background thread sends with a fail-fast connection, and on any broker error
it logs, drops, and leaves the rest to the relay.

The thread sends everything waiting at once (up to :data:`MAX_BATCH`) through one kombu producer
batch: on Redis one pipeline, one round trip, for the messages and their Celery ``task-sent``
events (a request's wake-up and write-back sync, and other requests' messages queued meanwhile).
A batch that fails is dropped whole, like a single message was.

The wake-ups of one batch for the same queue go as one message that says how many it stands
for (``kwargs={"count": n}``, the first task's id in ``args``): the worker that receives it
claims for up to that many of its free places at once. A batch is sent at most every
:data:`LINGER_SECS`: what comes within that of the last send waits for the rest of it and goes
together, so under a burst the broker, the worker's consumer and Flower see one message per
queue every 20 ms instead of one per task or two (each costs a busy worker about 1 ms of CPU:
its receipt and its acknowledgement; in ``dispatch.py``'s burst, 3-13% more tasks per second
in two series of pairs).
A wake-up after a quiet spell goes at once; one that follows another within 20 ms waits for
the rest of them (a worker busy with the first's task chains its next claim to its completion
anyway).

The same thread sends other messages that a sweep backs up the same way (a :class:`Message`:
the Forgejo write-back's syncs, re-sent by its outbox sweep).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kombu import Queue

from fleet_common.dispatch.routing import agent_queue, queue_for_key
from fleet_common.sweeps import Publish
from fleet_worker.batches import take_batch
from fleet_worker.task_messages import TaskMessages

log = logging.getLogger(__name__)

#: The task a wake-up invokes; the worker side defines it, the publisher only sends the name.
DISPATCH_TASK = "fleet.dispatch"

#: Items waiting to be sent; beyond this, publish() drops (the relay sweep covers them).
DEFAULT_MAX_PENDING = 10_000
#: After a failed send, drop instead of sending for this long: while the broker is down, each
#: attempt would cost a connect timeout and the relay will re-send everything anyway.
DEFAULT_COOLDOWN_SECS = 1.0

#: At most this many messages go in one broker round trip.
MAX_BATCH = 200
#: The least time between two sends: what comes meanwhile waits and goes in the second.
LINGER_SECS = 0.02
#: Queues kept bound to the publisher's channel; beyond this many names the cache starts over.
MAX_BOUND_QUEUES = 4096

_STOP = object()


@dataclass(frozen=True)
class Message:
    """Any task message to send the same way: ``task`` with ``args``/``kwargs`` on ``queue``
    (a durable queue on the default exchange), dropped by a worker after ``expires`` seconds."""

    task: str
    queue: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    expires: float | None = None


def wake_queue(name: str) -> Queue:
    """The declaration of a wake-up queue: a durable queue on the default (anonymous) direct
    exchange, so a message sent before anyone consumes it is kept. Celery's auto-created
    queues would bind an exchange named after the queue, and ``:``/``+`` are not valid in an
    exchange name on the filesystem transport."""
    return Queue(name, routing_key=name)


def queue_name(item: Publish) -> str:
    """The queue a task's wake-up goes to: its agent's when assigned, else its capability set's."""
    if item.assigned_agent_id:
        return agent_queue(item.assigned_agent_id)
    return queue_for_key(item.req_key)


class _Pending(queue.Queue[Any]):
    """The items waiting to be sent."""

    def put_all_nowait(self, items: list[Any]) -> int:
        """Queue as many of ``items`` as there is room for, all at once: the sending thread
        takes all of them or none (one call's wake-ups go in one batch); how many."""
        with self.mutex:
            room = self.maxsize - self._qsize() if self.maxsize > 0 else len(items)
            taken = items[: max(room, 0)]
            for item in taken:
                self._put(item)
            if taken:
                self.unfinished_tasks += len(taken)
                self.not_empty.notify()
        return len(taken)


class Publisher:
    """Sends wake-ups on a background thread; ``publish`` never blocks and never raises."""

    def __init__(
        self,
        app: Any,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        cooldown_secs: float = DEFAULT_COOLDOWN_SECS,
    ) -> None:
        self.app = app
        self.max_pending = max_pending
        self.cooldown_secs = cooldown_secs
        self.sent = 0
        self.dropped = 0  # never sent: the queue was full, the broker down, or close() came first
        self._lock = threading.Lock()
        self._pending = _Pending(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closed = False
        self._connection: Any = None
        self._producer_: Any = None
        self._queues: dict[str, Queue] = {}
        self._events: Any = None
        self._messages: Any = None
        self._batching = False
        self._down_until = 0.0
        self._outage = False
        self._full_warned = False
        self._held = threading.local()

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Within the block, this thread's :meth:`publish` calls are only collected, and
        queued all at once at its end: the sending thread then takes them in one batch (a
        request's wake-up and write-back sync, published by two after-commit hooks)."""
        if getattr(self._held, "items", None) is not None:  # nested: the outer block queues
            yield
            return
        self._held.items = []
        try:
            yield
        finally:
            items, self._held.items = self._held.items, None
            if items:
                self.publish(items)

    def publish(self, items: Iterable[Publish | Message]) -> None:
        """Queue a wake-up (or message) for each item; returns at once whatever the broker's
        state."""
        held = getattr(self._held, "items", None)
        if held is not None:
            held.extend(items)
            return
        try:
            pending = self._ensure_thread()
        except Exception:  # pragma: no cover - starting a thread can fail only when exhausted
            log.exception("publisher: cannot start its thread; the relay sweep will re-send")
            return
        if pending is None:
            return
        items = list(items)
        left_out = len(items) - pending.put_all_nowait(items)
        if left_out:
            with self._lock:
                self.dropped += left_out
                warn, self._full_warned = not self._full_warned, True
            if warn:
                log.warning(
                    "publisher: %d wake-ups pending, dropping; the relay sweep will re-send",
                    self.max_pending,
                )

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far was sent or dropped; False on timeout."""
        deadline = time.monotonic() + timeout
        pending = self._pending
        with pending.all_tasks_done:
            while pending.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                pending.all_tasks_done.wait(remaining)
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Send what is pending (for up to ``timeout``), stop the thread, close the connection."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread if self._pid == os.getpid() else None
        if thread is None:
            return
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        with contextlib.suppress(queue.Full):
            self._pending.put(_STOP, timeout=max(0.0, deadline - time.monotonic()))
        thread.join(max(0.0, deadline - time.monotonic()))

    def _ensure_thread(self) -> _Pending | None:
        with self._lock:
            if self._pid != os.getpid():
                # A forked child: the thread did not survive and the connection is the parent's.
                self._pid = os.getpid()
                self._pending = _Pending(maxsize=self.max_pending)
                self._thread = None
                self._connection = None
                self._producer_ = None
                self._queues, self._events = {}, None
            if self._closed:
                return None
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, args=(self._pending,), name="fleet-publisher", daemon=True
                )
                self._thread.start()
            return self._pending

    def _run(self, pending: queue.Queue[Any]) -> None:
        try:
            sent_at = float("-inf")
            while True:
                # Whatever else is waiting, or comes before LINGER_SECS have passed since the
                # last send, goes in the same broker round trip.
                batch = take_batch(
                    pending,
                    lambda: sent_at + LINGER_SECS,  # noqa: B023 - read at once
                    MAX_BATCH,
                    lambda item: item is not _STOP,
                )
                sent_at = time.monotonic()
                stop = batch[-1] is _STOP
                items = batch[:-1] if stop else batch
                try:
                    if items:
                        self._send(items)
                finally:
                    for _ in batch:
                        pending.task_done()
                if stop:
                    return
        finally:
            self._release_connection()
            # Anything left after close() was never sent.
            while True:
                try:
                    pending.get_nowait()
                except queue.Empty:
                    break
                with self._lock:
                    self.dropped += 1
                pending.task_done()

    def _send(self, items: list[Publish | Message]) -> None:
        """Send ``items`` on one producer, batched into one round trip where the transport can
        (Redis: one pipeline for the messages and their task-sent events)."""
        if time.monotonic() < self._down_until:
            self._count(dropped=len(items))
            return
        sent = refused = 0  # items (a message stands for `count` wake-ups)
        messages = coalesce(items)
        done = 0  # messages
        try:
            producer = self._producer()
            with producer.batch():
                for message, count in messages:
                    try:
                        self._send_one(producer, message, count)
                    except Exception as exc:
                        if not self._is_channel_error(exc):
                            raise
                        # The broker answered but refused this one message (a queue name it
                        # cannot store, for instance): the next message may well go through.
                        refused += count
                        done += 1
                        self._count(dropped=count)
                        log.warning("publisher: the broker refused %s: %s", _what(message), exc)
                        continue
                    sent += count
                    done += 1
        except Exception as exc:
            # A failed batch loses what it buffered; an unbatched send kept what went out.
            kept = 0 if self._batching else sent
            self._count(sent=kept, dropped=len(items) - refused - kept)
            self._release_connection()
            self._down_until = time.monotonic() + self.cooldown_secs
            with self._lock:
                first, self._outage = not self._outage, True
            if first:
                log.warning(
                    "publisher: cannot send %s (%s); dropping messages until the broker "
                    "answers, the relay and outbox sweeps will re-send them",
                    _what(messages[done][0]) if done < len(messages) else "a batch",
                    exc,
                )
            return
        self._count(sent=sent)
        with self._lock:
            recovered, self._outage = self._outage, False
            self._full_warned = False
        if recovered:
            log.info("publisher: the broker answers again")

    def _send_one(self, producer: Any, item: Publish | Message, count: int = 1) -> None:
        if isinstance(item, Message):
            name, task, args, kwargs, expires = (
                item.queue,
                item.task,
                list(item.args),
                item.kwargs,
                item.expires,
            )
        else:
            name, task, args, kwargs, expires = (
                queue_name(item),
                DISPATCH_TASK,
                [item.task_id],
                {"count": count} if count > 1 else {},
                None,
            )
        self._messages.send(producer, self._queue(name, producer), task, args, kwargs, expires)

    def _queue(self, name: str, producer: Any) -> Queue:
        """The wake-up queue ``name`` bound to the producer's channel. kombu binds a copy of
        an unbound entity on every publish (to check whether it was declared already, which
        it remembers per connection); bound once here, it is not copied again."""
        queue = self._queues.get(name)
        if queue is None:
            if len(self._queues) >= MAX_BOUND_QUEUES:
                self._queues.clear()
            queue = self._queues[name] = wake_queue(name)(producer.channel)
        return queue

    def _producer(self) -> Any:
        """The producer on this thread's broker connection (made on first use)."""
        if self._connection is None:
            # max_retries=0: fail at the first refused connect instead of retrying for
            # broker_connection_timeout; the relay is the retry. No retry_on_timeout either
            # (kombu batches publishes only where a pipeline is never replayed).
            self._connection = self.app.connection_for_write(
                transport_options={"max_retries": 0, "retry_on_timeout": False}
            )
            self._producer_ = self.app.amqp.Producer(self._connection, auto_declare=False)
            self._batching = bool(self._producer_.supports_batch_publish)
            # The task-sent events, as Celery's own dispatcher for send_task sends them (not
            # enabled: it publishes through our producer), its exchange bound like the queues.
            self._events = self.app.events.Dispatcher(self._connection, enabled=False)
            self._events.exchange = self._events.exchange(self._producer_.channel)
            self._messages = TaskMessages(self.app, self._events)
        return self._producer_

    def _count(self, *, sent: int = 0, dropped: int = 0) -> None:
        with self._lock:
            self.sent += sent
            self.dropped += dropped

    def _is_channel_error(self, exc: Exception) -> bool:
        # kombu re-raises transport errors as OperationalError; the original is the cause.
        errors = tuple(getattr(self._connection, "channel_errors", ()))
        return bool(errors) and isinstance(exc.__cause__ or exc, errors)

    def _release_connection(self) -> None:
        connection, self._connection = self._connection, None
        self._producer_ = None
        self._queues, self._events = {}, None
        if connection is None:
            return
        try:
            connection.release()
        except Exception:  # a broken connection may fail to close; it is dropped either way
            log.debug("publisher: error closing the broker connection", exc_info=True)


def coalesce(items: list[Publish | Message]) -> list[tuple[Publish | Message, int]]:
    """The messages that send ``items``, each with how many items it stands for: the
    wake-ups for one queue become their first one counted as many (in the order each queue
    first appears); other messages go one for one."""
    messages: list[tuple[Publish | Message, int]] = []
    at: dict[str, int] = {}  # queue -> index in messages of its wake-up
    for item in items:
        if isinstance(item, Message):
            messages.append((item, 1))
            continue
        name = queue_name(item)
        index = at.get(name)
        if index is None:
            at[name] = len(messages)
            messages.append((item, 1))
        else:
            first, count = messages[index]
            messages[index] = (first, count + 1)
    return messages


def _what(item: Publish | Message) -> str:
    if isinstance(item, Message):
        return f"{item.task}{list(item.args)}"
    return f"the wake-up of {item.task_id}"
