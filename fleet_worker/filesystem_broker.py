"""kombu's ``filesystem://`` transport, with messages that appear in the queue folder whole.

kombu's producer creates the message file in the queue folder and then writes it; a consumer
in another process may take the file in between (its ``_get`` renames and reads without the
producer's lock) and read it empty or half written. kombu then raises a JSON error inside the
consumer loop, which Celery treats as unrecoverable: the worker or ``fleet beat`` stops, and the
message is lost. Here a message is written under a name no consumer reads and renamed into
place, atomically, once complete.

kombu's exchange tables (the bindings, one file per exchange under the control folder) have
the same flaw: a binder creates or rewrites the file in place and locks it only once opened,
so a publisher reading it meanwhile finds it empty ("JSONDecodeError" from ``publish``) and two
first binders can overwrite each other. Here a table changes under an exclusive lock on a file
beside it and is replaced atomically; readers read it whole without a lock. And kombu records a
binding in its process-wide state before it writes the file, and a bind that finds it in that
state writes nothing: another connection of the same process could publish before the file
held the binding, and its messages went nowhere, silently. Here every bind makes sure the file
holds it.

kombu's consumer also lists (and sorts) the whole queue folder once per queue it consumes, on
every poll; a worker consumes a queue per requirement key it serves. Here one listing serves
every queue of a poll cycle (it is reused for at most ``LISTING_MAX_AGE_SECS``), which makes a
short polling interval cheap.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

#: ``broker_transport`` for ``filesystem://`` URLs (kombu takes it over the URL's scheme).
TRANSPORT = "fleet_worker.filesystem_broker:Transport"
#: Suffix of a message still being written: consumers match ``<stamp>_<uuid>.<queue>.msg`` only.
PARTIAL_SUFFIX = ".part"
#: A folder listing is reused this long: across the queues of one poll cycle, not across polls
#: (the polling interval is longer). A message written meanwhile is seen at the next listing.
LISTING_MAX_AGE_SECS = 0.005


class Channel(filesystem.Channel):
    _listing: list[str] | None = None
    _listed_at = 0.0

    def _messages(self) -> list[str]:
        """The queue folder's message files, oldest first (names start with a timestamp)."""
        now = monotonic()
        if self._listing is None or now - self._listed_at >= LISTING_MAX_AGE_SECS:
            names = os.listdir(self.data_folder_in)
            self._listing = sorted(name for name in names if name.endswith(".msg"))
            self._listed_at = now
        return self._listing

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        """The next message on ``queue``: taken by renaming it into the processed folder (or
        the temp dir), so two consumers never both take it; Empty if there is none."""
        wanted = f"{queue}.msg"
        listing = self._messages()
        for name in [name for name in listing if name.partition(".")[2] == wanted]:
            listing.remove(name)
            folder = self.processed_folder if self.store_processed else tempfile.gettempdir()
            try:
                shutil.move(os.path.join(self.data_folder_in, name), folder)
            except OSError:
                continue  # taken by another consumer meanwhile
            path = os.path.join(folder, name)
            try:
                with open(path, "rb") as handle:
                    payload = handle.read()
                if not self.store_processed:
                    os.remove(path)
            except OSError as exc:
                raise ChannelError(f"Cannot read file {path!r} from queue.") from exc
            return loads(bytes_to_str(payload))
        raise Empty()

    # The signature of kombu's filesystem Channel, which itself differs from its base's.
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Put ``payload`` onto ``queue``: written aside, then renamed into the queue folder."""
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        try:
            _write_whole(final, dumps(payload))
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def get_table(self, exchange: Any) -> list[Any]:
        """The exchange's bindings (a file only ever replaced whole: read without a lock)."""
        file = self._exchange_file(exchange)
        try:
            table = loads(bytes_to_str(file.read_bytes()))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ChannelError(f"Cannot open {file}") from exc
        return [filesystem.exchange_queue_t(*entry) for entry in table]

    def queue_bind(
        self,
        queue: Any,
        exchange: Any = None,
        routing_key: Any = "",
        arguments: Any = None,
        **kw: Any,
    ) -> None:
        super().queue_bind(queue, exchange, routing_key, arguments, **kw)
        exchange = exchange or "amq.direct"  # kombu's default, as in the call above
        meta = self.typeof(exchange).prepare_bind(queue, exchange, routing_key, arguments)
        self._queue_bind(exchange, *meta)  # a no-op once the file holds it

    def _queue_bind(self, exchange: Any, routing_key: Any, pattern: Any, queue: Any) -> None:
        entry = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        self._change_table(exchange, lambda table: table if entry in table else [entry, *table])

    def _delete(
        self, queue: Any, exchange: Any, routing_key: Any, pattern: Any, *args: Any, **kw: Any
    ) -> None:
        # The virtual transport's delete, then the table's change (not kombu's in-place one).
        virtual = super(filesystem.Channel, self)
        virtual._delete(queue, exchange, routing_key, pattern, *args, **kw)  # type: ignore[attr-defined]
        entry = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        self._change_table(exchange, lambda table: [e for e in table if e != entry])

    def _change_table(self, exchange: Any, change: Callable[[list[Any]], list[Any]]) -> None:
        """Read, change and replace the exchange's table under an exclusive lock on
        ``<exchange>.exchange.lock`` (one writer at a time; readers never wait)."""
        file: Path = self._exchange_file(exchange)
        try:
            self.control_folder.mkdir(exist_ok=True)
            with open(file.with_name(f"{file.name}.lock"), "a") as guard:
                filesystem.lock(guard, filesystem.LOCK_EX)
                try:
                    table = self.get_table(exchange)
                    changed = change(table)
                    if changed != table:
                        _write_whole(str(file), dumps(changed))
                finally:
                    filesystem.unlock(guard)
        except OSError as exc:
            raise ChannelError(f"Cannot open {file}") from exc


def _write_whole(path: str, text: str) -> None:
    """Write ``path`` aside and rename it into place: a reader sees all of it or none."""
    partial = f"{path}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}"
    try:
        with open(partial, "wb") as handle:
            handle.write(str_to_bytes(text))
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


class Transport(filesystem.Transport):
    Channel = Channel
