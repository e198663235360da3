"""Preparing and probing images: any source → the ``image_url`` part of a request, or header facts.

Two entry points with different costs:

* :func:`prepare_image` reads the image once (a file, bytes from the manifest, a tar member: see
  :mod:`.sources`), validates it from memory and base64-encodes the same bytes (or, with a
  :class:`ResizePolicy`, a shrunk and upright re-encoding of them). It is called from worker threads, keeps no
  state and leaves no file handle open. http(s) URLs and data URLs are passed through (after the checks a data
  URL allows).
* :func:`probe_image` reads only the header (size, format): fast enough for a cost estimate over 10^5 images.
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass, field
from typing import IO

from PIL import Image

from ..errors import InputRowError
from .refs import ImageRef
from .rules import (
    _LARGE_OK_FORMATS,
    _SHORTEST_PREFIX,
    JPEG_HEADER_BYTES,
    MAX_READ_BYTES,
    SIDES_4K,
    SIDES_8K,
    _accepted_mime,
    _check_decodes,
    _check_dimensions,
    _check_encoded_size,
    _check_large_format,
    _check_sides,
    _decoded_image_size,
    _decoded_length,
    _exceeds,
    _input_error,
    _open_image,
    _too_large_to_read,
    _unreadable,
    _validate_data_url,
)
from .transcode import ResizePolicy, _Encoded, _Plan, _plan, _render

logger = logging.getLogger(__name__)


class Base64URL(str):
    """A data URL built here: ``data:<accepted mime>;base64,`` and the base64 alphabet, nothing else.

    A plain ``str`` everywhere; its type tells the request encoder (request_body.py) that it needs no JSON
    escaping, which saves scanning megabytes of base64 per request.
    """

    __slots__ = ()


@dataclass(frozen=True)
class PreparedImage:
    """What goes into one ``{"type": "image_url", "image_url": {"url": ...}}`` part, plus what we learnt."""

    url: str
    mime: str | None
    width: int | None
    """None for http(s) URLs (they are not fetched) and for data URLs whose content Pillow cannot read."""
    height: int | None
    sent_bytes: int
    """``len(url)``: what this image adds to the request body."""
    notes: tuple[str, ...] = field(default=())
    """Things the user should know but that do not stop the row (animated GIF, above 8K)."""
    original_size: tuple[int, int] | None = None
    """(width, height) before client-side resizing (after EXIF orientation); None when not resized.

    ``width`` and ``height`` are always what is sent, so token estimates made from them are right either way.
    """


@dataclass(frozen=True)
class ImageInfo:
    """Header facts about an image, enough for a token and cost estimate."""

    width: int
    height: int
    mime: str
    file_bytes: int



def prepare_image(ref: ImageRef, resize: ResizePolicy | None = None) -> PreparedImage:
    """Read, validate and encode one image; raise :class:`InputRowError` if the provider could not use it.

    With an enabled ``resize`` policy, a local file the provider would shrink is sent already shrunk to the
    provider's size, and a file with an EXIF orientation is sent upright (see :func:`_prepare_file`). URLs and
    data URLs are never changed. Thread-safe: the file is read in one call that closes it, then everything
    works on the in-memory bytes.
    """
    if ref.kind == "url":
        return PreparedImage(url=ref.value, mime=None, width=None, height=None, sent_bytes=len(ref.value))
    if ref.kind == "data":
        return _prepare_data_url(ref)
    return _prepare_bytes(ref, resize if resize is not None and resize.enabled else None)


def _prepare_bytes(ref: ImageRef, resize: ResizePolicy | None) -> PreparedImage:
    """A file, manifest bytes or tar member → base64 data URL, after the cheap decode that catches truncation.

    Without a policy the file's own bytes are sent. With one, the file is re-encoded when it must be turned
    upright or the provider would shrink it (:class:`_Plan`), and the checks split into two groups: those
    about the *file* (readable, an accepted format, not truncated, sides and aspect ratio) apply to the
    original, those about the *upload* (10 MB data URL, JPEG/PNG only above 4K) apply to what is sent. So a
    12 MB scan that shrinks to 1 MB is accepted, and a truncated scan is still refused.
    """
    size = _source_size(ref)
    if resize is None:  # the upload will be the bytes themselves: refuse them before reading them
        _check_encoded_size(ref, size, _SHORTEST_PREFIX)
    if size > MAX_READ_BYTES:  # stat first: a 64 GB file is refused without reading a byte of it
        raise _too_large_to_read(ref, size)
    data = _read_bytes(ref)
    _check_jpeg_header(ref, data)
    with _open_image(ref, io.BytesIO(data), head=data[:64]) as im:
        image_format = im.format or "?"
        mime = _accepted_mime(ref, image_format)
        width, height = im.size
        _check_sides(ref, width, height)
        original = _Encoded(data=data, mime=mime, width=width, height=height)
        plan = _plan(ref, im, data, resize) if resize is not None else None
        if plan is None:  # the file itself is the upload
            _check_large_format(ref, width, height, image_format)
            _check_decodes(ref, im, image_format)
            sent = original
        else:
            sent = _render(ref, im, data, plan)  # decodes every byte: the truncation check
            if _original_is_smaller(plan, sent, data, image_format):
                sent = original
        notes = _notes(ref, im, sent.width, sent.height)
    prefix = f"data:{sent.mime};base64,"
    _check_encoded_size(ref, len(sent.data), prefix)
    url = Base64URL(prefix + base64.b64encode(sent.data).decode("ascii"))
    return PreparedImage(
        url=url,
        mime=sent.mime,
        width=sent.width,
        height=sent.height,
        sent_bytes=len(url),
        notes=notes,
        original_size=sent.original_size,
    )


def _prepare_data_url(ref: ImageRef) -> PreparedImage:
    """Pass a data URL through after the checks the provider makes; read its size if Pillow can."""
    mime, payload = _validate_data_url(ref)
    width = height = None
    header = _decoded_image_size(ref, payload)
    if header is not None:
        width, height = header
        _check_dimensions(ref, width, height, None)
    return PreparedImage(url=ref.value, mime=mime, width=width, height=height, sent_bytes=len(ref.value))




def _notes(ref: ImageRef, im: Image.Image, width: int, height: int) -> tuple[str, ...]:
    """Warnings that do not stop the row; also logged, since a user reads logs before output columns."""
    notes: list[str] = []
    if im.format == "GIF" and getattr(im, "is_animated", False):
        notes.append("animated GIF: the model reads only the first frame")
    if _exceeds(width, height, SIDES_8K):
        notes.append(f"{width}×{height} is above 8K: the provider downscales it and large uploads may time out")
    for note in notes:
        logger.warning("column %r, image %s: %s", ref.column, ref.describe(), note)
    return tuple(notes)



def probe_image(ref: ImageRef, resize: ResizePolicy | None = None) -> ImageInfo | None:
    """Header facts for a cost estimate, without decoding or encoding; ``None`` when they cannot be known.

    Returns ``None`` for http(s) URLs (not fetched) and for data URLs whose content Pillow cannot identify.
    Raises :class:`InputRowError` for what the header already shows to be unusable: a missing, empty or
    non-image file, an unaccepted format, sides under 10 px, aspect ratio over 200, or a file too big to
    send inline (unless ``resize`` will shrink it, as the runner would). Truncation is not detected here;
    :func:`prepare_image` does that.
    """
    if ref.kind == "url":
        return None
    if ref.kind == "data":
        return _probe_data_url(ref)
    if ref.kind == "page":  # a document page: its rendered size is known from the page size (issue 12)
        return ImageInfo(width=ref.source.width, height=ref.source.height,  # type: ignore[attr-defined]
                         mime="image/png", file_bytes=ref.source.size())
    size = _source_size(ref)
    if size > MAX_READ_BYTES:  # the run would refuse it unread: so does the estimate
        raise _too_large_to_read(ref, size)
    try:
        with _head(ref) as handle:
            head = handle.read(64)
            handle.seek(0)
            if head.startswith(_JPEG_SOI):  # read the header from a bounded copy (see _check_jpeg_header)
                prefix = handle.read(JPEG_HEADER_BYTES + 1)
                _check_jpeg_header(ref, prefix)
                handle = io.BytesIO(prefix[:JPEG_HEADER_BYTES])
            with _open_image(ref, handle, head=head) as im:
                image_format = im.format or "?"
                width, height = im.size
    except OSError as exc:
        raise _unreadable(ref, exc) from exc
    mime = _accepted_mime(ref, image_format)
    if resize is not None and resize.enabled and resize.target_size(width, height) is not None:
        _check_sides(ref, width, height)  # it will be re-encoded smaller: size and 4K-format limits apply to that
    else:
        _check_dimensions(ref, width, height, image_format)
        _check_encoded_size(ref, size, f"data:{mime};base64,")
    return ImageInfo(width=width, height=height, mime=mime, file_bytes=size)


def _probe_data_url(ref: ImageRef) -> ImageInfo | None:
    """A data URL's facts come from its decoded payload's header."""
    mime, payload = _validate_data_url(ref)
    header = _decoded_image_size(ref, payload)
    if header is None:
        return None
    width, height = header
    _check_dimensions(ref, width, height, None)
    return ImageInfo(width=width, height=height, mime=mime, file_bytes=_decoded_length(payload))


# ---------------------------------------------------------------------------------------------- reading


def _source_size(ref: ImageRef) -> int:
    """The image's size in bytes, turning "missing", "a folder" and "empty" into messages with a fix."""
    try:
        size = ref.source.size()
    except FileNotFoundError as exc:
        raise _input_error(
            ref,
            "file not found",
            "correct the path in the manifest (relative paths resolve against the manifest's folder) or add the file",
            code="file_not_found",
        ) from exc
    except IsADirectoryError as exc:
        raise _input_error(
            ref, "this is not a regular file (a folder?)", "point the cell at an image file", code="not_a_file"
        ) from exc
    except OSError as exc:
        raise _unreadable(ref, exc) from exc
    except ValueError as exc:  # a path the OS cannot take (refs.py refuses NUL bytes; this is the last guard)
        raise _input_error(ref, f"the path cannot be used ({exc})", "correct the path in the manifest",
                           code="bad_path") from exc
    if size == 0:
        raise _input_error(ref, "the image is empty (0 bytes)", "re-export or re-download the image", code="empty_file")
    return size


