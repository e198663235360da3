"""Image references in a manifest → the ``image_url`` parts of a Chat Completions request.

A manifest cell names one image or a list of them: a local path (relative paths resolve against the manifest's
folder), a ``file://`` URL, an ``http(s)`` URL or a ``data:`` URL. Remote URLs and data URLs are passed through
untouched; local files are sent inline as base64 data URLs because the OpenAI-compatible endpoint cannot read
the caller's disk (reference §2.2).

Every check that the provider would make anyway is made here first, so that a bad row costs nothing and gets a
message that says what to fix, instead of a 400 after a network round trip (reference §2.1): sides of at least
10 px, aspect ratio at most 200, an accepted format, a data URL of at most 10,485,760 characters. Files are also
decoded once, cheaply, so that a truncated or corrupt file is caught here and not by the model.

Two entry points with different costs:

* :func:`prepare_image` reads the file once, validates it from memory and base64-encodes the same bytes (or,
  with a :class:`ResizePolicy`, a shrunk and upright re-encoding of them). It is called from worker threads,
  keeps no state and leaves no file handle open.
* :func:`probe_image` reads only the header (size, format): fast enough for a cost estimate over 10^5 images.

Client-side resizing (:class:`ResizePolicy`): the provider resizes every image to its pixel budget anyway
(Qwen-VL smart resize, :mod:`qwenvl_batch.tokens`), so a 24-megapixel scan is uploaded, base64-encoded and
decoded in full only to be thrown away, and a 12 MB scan is even refused by the 10 MB data-URL limit. With a
policy, a local file the provider would shrink is shrunk here to *exactly* the provider's target size, which
the provider then leaves alone: the image tokens billed are unchanged, the bytes sent drop by about an order of
magnitude. Files are never enlarged (the provider's upscaling of small images costs nothing to upload), and
files with an EXIF orientation are sent upright. See :func:`_prepare_file` for which checks apply to what, and
:func:`_render_loaded` for the output format and why.

Messages never contain image bytes: data URLs are shown as ``data:image/png;base64 (12,345 chars)`` and
:func:`redact_data_url` strips base64 payloads from anything written to output files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Literal
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from qwenvl_batch import tokens
from qwenvl_batch.errors import InputRowError

logger = logging.getLogger(__name__)

try:  # HEIC/HEIF is accepted by the provider, but Pillow reads it only through this optional plugin.
    import pillow_heif  # type: ignore[import-not-found,unused-ignore]

    pillow_heif.register_heif_opener()
except ImportError:
    pillow_heif = None

# Load every Pillow plugin now, once, in the importing thread: Pillow registers plugins lazily on the first
# open(), and doing that from several worker threads at once is a race we do not need.
Image.init()

MAX_DATA_URL_CHARS = 10_485_760
"""The provider's limit on one base64 data URL ("Exceeded limit on max bytes per data-uri item : 10485760")."""
MIN_SIDE_PX = 10
"""Smallest accepted width or height; 9×9 is refused with a 400, 10×10 is accepted (reference §1.4, §2.1)."""
MAX_ASPECT_RATIO = 200
"""Largest accepted long side / short side (reference §1.3, §2.1)."""
SIDES_4K = (3840, 2160)
"""Above 4K (long side, short side) the provider accepts only JPEG and PNG (reference §2.1)."""
SIDES_8K = (7680, 4320)
"""Above 8K the provider may time out and downscales anyway; we send it but say so."""

# Pillow format name → the MIME type the provider accepts for it (reference §2.1). MPO is how Pillow names a
# camera JPEG with extra embedded frames: it *is* a JPEG file and every JPEG decoder reads its first image.
_ACCEPTED_FORMATS: dict[str, str] = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "WEBP": "image/webp",
    "HEIF": "image/heic",
    "GIF": "image/gif",
    "ICO": "image/x-icon",
    "JPEG2000": "image/jp2",
}
_LARGE_OK_FORMATS = frozenset({"JPEG", "MPO", "PNG"})
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})
# MIME types the provider documents for images (reference §2.1, including the URL Content-Type list); a data URL
# declaring anything else would be refused by the server.
_PROVIDER_MIMES = frozenset(
    {
        "image/jpeg",
        "image/jpg",
        "image/png",
        "image/bmp",
        "image/tiff",
        "image/webp",
        "image/heic",
        "image/heif",
        "image/gif",
        "image/x-icon",
        "image/jp2",
        "image/icns",
        "image/sgi",
    }
)
# The shortest prefix any accepted local file gets; used to refuse an oversized file before reading it.
_SHORTEST_PREFIX = "data:image/png;base64,"
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+)://")
_DATA_URL_RE = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),", re.IGNORECASE)
# A data URL anywhere in a string (also inside a JSON list), up to the end of its payload.
_DATA_URL_ANYWHERE_RE = re.compile(
    r"(?<![A-Za-z0-9_\-])data:([^;,\s\"']*)((?:;[^;,\s\"']*)*),([^\s\"',\]]*)", re.IGNORECASE
)

