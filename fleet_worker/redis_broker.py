"""kombu's ``redis://`` transport, with a closed channel that fails like a lost connection.

With kombu/Celery 5.7, when a worker loses Redis while an ``acks_late`` task runs (every Fleet
attempt holds its wake-up unacknowledged), the consumer clears the connection and then closes
its channel, which tries to restore the unacknowledged message through a channel whose
connection is gone: ``AttributeError: 'NoneType' object has no attribute 'hostname'``. That is
not a connection error, so Celery calls it unrecoverable and the worker stops once its running
task ends (and the late ack of that task fails the same way after the reconnect). Here such a
channel raises a Redis ``ConnectionError`` instead, which kombu and Celery already handle: the
restore and the ack are skipped and logged, and the worker reconnects. Nothing is lost: the
message is a wake-up, and Redis restores unacknowledged ones after the visibility timeout.

kombu also builds a new ``redis.Redis`` object (a few hundred response callbacks) for every
publish and every ack; a client over a connection pool is safe to share between threads, so
a channel here keeps one per pool (a new pool, after a reconnect, gets a new client).
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis

#: ``broker_transport`` for ``redis://`` URLs (kombu takes it over the URL's scheme).
TRANSPORT = "fleet_worker.redis_broker:Transport"


class Channel(kombu_redis.Channel):
    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._shared_client
        if client is None or client.connection_pool is not self.pool:
            client = self._shared_client = super()._create_client()
        return client

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise redis.ConnectionError("this channel's broker connection was closed")
        return super()._connparams(asynchronous)


class Transport(kombu_redis.Transport):
    Channel = Channel
