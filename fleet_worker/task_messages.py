"""Celery task messages and their ``task-sent`` events, built and published without
``send_task``'s per-call work (the publisher's hot path)."""

from __future__ import annotations

from typing import Any

from celery import signals
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr
from kombu import Queue
from kombu.utils.uuid import uuid

#: Execution options of a registered task that send_task would route or flag the message by.
_ROUTING_OPTIONS = frozenset(
    {"queue", "routing_key", "exchange", "priority", "immediate", "mandatory"}
)


class TaskMessages:
    """Sends task messages and their ``task-sent`` events on one connection: the message and
    event ``app.send_task(name, args, kwargs, queue=queue, retry=False, ignore_result=True)``
    sends outside a task, published with the same kombu producer calls, without send_task's
    per-call work (routing, option and retry-policy merging, the connection pool, the result
    object, a dozen configuration look-ups).

    The message is Celery's protocol 2 as ``app.amqp.as_task_v2`` builds it; a message without
    ``expires`` (every wake-up, a request's write-back sync) is a copy of a header template made
    by as_task_v2 once per task name, with the per-message fields filled in. As send_task does,
    a task registered in this process lends its execution options (the time limits,
    ``expires``, the serializer). ``origin`` and ``reply_to`` are what send_task would compute
    for each message: this process's node name, the oid of the thread that makes this object
    (the publisher's thread, which sends).
    """

    def __init__(self, app: Any, events: Any) -> None:
        conf = app.conf
        self.app = app
        self.events = events
        self.origin = anon_nodename()
        self.reply_to = app.thread_oid
        self.sent_event = bool(conf.task_send_sent_event)
        self.serializer = conf.task_serializer
        self.compression = conf.task_compression
        self.delivery_mode = conf.task_default_delivery_mode
        self.repr_maxlevels = conf.task_repr_maxlevels
        self._templates: dict[tuple[Any, ...], tuple[dict[str, Any], dict[str, Any] | None]] = {}

    def send(
        self,
        producer: Any,
        queue: Queue,
        name: str,
        args: list[Any],
        kwargs: dict[str, Any],
        expires: float | None = None,
    ) -> None:
        """Publish task ``name`` on ``queue`` (a direct queue on the default exchange, bound
        to the producer's channel), then its task-sent event, in the producer's batch."""
        options = _exec_options(self.app, name)
        if not expires:
            expires = options.get("expires")
        task_id = uuid()
        if expires is None:
            headers, properties, body, sent_event = self._from_template(
                name, options, task_id, args, kwargs
            )
        else:
            headers, properties, body, sent_event = self.app.amqp.as_task_v2(
                task_id,
                name,
                args,
                kwargs,
                expires=expires,
                reply_to=self.reply_to,
                time_limit=options.get("time_limit"),
                soft_time_limit=options.get("soft_time_limit"),
                create_sent_event=self.sent_event,
                origin=self.origin,
                ignore_result=True,
            )
            properties["expiration"] = max(expires, 0)
        routing_key = queue.name
        if signals.before_task_publish.receivers:
            signals.before_task_publish.send(
                sender=name,
                body=body,
                exchange="",
                routing_key=routing_key,
                declare=[queue],
                headers=headers,
                properties=properties,
                retry_policy=dict(self.app.conf.task_publish_retry_policy),
            )
        with producer.connection._reraise_as_library_errors():
            producer.publish(
                body,
                exchange="",
                routing_key=routing_key,
                serializer=options.get("serializer") or self.serializer,
                compression=options.get("compression") or self.compression,
                delivery_mode=(
                    options.get("delivery_mode")
                    or queue.exchange.delivery_mode
                    or self.delivery_mode
                ),
                declare=[queue],
                headers=headers,
                **properties,
            )
            if signals.after_task_publish.receivers:
                signals.after_task_publish.send(
                    sender=name, body=body, headers=headers, exchange="", routing_key=routing_key
                )
            if sent_event:
                sent_event.update(
                    {"queue": routing_key, "exchange": "", "routing_key": routing_key}
                )
                self.events.publish("task-sent", sent_event, producer, retry=False)

    def _from_template(
        self,
        name: str,
        options: dict[str, Any],
        task_id: str,
        args: list[Any],
        kwargs: dict[str, Any],
    ) -> tuple[dict[str, Any], dict[str, Any], Any, dict[str, Any] | None]:
        """as_task_v2's message for a task without ``expires`` (nor eta, parent, group,
        chain, stamps): the template's headers with this message's id and argument reprs."""
        args = args or ()  # type: ignore[assignment]  # as as_task_v2 does
        limits = (options.get("time_limit"), options.get("soft_time_limit"))
        template = self._templates.get((name, *limits))
        if template is None:
            headers, _properties, _body, event = self.app.amqp.as_task_v2(
                "",
                name,
                reply_to=self.reply_to,
                time_limit=limits[0],
                soft_time_limit=limits[1],
                create_sent_event=self.sent_event,
                origin=self.origin,
                ignore_result=True,
            )
            template = self._templates[(name, *limits)] = (headers, event)
        headers_template, event_template = template
        argsrepr = saferepr(args, self.app.amqp.argsrepr_maxsize, maxlevels=self.repr_maxlevels)
        kwargsrepr = (
            _EMPTY_REPR
            if not kwargs
            else saferepr(kwargs, self.app.amqp.kwargsrepr_maxsize, maxlevels=self.repr_maxlevels)
        )
        headers = {
            **headers_template,
            "id": task_id,
            "root_id": task_id,
            "argsrepr": argsrepr,
            "kwargsrepr": kwargsrepr,
            "timelimit": list(headers_template["timelimit"]),
            "stamps": {},
        }
        properties = {"correlation_id": task_id, "reply_to": self.reply_to}
        body = (args, kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
        sent_event = (
            None
            if event_template is None
            else {
                **event_template,
                "uuid": task_id,
                "root_id": task_id,
                "args": argsrepr,
                "kwargs": kwargsrepr,
            }
        )
        return headers, properties, body, sent_event


def _exec_options(app: Any, name: str) -> dict[str, Any]:
    """The execution options send_task takes from task ``name`` when it is registered here
    (not in an API process until its app is finalized). Options that would route or flag the
    message otherwise are refused: none of Fleet's tasks sets one (the caller names the queue)."""
    task = app._tasks.get(name)
    if task is None:
        return {}
    options = {k: v for k, v in task._get_exec_options().items() if v is not None}
    unsupported = options.keys() & _ROUTING_OPTIONS
    if unsupported:
        raise ValueError(f"task {name} sets {sorted(unsupported)}: the publisher cannot honour it")
    return options


#: saferepr({}): the kwargsrepr of a message without keyword arguments.
_EMPTY_REPR = "{}"