RefKind = Literal["path", "url", "data"]


@dataclass(frozen=True)
class ImageRef:
    """One image reference from a manifest cell, classified but not yet read."""

    kind: RefKind
    value: str
    """Exactly as written in the manifest cell (surrounding whitespace removed)."""
    column: str
    path: Path | None = None
    """The resolved absolute path when ``kind == "path"``."""

    def __post_init__(self) -> None:
        if self.kind == "path" and self.path is None:
            raise ValueError("an ImageRef of kind 'path' needs a resolved path")

    def describe(self) -> str:
        """Name the image for a message or a log line, never with image data in it."""
        if self.kind == "data":
            return f"{_data_url_header(self.value)} ({len(self.value):,} chars)"
        if self.kind == "path" and str(self.path) != self.value:
            return f"{self.value!r} (resolved: {self.path})"
        return repr(self.value)

    def identity(self) -> str:
        """A stable string for row fingerprints: the path as written, the URL, or a hash of inline data.

        The path is taken as written (not resolved) so that moving the manifest together with its images keeps
        the fingerprints, and a data URL is hashed so that fingerprints stay short.
        """
        if self.kind == "data":
            mime, _, payload = _split_data_url(self.value)
            return f"data:{mime};sha256:{hashlib.sha256(payload.encode('ascii', 'replace')).hexdigest()}"
        return self.value


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


