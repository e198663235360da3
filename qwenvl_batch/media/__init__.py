"""Images: manifest cells → the ``image_url`` parts of a Chat Completions request.

One module per job, in the order an image goes through them:

* :mod:`.refs`: parse a cell into references (paths, URLs, data URLs, bytes the manifest carries);
* :mod:`.sources`: where each image's bytes come from (a file, the manifest, a tar member, a URL passed
  through): the one interface a new kind of input implements;
* :mod:`.rules`: the provider's acceptance rules, checked locally (sizes, formats, the data-URL limit,
  truncation);
* :mod:`.transcode`: client-side resizing to the provider's own target size, upright;
* :mod:`.prepare`: read, check and encode one image (:func:`prepare_image`), or read its header only
  (:func:`probe_image`);
* :mod:`.redact`: output files and messages never hold image bytes.

The names the rest of the package uses are re-exported here (``from qwenvl_batch.media import ...``).
"""

from .prepare import Base64URL, ImageInfo, PreparedImage, prepare_image, probe_image
from .redact import redact_cell, redact_data_url, redacted_columns, stored_schema
from .refs import ImageRef, RefKind, image_ref, parse_image_cell
from .rules import MAX_ASPECT_RATIO, MAX_DATA_URL_CHARS, MIN_SIDE_PX, SIDES_4K, SIDES_8K, too_many_images
from .sources import DataUrl, ImageSource, InlineBytes, LocalFile, RemoteUrl, TarMember
from .transcode import ResizePolicy

__all__ = [
    "MAX_ASPECT_RATIO",
    "MAX_DATA_URL_CHARS",
    "MIN_SIDE_PX",
    "SIDES_4K",
    "SIDES_8K",
    "Base64URL",
    "DataUrl",
    "ImageInfo",
    "ImageRef",
    "ImageSource",
    "InlineBytes",
    "LocalFile",
    "PreparedImage",
    "RefKind",
    "RemoteUrl",
    "ResizePolicy",
    "TarMember",
    "image_ref",
    "parse_image_cell",
    "prepare_image",
    "probe_image",
    "redact_cell",
    "redact_data_url",
    "redacted_columns",
    "stored_schema",
    "too_many_images",
]
