"""The render process: ``python -m qwenvl_batch.media.render_worker``, driven by :mod:`.pages` over its stdin/stdout.

A plain child process rather than ``multiprocessing``: a spawned ``multiprocessing`` worker re-imports the
parent's ``__main__``, which fails when the job is started from stdin and would re-run an unguarded user script.
Protocol, one request at a time: 4-byte big-endian length + pickled ``render_page`` arguments in; 4-byte length
+ pickled ``(True, bytes)`` or ``(False, message)`` out. The parent is the only writer (pickle is safe here). When
the parent dies, even by kill -9, stdin reaches end of file and this process exits: no orphan renders on.
"""

from __future__ import annotations

import pickle
import sys
from typing import BinaryIO


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """Answer render requests until end of input."""
    from .pages import render_page

    while True:
        header = requests.read(4)
        if len(header) < 4:
            return
        args = pickle.loads(requests.read(int.from_bytes(header, "big")))
        try:
            reply: tuple[bool, object] = (True, render_page(*args))
        except Exception as exc:  # noqa: BLE001  (any failure is the page's: reported to its row, and we serve on)
            reply = (False, f"{type(exc).__name__}: {exc}")
        payload = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        replies.write(len(payload).to_bytes(4, "big") + payload)
        replies.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
