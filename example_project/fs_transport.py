"""kombu's filesystem transport, writing each message atomically: ``filesystem-atomic://``.

Stock ``filesystem://`` (kombu 5.7) creates a message file and then writes it, while consumers
pick up any ``*.msg`` file without taking its lock. A consumer that lists the folder in between
reads an empty file and the worker dies with ``Unrecoverable error: JSONDecodeError`` (kombu issue
#1551). The demo hit this in 2 runs out of 5. This subclass changes only the writer: the message
is written under a name consumers skip and then renamed into place (``os.replace`` is atomic), so
a consumer sees either no file or the whole message. File names keep kombu's layout
(``<ms>_<id>.<queue>.msg``) with the sub-millisecond time at the front of ``<id>``, so messages
are read in the order they were sent, not in random order within one millisecond.

Importing this module registers the ``filesystem-atomic`` alias with kombu; every transport
option of ``filesystem://`` (``data_folder_in``, ``data_folder_out``, ``control_folder``,
``polling_interval``, ...) works the same.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

ALIAS = "filesystem-atomic"


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        """Put ``payload`` onto ``queue``: write a temporary file, then rename it into place."""
        now = time.monotonic_ns()
        name = f"{now // 1_000_000}_{now % 1_000_000:06d}-{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + ".tmp"  # "<ms>_<id>.<queue>.msg.tmp" is no message of <queue>
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            try:
                os.unlink(partial)
            except OSError:
                pass
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel
    driver_name = ALIAS


TRANSPORT_ALIASES.setdefault(ALIAS, f"{__name__}:Transport")
