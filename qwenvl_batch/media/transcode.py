"""Client-side transcoding: shrink an image to exactly the size the provider would resize it to, upright.

The provider resizes every image to its pixel budget anyway (Qwen-VL smart resize, :mod:`qwenvl_batch.tokens`),
so a 24-megapixel scan is uploaded, base64-encoded and decoded in full only to be thrown away, and a 12 MB scan
is even refused by the 10 MB data-URL limit. With a :class:`ResizePolicy`, an image the provider would shrink is
shrunk here to *exactly* the provider's target size, which the provider then leaves alone: the image tokens
billed are unchanged, the bytes sent drop by about an order of magnitude. Images are never enlarged (the
provider's upscaling of small images costs nothing to upload), and images with an EXIF orientation are sent
upright. See :func:`_render_loaded` for the output format and why.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, replace

import numpy as np
from PIL import ExifTags, Image, ImageOps

from qwenvl_batch import tokens

from .refs import ImageRef
from .rules import (
    _JPEG_FORMATS,
    _check_decodes,
    _corrupt,
    _open_image,
)

logger = logging.getLogger(__name__)

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
        the provider refuses (the caller reports that), and in the corner cases where the provider would resize
        the resized image *again* (an extreme
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
    except Exception as exc:  # noqa: BLE001 - see the comment above
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