_JPEG_SOI = b"\xff\xd8"


def _check_jpeg_header(ref: ImageRef, data: bytes) -> None:
    """A JPEG must show its frame header within ``JPEG_HEADER_BYTES``: identify it from that bounded prefix first.

    Pillow scans JPEG marker segments one by one in Python; a JPEG start followed by a gigabyte of tiny junk
    segments kept a worker busy for minutes. When the prefix identifies, the full open stops at the same place.
    """
    if not data.startswith(_JPEG_SOI) or len(data) <= JPEG_HEADER_BYTES:
        return
    try:
        with _open_image(ref, io.BytesIO(data[:JPEG_HEADER_BYTES]), head=data[:64]):
            return
    except InputRowError as exc:
        raise _input_error(
            ref,
            f"no JPEG frame header within its first {JPEG_HEADER_BYTES // 2**20} MB (junk or a damaged file)",
            "re-export or re-download the file, or remove the row",
            code="corrupt_image",
        ) from exc


def _read_bytes(ref: ImageRef) -> bytes:
    """The bytes in one call, which opens and closes what it reads, never more than ``MAX_READ_BYTES + 1``
    of them (a file that grew after its size was checked is refused, not read whole); empty is still empty."""
    try:
        data = ref.source.read_at_most(MAX_READ_BYTES)
    except OSError as exc:
        raise _unreadable(ref, exc) from exc
    if len(data) > MAX_READ_BYTES:
        raise _too_large_to_read(ref, len(data))
    if not data:
        raise _input_error(ref, "the image is empty (0 bytes)", "re-export or re-download the image", code="empty_file")
    return data


def _head(ref: ImageRef) -> IO[bytes]:
    """A stream at the image's first byte, for header reads."""
    return ref.source.head()


def _original_is_smaller(plan: _Plan, sent: _Encoded, data: bytes, image_format: str) -> bool:
    """Send the file itself when re-encoding only made it bigger and nothing else required it.

    Happens when the provider would shrink only a little (rounding to a multiple of ``factor``) and the file
    was compressed harder than ``jpeg_quality``. The tokens are the same either way (the provider resizes the
    original to the same size), so the bytes decide. Never when the image had to be turned upright, or when
    the file's format is not accepted at its size (the re-encoding is what makes it acceptable).
    """
    if plan.orientation != 1 or len(sent.data) < len(data):
        return False
    width, height = plan.oriented_size
    return image_format in _LARGE_OK_FORMATS or not _exceeds(width, height, SIDES_4K)