@dataclass(frozen=True)
class ResizePolicy:
    """How local files are shrunk before sending: to exactly the size the provider would resize them to.

    ``factor``, ``min_pixels`` and ``max_pixels`` must be the bounds the provider applies to *this request* (after
    per-image overrides and high-resolution mode): with any other bounds the client-side size would differ from
    the server's and the image tokens would change. :meth:`for_model` derives them the way
    :func:`tokens.image_tokens` does, so use it rather than filling them in by hand.
    """

    factor: int
    min_pixels: int
    max_pixels: int
    enabled: bool = True
    """``resize = "auto"`` in the job file; False (``"off"``) sends every file's original bytes, as without a policy."""
    jpeg_quality: int = 90
    """Quality of the JPEG re-encoding (1..95; above 95 Pillow's own docs say the file grows for no visible gain)."""
    min_shrink: float = 1.5
    """Resize only images with at least this many times the target's pixels. Below it the saving is a few
    percent of the bytes (the provider rounding 400x300 to 416x288, say) and not worth a decode, a resample and
    a re-encode: for small images that work is most of the runner's CPU per request."""

    def __post_init__(self) -> None:
        if self.factor < 1 or not 1 <= self.min_pixels <= self.max_pixels:
            raise ValueError(
                f"ResizePolicy needs factor >= 1 and 1 <= min_pixels <= max_pixels, got factor={self.factor}, "
                f"min_pixels={self.min_pixels}, max_pixels={self.max_pixels}"
            )
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be between 1 and 95, got {self.jpeg_quality}")

    @classmethod
    def for_model(
        cls,
        model: str,
        *,
        high_resolution: bool = False,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        enabled: bool = True,
        jpeg_quality: int = 90,
        min_shrink: float = 1.5,
    ) -> ResizePolicy:
        """The policy for requests to ``model`` with the job's ``vl_high_resolution_images`` and pixel overrides."""
        spec = tokens.vision_spec(model)
        lower, upper = tokens.effective_pixel_bounds(
            spec, high_resolution=high_resolution, min_pixels=min_pixels, max_pixels=max_pixels
        )
        return cls(
            factor=spec.factor,
            min_pixels=lower,
            max_pixels=upper,
            enabled=enabled,
            jpeg_quality=jpeg_quality,
            min_shrink=min_shrink,
        )

    def target_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The (width, height) to send instead of ``width`` x ``height``, or None to send the image as it is.

        None when the provider would not shrink the image (it keeps it, or enlarges it: enlarging is its job,
        since a bigger upload buys nothing) or would shrink it by less than ``min_shrink``, when the shape is one
        the provider refuses (the caller reports that), and in the corner cases where the provider would resize the resized image *again* (an extreme
        aspect ratio, where smart resize clamps a side to ``factor``): sending the original there is the only
        way to be sure the tokens are unchanged.
        """
        try:
            h_bar, w_bar = self._smart_resize(height, width)
            pixels, target = height * width, h_bar * w_bar
            if pixels <= target or pixels < self.min_shrink * target:
                return None
            if self._smart_resize(h_bar, w_bar) != (h_bar, w_bar):
                return None
        except tokens.ImageSizeError:
            return None
        return w_bar, h_bar

    def _smart_resize(self, height: int, width: int) -> tuple[int, int]:
        """The provider's resize with this policy's bounds: (h_bar, w_bar)."""
        return tokens.smart_resize(
            height, width, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )


# ---------------------------------------------------------------------------------------------- parsing cells


def parse_image_cell(cell: object, *, column: str, base_dir: Path) -> list[ImageRef]:
    """Turn one manifest cell into image references; an empty cell gives ``[]`` (the caller reports it).

    Accepts a string, a JSON array string (how a list survives a CSV cell), or a list / tuple / numpy array (how
    Parquet and JSONL list columns arrive through pandas). Anything else is an input error naming the type.
    """
    return [image_ref(value, column=column, base_dir=base_dir) for value in _cell_values(cell, column)]


def image_ref(value: str, *, column: str, base_dir: Path) -> ImageRef:
    """Classify one reference string; relative paths resolve against ``base_dir`` (the manifest's folder)."""
    text = value.strip()
    lowered = text.lower()
    if lowered.startswith("data:"):
        return ImageRef(kind="data", value=text, column=column)
    if lowered.startswith(("http://", "https://")):
        if not urlsplit(text).netloc:
            raise _cell_error(column, f"the URL {_shorten(text)!r} has no host", "write it as https://host/path")
        return ImageRef(kind="url", value=text, column=column)
    if lowered.startswith("file://"):
        return ImageRef(kind="path", value=text, column=column, path=_file_url_path(text, column))
    scheme = _SCHEME_RE.match(text)
    if scheme:
        raise _cell_error(
            column,
            f"the reference {_shorten(text)!r} uses the {scheme.group(1)}:// scheme, which the provider cannot fetch",
            "use a local path, a public http(s) URL (for cloud storage: a presigned URL) or a data: URL",
            code="unsupported_url",
        )
    return ImageRef(kind="path", value=text, column=column, path=_resolve(Path(text).expanduser(), base_dir))


def _cell_values(cell: object, column: str) -> list[str]:
    """Normalise a cell to a list of non-empty reference strings."""
    if _is_missing(cell):
        return []
    if isinstance(cell, str):
        text = cell.strip()
        if not text:
            return []
        if text.startswith("["):
            return _check_items(_json_list(text, column), column)
        return [text]
    if isinstance(cell, (list, tuple, np.ndarray)):
        return _check_items(list(cell), column)
    raise _cell_error(
        column,
        f"the cell holds a {type(cell).__name__}, not an image reference",
        "store a path or URL, or a list of them (a JSON array string in CSV)",
    )


def _is_missing(cell: object) -> bool:
    """None, NaN and pandas' NA all mean an empty cell."""
    if cell is None:
        return True
    if isinstance(cell, (float, np.floating)):
        return math.isnan(cell)
    return type(cell).__name__ in ("NAType", "NaTType")


def _json_list(text: str, column: str) -> list[object]:
    """Parse a JSON array string cell such as ``["a.jpg", "b.jpg"]``."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _cell_error(
            column,
            f"the cell starts with '[' but is not a valid JSON array ({exc.msg} at char {exc.pos})",
            'write the list as JSON, e.g. ["a.jpg", "b.jpg"]',
        ) from exc
    if not isinstance(parsed, list):
        raise _cell_error(column, "the cell is JSON but not an array", 'write the list as ["a.jpg", "b.jpg"]')
    return parsed


def _check_items(items: list[object], column: str) -> list[str]:
    """Every element of a list cell must be a non-empty string; a hole in a list is an error, not a skip."""
    values: list[str] = []
    for position, item in enumerate(items, start=1):
        if not isinstance(item, str) or not item.strip():
            what = "empty" if isinstance(item, str) or _is_missing(item) else f"a {type(item).__name__}"
            raise _cell_error(
                column, f"element {position} of the list is {what}", "every element must be a path or URL string"
            )
        values.append(item.strip())
    return values


def _file_url_path(text: str, column: str) -> Path:
    """``file:///abs/x.jpg`` or ``file://localhost/abs/x.jpg`` → an absolute path."""
    parts = urlsplit(text)
    if parts.netloc not in ("", "localhost"):
        raise _cell_error(
            column,
            f"the file URL {_shorten(text)!r} names the host {parts.netloc!r}; only local files can be read",
            "write it as file:///absolute/path or as a plain path",
        )
    return Path(os.path.abspath(url2pathname(unquote(parts.path))))


def _resolve(path: Path, base_dir: Path) -> Path:
    """Absolute and normalised, without following symlinks, so messages show the path the user knows."""
    return Path(os.path.abspath(path if path.is_absolute() else base_dir / path))


# ---------------------------------------------------------------------------------------------- preparing


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
    return _prepare_file(ref, resize if resize is not None and resize.enabled else None)


def _prepare_file(ref: ImageRef, resize: ResizePolicy | None) -> PreparedImage:
    """Local file → base64 data URL, after the cheap decode that catches truncation and corruption.

    Without a policy the file's own bytes are sent. With one, the file is re-encoded when it must be turned
    upright or the provider would shrink it (:class:`_Plan`), and the checks split into two groups: those
    about the *file* (readable, an accepted format, not truncated, sides and aspect ratio) apply to the
    original, those about the *upload* (10 MB data URL, JPEG/PNG only above 4K) apply to what is sent. So a
    12 MB scan that shrinks to 1 MB is accepted, and a truncated scan is still refused.
    """
    path = _ref_path(ref)
    size = _stat_size(ref, path)
    if resize is None:  # the upload will be the file itself: refuse it before reading it
        _check_encoded_size(ref, size, _SHORTEST_PREFIX)
    data = _read_bytes(ref, path)
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
    url = prefix + base64.b64encode(sent.data).decode("ascii")
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


def _check_decodes(ref: ImageRef, im: Image.Image, image_format: str) -> None:
    """Decode as little as possible while still reading every byte, so truncation is caught cheaply.

    JPEG: ``draft()`` makes libjpeg decode at 1/8 scale, which still walks all the entropy-coded data. PNG:
    ``verify()`` reads every chunk and checks its CRC without inflating pixels. Anything else: ``load()``.
    """
    try:
        if image_format in _JPEG_FORMATS:
            im.draft(None, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
        elif image_format == "PNG":
            im.verify()
        else:
            im.load()
    # Pillow's decoders raise many unrelated types on malformed data (OSError, SyntaxError, struct.error,
    # IndexError, ValueError...); every one of them means the same thing here: this file cannot be sent.
    except Exception as exc:
        raise _corrupt(ref, exc) from exc


def _corrupt(ref: ImageRef, exc: Exception) -> InputRowError:
    """The message for pixel data that does not decode."""
    return _input_error(
        ref,
        f"the image data is truncated or corrupt ({type(exc).__name__}: {exc})",
        "re-export or re-download the file, or remove the row",
        code="corrupt_image",
    )


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


# ---------------------------------------------------------------------------------------------- resizing

_PNG_COMPRESS_LEVEL = 6
"""zlib level for re-encoded PNGs: Pillow's default (measured: level 1 is 1.7× faster and 7% larger, 9 is 5×
slower and under 1% smaller)."""

# Modes the re-encoder handles; anything else (32-bit integer or float greyscale, LAB...) is sent as it is,
# because scaling those to 8 bits needs a range we do not know.
_RENDERABLE_MODES = frozenset(
    {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I;16", "I;16B", "I;16L"}
)
_ROTATED_ORIENTATIONS = frozenset({5, 6, 7, 8})
"""EXIF orientations that swap width and height (the transposes and the 90° rotations)."""


@dataclass(frozen=True)
class _Plan:
    """What to do to one local file before sending it: turn it upright, shrink it, or both."""

    orientation: int
    """The EXIF orientation tag (1 = already upright)."""
    oriented_size: tuple[int, int]
    """(width, height) once upright: the size the provider's resize starts from."""
    target_size: tuple[int, int]
    """(width, height) to send; equal to ``oriented_size`` when only turning the image upright."""
    policy: ResizePolicy

    @property
    def resizes(self) -> bool:
        """Whether the pixels are resampled (and not only turned upright)."""
        return self.target_size != self.oriented_size


@dataclass(frozen=True)
class _Encoded:
    """The bytes to put in the data URL, their type and their pixel size."""

    data: bytes
    mime: str
    width: int
    height: int
    original_size: tuple[int, int] | None = None
    """As :attr:`PreparedImage.original_size`: set only when the pixels were resampled."""


def _plan(ref: ImageRef, im: Image.Image, data: bytes, policy: ResizePolicy) -> _Plan | None:
    """What to change before sending; None to send the file's bytes as they are.

    Upright first, then the size: the provider's resize (and so the token count) starts from the upright size,
    and a 90° orientation swaps width and height.
    """
    orientation = _orientation(ref, im, data)
    width, height = im.size
    oriented = (height, width) if orientation in _ROTATED_ORIENTATIONS else (width, height)
    target = policy.target_size(*oriented)
    if orientation == 1 and target is None:
        return None
    if im.mode not in _RENDERABLE_MODES:
        logger.debug("column %r, image %s: mode %s is sent as it is", ref.column, ref.describe(), im.mode)
        return None
    return _Plan(orientation=orientation, oriented_size=oriented, target_size=target or oriented, policy=policy)


def _orientation(ref: ImageRef, im: Image.Image, data: bytes) -> int:
    """The EXIF orientation tag, 1 when there is none or it is unreadable.

    We do not know whether the provider honours EXIF orientation; sending upright pixels with no tag makes the
    result the same either way. A PNG's EXIF chunk may come after the pixels, where Pillow finds it only by
    decoding them, so that rare case is read from a second, throw-away image and ``im`` stays fresh for
    :func:`_check_decodes` (PNG ``verify()`` must come first).
    """
    try:
        if im.format != "PNG" or "exif" in im.info:
            value = im.getexif().get(ExifTags.Base.Orientation, 1)
        elif b"eXIf" in data or b"Raw profile type exif" in data:
            with Image.open(io.BytesIO(data)) as late:
                value = late.getexif().get(ExifTags.Base.Orientation, 1)
        else:
            return 1
    # A malformed EXIF block makes Pillow's parser raise many types (struct.error, ValueError, SyntaxError,
    # OSError...); the pixels are still fine, so the image is sent as stored rather than refused.
    except Exception as exc:
        logger.debug("column %r, image %s: EXIF unreadable (%s)", ref.column, ref.describe(), type(exc).__name__)
        return 1
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


def _render(ref: ImageRef, im: Image.Image, data: bytes, plan: _Plan) -> _Encoded:
    """Decode (every byte: this is also the truncation check), turn upright, shrink, re-encode.

    A PNG is ``verify()``-ed first, as without a policy (it checks every chunk's CRC, which decoding does not),
    and then decoded from a second image object, since a verified one cannot be loaded.
    """
    image_format = im.format or "?"
    if image_format != "PNG":
        return _render_loaded(ref, im, image_format, plan)
    _check_decodes(ref, im, image_format)
    with _open_image(ref, io.BytesIO(data), head=data[:64]) as fresh:
        return _render_loaded(ref, fresh, image_format, plan)


def _render_loaded(ref: ImageRef, im: Image.Image, image_format: str, plan: _Plan) -> _Encoded:
    """The pixel pipeline on one freshly opened image; nothing here touches the file system.

    The output format: a JPEG stays a JPEG (its content is lossy already). Other files become a JPEG, except
    palette, bilevel, greyscale and few-colour images, which are encoded both ways and sent as PNG when the PNG
    is no larger: lossless text edges for free. A byte threshold alone cannot make that call: measured on
    2.5-megapixel renderings, a clean greyscale page takes 2.0 bits per pixel as PNG and 2.2 as JPEG, a noisy
    greyscale scan 4.9 as PNG and 2.4 as JPEG, a flat-colour chart 0.03 as PNG and 0.15 as JPEG. The JPEG
    encode costs 5-25 ms, so trying both is cheap next to the decode and the resize.
    """
    _decode(ref, im, image_format, plan)
    icc_profile = im.info.get("icc_profile")
    few_colours = image_format not in _JPEG_FORMATS and _has_few_colours(im)
    # exif_transpose on the decoded file image (not a converted copy: only the file image knows its EXIF). It
    # reads the tag after decoding, so it is a no-op where the reader has turned the pixels itself (TIFF).
    upright = _eight_bit(ImageOps.exif_transpose(im) if plan.orientation != 1 else im)
    oriented, target = _sizes(upright, image_format, plan)
    pixels = upright if upright.size == target else upright.resize(target, Image.Resampling.LANCZOS)
    pixels = _on_white(pixels)
    encoded = _encode_jpeg(pixels, icc_profile, plan.policy.jpeg_quality)
    if few_colours:
        png = _encode_png(pixels, icc_profile)
        encoded = png if len(png.data) <= len(encoded.data) else encoded
    if target != oriented:
        encoded = replace(encoded, original_size=oriented)
    logger.debug(
        "column %r, image %s: sent as a %d×%d %s of %s bytes (orientation %d)",
        ref.column, ref.describe(), encoded.width, encoded.height, encoded.mime, f"{len(encoded.data):,}",
        plan.orientation,
    )
    return encoded


def _sizes(upright: Image.Image, image_format: str, plan: _Plan) -> tuple[tuple[int, int], tuple[int, int]]:
    """(upright size, size to send) for decoded, upright pixels.

    A JPEG may have been decoded at a reduced DCT scale, so its sizes come from the plan (Pillow's JPEG reader
    never applies the orientation itself, so the plan's prediction holds). For any other format the decoded
    pixels are the truth: Pillow's TIFF reader, for one, reports the upright size and turns the pixels when it
    loads them, which a prediction from the tag would get wrong (the token count does not depend on which way
    round the sizes are, but the pixels would be stretched).
    """
    if image_format in _JPEG_FORMATS:
        return plan.oriented_size, plan.target_size
    return upright.size, plan.policy.target_size(*upright.size) or upright.size


def _decode(ref: ImageRef, im: Image.Image, image_format: str, plan: _Plan) -> None:
    """Load the pixels; a JPEG at the smallest DCT scale (1/2, 1/4, 1/8) still at least 2× the target size.

    libjpeg's scaled decoding skips most of the inverse DCT work, and stopping at 2× the target leaves LANCZOS
    enough pixels for a clean result (``draft`` works in stored orientation, hence the swap).
    """
    try:
        if image_format in _JPEG_FORMATS and plan.resizes:
            width, height = plan.target_size
            stored = (height, width) if plan.orientation in _ROTATED_ORIENTATIONS else (width, height)
            im.draft(None, (2 * stored[0], 2 * stored[1]))
        im.load()
    # See _check_decodes: any exception type out of a Pillow decoder means the data is unusable.
    except Exception as exc:
        raise _corrupt(ref, exc) from exc


def _has_few_colours(im: Image.Image) -> bool:
    """Palette, bilevel and greyscale images, and colour images of at most 256 colours: PNG candidates.

    ``getcolors(256)`` stops at the 257th colour, so on a photo or a colour scan it costs next to nothing.
    """
    if im.mode in ("1", "P", "PA", "L", "LA") or im.mode.startswith("I;16"):
        return True
    return im.mode in ("RGB", "RGBA") and im.getcolors(256) is not None


def _eight_bit(im: Image.Image) -> Image.Image:
    """L, LA, RGB or RGBA: the modes LANCZOS resamples properly (not 1 or P) and that JPEG/PNG can hold."""
    if im.mode in ("L", "LA", "RGB", "RGBA"):
        return im
    if im.mode == "1":
        return im.convert("L")
    if im.mode in ("P", "PA"):
        return im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    if im.mode.startswith("I;16"):  # 16-bit greyscale scans: keep the top 8 bits (convert("L") would clip)
        return Image.fromarray((np.asarray(im) >> 8).astype(np.uint8))
    return im.convert("RGB")  # CMYK, YCbCr, RGBX


def _on_white(im: Image.Image) -> Image.Image:
    """Drop transparency by compositing onto white, as the Qwen-VL reference preprocessing (qwen-vl-utils) does.

    Done after the resize, which Pillow performs on premultiplied alpha, so edges do not darken.
    """
    if im.mode not in ("LA", "RGBA"):
        return im
    opaque = im.mode[:-1]
    background = Image.new(opaque, im.size, 255 if opaque == "L" else (255, 255, 255))
    background.paste(im.convert(opaque), mask=im.getchannel("A"))
    return background


def _encode_png(im: Image.Image, icc_profile: bytes | None) -> _Encoded:
    """Lossless PNG, with no EXIF (see :func:`_encode_jpeg`)."""
    buffer = io.BytesIO()
    im.save(buffer, "PNG", compress_level=_PNG_COMPRESS_LEVEL, icc_profile=_matching_icc(im, icc_profile))
    return _Encoded(data=buffer.getvalue(), mime="image/png", width=im.width, height=im.height)


def _encode_jpeg(im: Image.Image, icc_profile: bytes | None, quality: int) -> _Encoded:
    """JPEG at ``quality`` with full-resolution chroma (4:4:4).

    4:2:0 halves the colour resolution, which blurs coloured strokes (stamps, signatures, highlighted or
    coloured text: what OCR jobs are about); measured on a 2.6-megapixel noisy colour scan, 4:4:4 costs 5%
    more bytes and 3 ms. ``optimize`` (optimal Huffman tables) saves 4-6% of the bytes for about 10 ms. No
    EXIF is written: the pixels are upright, and GPS and camera data have no business in a model request.
    """
    buffer = io.BytesIO()
    im.save(
        buffer,
        "JPEG",
        quality=quality,
        subsampling=0,
        optimize=True,
        icc_profile=_matching_icc(im, icc_profile),
    )
    return _Encoded(data=buffer.getvalue(), mime="image/jpeg", width=im.width, height=im.height)


def _matching_icc(im: Image.Image, icc_profile: bytes | None) -> bytes | None:
    """Keep the colour profile only when it describes the mode being written (not a CMYK profile on RGB)."""
    space = {"RGB": b"RGB ", "L": b"GRAY"}.get(im.mode)
    if icc_profile and space is not None and icc_profile[16:20] == space:
        return icc_profile
    return None


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


# ---------------------------------------------------------------------------------------------- probing


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
    path = _ref_path(ref)
    size = _stat_size(ref, path)
    try:
        with path.open("rb") as handle:
            head = handle.read(64)
            handle.seek(0)
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


# ---------------------------------------------------------------------------------------------- checks


def _ref_path(ref: ImageRef) -> Path:
    """The resolved path of a path reference (guaranteed by ImageRef's constructor)."""
    assert ref.path is not None
    return ref.path


def _stat_size(ref: ImageRef, path: Path) -> int:
    """File size, turning "missing", "a folder" and "empty" into messages with a fix."""
    try:
        stat = path.stat()
    except FileNotFoundError as exc:
        raise _input_error(
            ref,
            "file not found",
            "correct the path in the manifest (relative paths resolve against the manifest's folder) or add the file",
            code="file_not_found",
        ) from exc
    except OSError as exc:
        raise _unreadable(ref, exc) from exc
    if not path.is_file():
        raise _input_error(
            ref, "this is not a regular file (a folder?)", "point the cell at an image file", code="not_a_file"
        )
    if stat.st_size == 0:
        raise _input_error(ref, "the file is empty (0 bytes)", "re-export or re-download the image", code="empty_file")
    return stat.st_size


def _read_bytes(ref: ImageRef, path: Path) -> bytes:
    """The whole file in one call, which opens and closes it; an empty read is still an empty file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _unreadable(ref, exc) from exc
    if not data:
        raise _input_error(ref, "the file is empty (0 bytes)", "re-export or re-download the image", code="empty_file")
    return data


def _open_image(ref: ImageRef, source: IO[bytes], *, head: bytes) -> Image.Image:
    """``Image.open`` with its failures turned into input errors; ``head`` (first bytes) explains why."""
    try:
        return Image.open(source)
    except Image.DecompressionBombError as exc:
        raise _input_error(
            ref,
            f"the image has too many pixels to handle safely ({exc})",
            "downscale it; the provider works within 8K (7680×4320) anyway",
            code="too_many_pixels",
        ) from exc
    except UnidentifiedImageError as exc:
        raise _input_error(ref, f"not an image{_guess_what(head)}", _not_image_fix(head), code="not_an_image") from exc
    # As in _check_decodes: a malformed header can make a format plugin raise almost anything.
    except Exception as exc:
        raise _input_error(
            ref,
            f"the image header is corrupt ({type(exc).__name__}: {exc})",
            "re-export or re-download the file, or remove the row",
            code="corrupt_image",
        ) from exc


def _guess_what(head: bytes) -> str:
    """A hint about what a non-image file is, from its first bytes (never the bytes themselves)."""
    if head.startswith(b"%PDF"):
        return " (it is a PDF)"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypheif", b"ftyphevc", b"ftypmsf1"):
        return " Pillow can read (it looks like HEIC/HEIF, and the pillow-heif plugin is not installed)"
    if head and b"\x00" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            return ""
        return " (it looks like a text file)"
    return ""


def _not_image_fix(head: bytes) -> str:
    """The fix that goes with :func:`_guess_what`."""
    if head.startswith(b"%PDF"):
        return "render the pages to PNG or JPEG first and list those files"
    if head[4:8] == b"ftyp" and pillow_heif is None:
        return "install pillow-heif (pip install pillow-heif) or convert the file to JPEG"
    return "point the cell at a JPEG, PNG, WEBP, BMP, TIFF or GIF file"


def _accepted_mime(ref: ImageRef, image_format: str) -> str:
    """The MIME type to send, from the *content* (Pillow's format), or an error for formats the provider refuses."""
    mime = _ACCEPTED_FORMATS.get(image_format)
    if mime is None:
        raise _input_error(
            ref,
            f"the file is {image_format}, a format the provider does not accept",
            "convert it to JPEG or PNG",
            code="unsupported_format",
        )
    return mime


def _check_dimensions(ref: ImageRef, width: int, height: int, image_format: str | None) -> None:
    """Refuse what the provider refuses: a side under 10 px, aspect over 200, non-JPEG/PNG above 4K."""
    _check_sides(ref, width, height)
    if image_format is not None:
        _check_large_format(ref, width, height, image_format)


def _check_sides(ref: ImageRef, width: int, height: int) -> None:
    """A side under 10 px or an aspect ratio over 200 is refused whatever the size it is sent at."""
    if width < MIN_SIDE_PX or height < MIN_SIDE_PX:
        raise _input_error(
            ref,
            f"the image is {width}×{height} px; the provider needs at least {MIN_SIDE_PX} px on each side",
            "upscale or pad the image",
            code="image_too_small",
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise _input_error(
            ref,
            f"the image is {width}×{height} px, aspect ratio {ratio:.0f}:1; "
            f"the provider accepts at most {MAX_ASPECT_RATIO}:1",
            "crop or pad the image, or split it into pieces",
            code="aspect_ratio",
        )


def _check_large_format(ref: ImageRef, width: int, height: int, image_format: str) -> None:
    """Above 4K the provider takes only JPEG and PNG; applies to the image as sent."""
    if image_format not in _LARGE_OK_FORMATS and _exceeds(width, height, SIDES_4K):
        raise _input_error(
            ref,
            f"the image is a {width}×{height} px {image_format}; "
            "above 4K (3840×2160) the provider accepts only JPEG and PNG",
            "convert it to JPEG or PNG, or downscale it to within 3840×2160",
            code="unsupported_format",
        )


def _exceeds(width: int, height: int, sides: tuple[int, int]) -> bool:
    """Whether an image is larger than a (long side, short side) bound, in either orientation."""
    return max(width, height) > sides[0] or min(width, height) > sides[1]


def _check_encoded_size(ref: ImageRef, file_bytes: int, prefix: str) -> None:
    """Refuse a file whose data URL would exceed the provider's 10,485,760-character limit."""
    url_chars = len(prefix) + 4 * math.ceil(file_bytes / 3)
    if url_chars > MAX_DATA_URL_CHARS:
        raise _too_large(ref, file_bytes, url_chars, len(prefix))


def _too_large(ref: ImageRef, file_bytes: int, url_chars: int, prefix_chars: int) -> InputRowError:
    """The size message: how big the file is, the limit, and that resizing or a URL is the fix."""
    largest = (MAX_DATA_URL_CHARS - prefix_chars) // 4 * 3
    return _input_error(
        ref,
        f"the file is {file_bytes / 2**20:.1f} MB, which base64-encodes to a {url_chars:,}-character data URL; "
        f"the provider accepts at most {MAX_DATA_URL_CHARS:,} characters (a file of about {largest / 2**20:.1f} MB)",
        "resize or recompress the image (e.g. JPEG, long side ≤ 4096 px), "
        "or host it and put its http(s) URL in the manifest",
        code="too_large",
    )


def _validate_data_url(ref: ImageRef) -> tuple[str, str]:
    """A data URL the provider would take: base64, an image MIME type it accepts, within the size limit."""
    match = _DATA_URL_RE.match(ref.value)
    if match is None:
        raise _input_error(
            ref,
            "the data URL has no ',' after its header",
            "write it as data:image/png;base64,<data>",
            code="bad_data_url",
        )
    mime = match.group(1).strip().lower()
    if "base64" not in match.group(2).lower():
        raise _input_error(
            ref, "the data URL is not base64-encoded", "write it as data:<mime>;base64,<data>", code="bad_data_url"
        )
    if mime not in _PROVIDER_MIMES:
        raise _input_error(
            ref,
            f"the data URL declares {mime or 'no'} MIME type; "
            "the provider accepts image/jpeg, image/png, image/webp, ...",
            "encode the image as JPEG or PNG and declare its type",
            code="unsupported_format",
        )
    payload = ref.value[match.end() :]
    if len(ref.value) > MAX_DATA_URL_CHARS:
        raise _too_large(ref, _decoded_length(payload), len(ref.value), match.end())
    return mime, payload


def _decoded_image_size(ref: ImageRef, payload: str) -> tuple[int, int] | None:
    """Width and height from a base64 payload's header, or None if Pillow does not know the content."""
    try:
        data = base64.b64decode(payload)
    except (binascii.Error, ValueError) as exc:
        raise _input_error(
            ref, f"the base64 data is malformed ({exc})", "re-encode the image", code="bad_data_url"
        ) from exc
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    # Unknown content is the provider's to judge (it may read formats Pillow cannot); see _check_decodes for
    # why any exception type can come out of Pillow here.
    except Exception as exc:
        logger.debug("column %r, %s: size unknown (%s)", ref.column, ref.describe(), type(exc).__name__)
        return None


def _decoded_length(payload: str) -> int:
    """Bytes a base64 payload decodes to, without decoding it."""
    stripped = payload.rstrip("=")
    return len(stripped) * 3 // 4


# ---------------------------------------------------------------------------------------------- redaction


def redact_data_url(value: str) -> str:
    """Replace every base64 payload in ``value`` by a short hash and its length; other text is unchanged.

    ``"data:image/png;base64,iVBOR..."`` → ``"data:image/png;base64,<sha256:ab12cd34ef56, 12,345 chars>"``, where
    the hash prefix matches :meth:`ImageRef.identity` and the length is that of the whole data URL (the number
    the provider's limit applies to). Works on a single reference or on a string holding several (a JSON list).
    """
    if "data:" not in value.lower():
        return value
    return _DATA_URL_ANYWHERE_RE.sub(_redacted, value)


def _redacted(match: re.Match[str]) -> str:
    """One data URL → its header plus a digest."""
    payload = match.group(3)
    digest = hashlib.sha256(payload.encode("ascii", "replace")).hexdigest()[:12]
    return f"{match.group(0)[: match.start(3) - match.start(0)]}<sha256:{digest}, {len(match.group(0)):,} chars>"


def _split_data_url(value: str) -> tuple[str, str, str]:
    """(mime, parameters, payload) of a data URL, tolerating a malformed one (for describe/identity)."""
    match = _DATA_URL_RE.match(value)
    if match is None:
        return "", "", value[5:]
    return match.group(1).strip().lower(), match.group(2), value[match.end() :]


def _data_url_header(value: str) -> str:
    """``data:image/png;base64`` from a data URL, shortened if the header is absurd."""
    match = _DATA_URL_RE.match(value)
    header = value[: match.end() - 1] if match else "data:"
    return _shorten(header, 80)


# ---------------------------------------------------------------------------------------------- messages


def _input_error(ref: ImageRef, reason: str, fix: str, *, code: str) -> InputRowError:
    """The one message shape: which column, which image (as written and resolved), why, and what to do."""
    return InputRowError(f"column {ref.column!r}, image {ref.describe()}: {reason}. Fix: {fix}.", code=code)


def _unreadable(ref: ImageRef, exc: OSError) -> InputRowError:
    """An OS-level failure to read (permissions, I/O error) with the OS's own reason."""
    return _input_error(
        ref,
        f"the file cannot be read ({exc.strerror or type(exc).__name__})",
        "check that the file exists and is readable by this user",
        code="unreadable_file",
    )


def _cell_error(column: str, reason: str, fix: str, *, code: str = "bad_cell") -> InputRowError:
    """An error about the cell itself, before there is an ImageRef to describe."""
    return InputRowError(f"column {column!r}: {reason}. Fix: {fix}.", code=code)


def _shorten(text: str, limit: int = 200) -> str:
    """Keep messages short and free of inline image data."""
    text = redact_data_url(text)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"
