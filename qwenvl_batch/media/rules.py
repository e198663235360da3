"""The provider's acceptance rules, checked locally so a bad row costs nothing and says what to fix.

Every check the provider would make anyway is made here first, instead of a 400 after a network round trip
(reference §2.1): sides of at least 10 px, aspect ratio at most 200, an accepted format (read from the
content, not the name), only JPEG/PNG above 4K, a data URL of at most 10,485,760 characters. Images are also
decoded once, cheaply, so a truncated or corrupt one is caught here and not by the model. The rules apply the
same way whatever the source of the bytes (a file, the manifest, a tar member).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
from collections.abc import Sequence
from typing import IO

from PIL import Image, UnidentifiedImageError

from qwenvl_batch.errors import InputRowError

from .redact import _DATA_URL_RE
from .refs import ImageRef

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
# The most bytes read into memory for one image (files are stat-ed first and refused above it), so one huge or
# hostile file costs a row, not the job's memory: 100 MiB holds an uncompressed 8K RGB TIFF (7680×4320×3).
MAX_READ_BYTES = 100 * 2**20
# A JPEG's header (everything before its first frame) must fit in this many bytes: Pillow walks JPEG marker
# segments in Python, so a header followed by megabytes of tiny junk segments would otherwise take minutes.
JPEG_HEADER_BYTES = 4 * 2**20
# Images in one request: the provider takes at most 250 base64 images (256 by URL) per request (facts §2.1).
MAX_IMAGES_PER_REQUEST = 250
MAX_URL_IMAGES_PER_REQUEST = 256
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
    except Exception as exc:  # noqa: BLE001 - see the comment above
        logger.debug("column %r, %s: size unknown (%s)", ref.column, ref.describe(), type(exc).__name__)
        return None


def _decoded_length(payload: str) -> int:
    """Bytes a base64 payload decodes to, without decoding it."""
    stripped = payload.rstrip("=")
    return len(stripped) * 3 // 4



def too_many_images(key: str, refs: Sequence[ImageRef]) -> InputRowError | None:
    """A row error when a row's images exceed what the provider takes in one request (250 base64, 256 by URL),
    found before anything is read or sent: 10^5 images in one cell went out as one 97 MB request."""
    limit = MAX_URL_IMAGES_PER_REQUEST if all(ref.kind == "url" for ref in refs) else MAX_IMAGES_PER_REQUEST
    if len(refs) <= limit:
        return None
    return InputRowError(
        f"row {key!r}: {len(refs):,} images in one row; the provider takes at most {limit} images per request "
        f"({MAX_IMAGES_PER_REQUEST} inline, {MAX_URL_IMAGES_PER_REQUEST} by URL). Fix: split the row into rows of "
        f"at most {limit} images.",
        code="too_many_images",
    )


def _too_large_to_read(ref: ImageRef, file_bytes: int) -> InputRowError:
    """The read cap's message: the size, the cap, and the fix (never read, so memory stays bounded)."""
    return _input_error(
        ref,
        f"the file is {file_bytes / 2**20:,.1f} MB; at most {MAX_READ_BYTES / 2**20:,.0f} MB are read for one image",
        "downscale or recompress the image (the provider works within 8K anyway), or remove the row",
        code="too_large",
    )


def _input_error(ref: ImageRef, reason: str, fix: str, *, code: str) -> InputRowError:
    """The one message shape: which column, which image (as written and resolved), why, and what to do."""
    return InputRowError(f"column {ref.column!r}, image {ref.describe()}: {reason}. Fix: {fix}.", code=code)


def _unreadable(ref: ImageRef, exc: OSError) -> InputRowError:
    """An OS-level failure to read (permissions, I/O error) with the OS's own reason."""
    if ref.kind == "tar":
        return _input_error(ref, f"the tar member cannot be read ({exc})", "re-create or re-download the shard",
                            code="unreadable_file")
    return _input_error(
        ref,
        f"the file cannot be read ({exc.strerror or exc or type(exc).__name__})",
        "check that the file exists and is readable by this user",
        code="unreadable_file",
    )

