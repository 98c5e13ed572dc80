"""kombu's ``filesystem://`` transport, with messages that appear in the queue folder whole.

kombu's producer creates the message file in the queue folder and then writes it; a consumer
in another process may take the file in between (its ``_get`` renames and reads without the
producer's lock) and read it empty or half written. kombu then raises a JSON error inside the
consumer loop, which Celery treats as unrecoverable: the worker or ``fleet beat`` stops, and the
message is lost. Here a message is written under a name no consumer reads and renamed into
place, atomically, once complete.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

#: ``broker_transport`` for ``filesystem://`` URLs (kombu takes it over the URL's scheme).
TRANSPORT = "fleet_worker.filesystem_broker:Transport"
#: Suffix of a message still being written: consumers match ``<stamp>_<uuid>.<queue>.msg`` only.
PARTIAL_SUFFIX = ".part"


class Channel(filesystem.Channel):
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
