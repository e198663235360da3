"""Where an image's bytes come from: the one interface every input source implements.

A reference in a manifest cell is classified (:mod:`.refs`) into an :class:`ImageSource`. Everything after that
(the provider's acceptance rules, MIME sniffing from the content, resizing, token estimates, ``estimate``'s
header probe, redaction) works on the source and does not care whether the bytes live in a local file, in the
manifest itself (Hugging Face ``struct<bytes, path>`` or img2dataset's ``jpg`` column), in a tar member
(WebDataset shards), or are not ours to read at all (an http(s) URL the provider fetches, a data URL sent as
written). A new kind of input (a PDF page, a video frame) is one new class here plus the cell shape that names
it, not edits across the pipeline.

Readable sources are read in one call that opens and closes what it reads, so they are safe to use from worker
threads and never leave a handle open. They raise ``OSError`` (``FileNotFoundError`` for a missing file); the
caller turns that into a row's input error with the reference in the message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import IO


class ImageSource(ABC):
    """One image's origin. ``pass_through`` sources are sent as written; the others have bytes to read."""

    pass_through: bool = False

    @abstractmethod
    def size(self) -> int:
        """Bytes the image takes, without reading them (a stat, a length): used for memory budgets and limits."""

    @abstractmethod
    def read(self) -> bytes:
        """All of the image's bytes, in one call."""

    def head(self) -> IO[bytes]:
        """A binary stream positioned at the start, for a header read (Pillow reads only what it needs)."""
        return io.BytesIO(self.read())

    def read_at_most(self, limit: int) -> bytes:
        """The image's bytes, but never more than ``limit + 1`` of them held in memory: a caller that gets more
        than ``limit`` knows the image is over its cap (a file that grew after its size was checked)."""
        return self.read()

    @abstractmethod
    def digest(self) -> str:
        """A content identity for fingerprints: editing the image changes it."""


@dataclass(frozen=True)
class LocalFile(ImageSource):
    """A file on this machine, sent inline as a base64 data URL (the endpoint cannot read our disk)."""

    path: Path

    def size(self) -> int:
        stat = self.path.stat()
        if not self.path.is_file():
            raise IsADirectoryError(21, "not a regular file", str(self.path))
        return stat.st_size

    def read(self) -> bytes:
        return self.path.read_bytes()

    def read_at_most(self, limit: int) -> bytes:
        with self.path.open("rb") as handle:
            return handle.read(limit + 1)

    def head(self) -> IO[bytes]:
        return self.path.open("rb")

    def digest(self) -> str:
        """Files are fingerprinted by the path as written (see ImageRef.identity), not by content."""
        return str(self.path)


@dataclass(frozen=True, eq=False)
class InlineBytes(ImageSource):
    """Bytes carried in the manifest itself (a Parquet ``binary`` cell, or ``bytes`` of an HF image struct)."""

    data: bytes = field(repr=False)

    def size(self) -> int:
        return len(self.data)

    def read(self) -> bytes:
        return self.data

    @cached_property
    def _sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def digest(self) -> str:
        return self._sha256


@dataclass(frozen=True)
class TarMember(ImageSource):
    """One member of an uncompressed tar (a WebDataset shard), read by offset when needed.

    The reader that listed the shard hashed the member as it streamed past (``sha256``), so the row's
    fingerprint follows the member's content; a read that finds other bytes (the shard was rewritten since)
    or fewer bytes (truncated) is refused rather than sending something other than what was planned.
    """

    tar: Path
    offset: int
    length: int
    sha256: str

    def size(self) -> int:
        return self.length

    def read(self) -> bytes:
        with self.tar.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read(self.length)
        if len(data) != self.length:
            raise OSError(f"{self.tar} ends inside this member ({len(data):,} of {self.length:,} bytes): truncated")
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise OSError(f"{self.tar} changed since it was listed (this member's bytes differ); run again")
        return data

    def head(self) -> IO[bytes]:
        with self.tar.open("rb") as handle:
            handle.seek(self.offset)
            return io.BytesIO(handle.read(min(self.length, 1 << 16)))

    def digest(self) -> str:
        return self.sha256


@dataclass(frozen=True)
class DataUrl(ImageSource):
    """A ``data:`` URL from the manifest: sent as written, its bytes decoded only to read the header."""

    url: str
    pass_through = True

    def size(self) -> int:
        payload = self.url.partition(",")[2].rstrip("=")
        return len(payload) * 3 // 4

    def read(self) -> bytes:
        try:
            return base64.b64decode(self.url.partition(",")[2])
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"the base64 data is malformed ({exc})") from exc

    def digest(self) -> str:
        return hashlib.sha256(self.url.partition(",")[2].encode("ascii", "replace")).hexdigest()


@dataclass(frozen=True)
class RemoteUrl(ImageSource):
    """An http(s) URL: the provider fetches it; we never do (its size is unknown until the answer's usage)."""

    url: str
    pass_through = True

    def size(self) -> int:
        return len(self.url)

    def read(self) -> bytes:
        raise OSError("remote URLs are passed to the provider, not fetched here")

    def digest(self) -> str:
        return self.url
