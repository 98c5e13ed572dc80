"""CPU per message of the publisher's sending thread, in isolation (no API, no database).

Sends ``--messages`` messages through ``Publisher._send`` (what the publisher's thread runs for
each batch) on a Redis broker, in batches of ``--batch``: half wake-ups, half write-back syncs,
the mix a webhook delivery publishes, each with its Celery ``task-sent`` event. Prints the
process's CPU time per message and the Python function calls per message (cProfile, over a
second, smaller pass), which do not move with the machine's load.

Run: ``.venv/bin/python ops/bench/publisher.py``; to compare with another checkout, run it
with ``PYTHONPATH=<checkout>``. The queues it fills are emptied at the end.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
import uuid

import redis

import fleet_worker
from fleet_common.settings import load_settings
from fleet_common.sweeps import Publish
from fleet_worker.celery_app import make_celery
from fleet_worker.publisher import Message, Publisher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=4, help="messages per broker round trip")
    args = parser.parse_args()
    own = uuid.uuid4().hex[:8]
    wake_key, sync_queue = f"bench{own}", f"fleet.bench-sync.{own}"
    settings = load_settings(
        env={
            "FLEET_ORCHESTRATOR_STATE_DIR": tempfile.mkdtemp(prefix="fleet-bench-pub-"),
            "FLEET_BROKER_URL": args.broker_url,
        }
    )
    publisher = Publisher(make_celery(settings))

    def batch(n: int) -> list[Publish | Message]:
        items: list[Publish | Message] = []
        for k in range(max(1, args.batch // 2)):
            task_id = f"tsk_{n}_{k}"
            items += [
                Publish(task_id, wake_key, None),
                Message("fleet.forgejo.sync", sync_queue, (task_id,)),
            ]
        return items

    batches = [batch(n) for n in range(max(2, args.messages // args.batch))]
    try:
        publisher._send(batches[0])  # connects, binds the queues
        sent = publisher.sent
        started, cpu = os.times(), time.process_time()
        for items in batches[1:]:
            publisher._send(items)
        cpu, ended = time.process_time() - cpu, os.times()
        count = publisher.sent - sent
        profile = cProfile.Profile()
        profiled = batches[1 : 1 + max(1, 1000 // args.batch)]
        profile.runcall(lambda: [publisher._send(items) for items in profiled])
        calls = pstats.Stats(profile).total_calls / sum(len(items) for items in profiled)  # type: ignore[attr-defined]
        print(f"publisher CPU per message ({fleet_worker.__file__})")
        print(
            f"  {count} messages in batches of {len(batches[0])}: "
            f"{cpu / count * 1e6:.1f} us CPU each "
            f"(user {(ended.user - started.user) / count * 1e6:.1f}, "
            f"system {(ended.system - started.system) / count * 1e6:.1f}); "
            f"{calls:.0f} Python calls each; dropped {publisher.dropped}"
        )
    finally:
        publisher.close()
        redis.Redis.from_url(args.broker_url).delete(f"fleet.cap.{wake_key}", sync_queue)


if __name__ == "__main__":
    main()
