"""kombu's ``filesystem://`` transport, with messages that appear in the queue folder whole.

kombu's producer creates the message file in the queue folder and then writes it; a consumer
in another process may take the file in between (its ``_get`` renames and reads without the
producer's lock) and read it empty or half written. kombu then raises a JSON error inside the
consumer loop, which Celery treats as unrecoverable: the worker or ``fleet beat`` stops, and the
message is lost. Here a message is written under a name no consumer reads and renamed into
place, atomically, once complete.

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
        partial = final + PARTIAL_SUFFIX
        try:
            with open(partial, "wb") as handle:
                handle.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel
