"""Durable file-system steps shared by the store, compaction and the batch state: a rename or a new file survives a
power cut only once its folder's entry is synced too."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync a folder (after a rename or create in it); some filesystems cannot open a folder: then it is skipped,
    and the rename is still atomic, only not yet durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
