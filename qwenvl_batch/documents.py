"""Documents (PDF, multi-page TIFF) → page rows, and page rows → one row per document.

With a ``[documents]`` section, a manifest row whose image cell names a ``.pdf``, ``.tif`` or ``.tiff`` file is
expanded, while the manifest is read, into one row per page. Every later stage (planning, resume, fingerprints,
retries, cost, ``estimate``) then sees page rows and needs no idea of documents. The key scheme:

* the output is keyed by a new column ``page_id`` = ``"{doc_id}#p{page:04d}"`` (page numbers 1-based, four
  digits so the ids sort in page order up to 9,999 pages); the manifest's own id column keeps the document's
  id, and every other manifest column is carried to each page row unchanged;
* added columns: ``doc_id`` (unless the id column is already called that), ``page_number``, ``page_count``,
  ``page_width_pt``, ``page_height_pt``, ``render_dpi``, ``rendered_width``, ``rendered_height``;
* a row whose cell is an ordinary image keeps ``page_id`` = its id and null page columns;
* a document that cannot become pages (encrypted, corrupt, no pages, over ``max_pages``) is one row with
  ``page_id`` = its id that becomes an input error (``pdf_encrypted``, ``pdf_corrupt``, ``no_pages``,
  ``too_many_pages``...) and is never sent.

``pages = "all"`` instead makes one row per document whose image cell lists every page: one multi-image
request, keyed by the document's id.

:func:`document_view` folds page rows back into one row per document: answers joined in page order with
olmOCR-style page spans, summed tokens and cost, and the count of failed pages.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from . import tokens
from .config import DocumentsConfig, JobConfig
from .errors import ConfigError, InputRowError
from .inputs import folder
from .inputs.patterns import IMAGE_SUFFIXES
from .manifest import Manifest, require_columns
from .media import ResizePolicy, image_ref
from .media.pages import (
    DOCUMENT_SUFFIXES,
    DocumentError,
    PageTarget,
    document_kind,
    list_pages,
    set_render_processes,
)

PAGE_ID = "page_id"
PAGE_SEPARATOR = "\n\n"
PAGE_CELL = pa.struct([
    ("path", pa.string()), ("file", pa.string()), ("kind", pa.string()), ("page", pa.int32()),
    ("width", pa.int32()), ("height", pa.int32()), ("quality", pa.int32()), ("error", pa.string()),
    ("error_code", pa.string()),
])
PAGE_FIELDS = [
    pa.field("page_number", pa.int32()), pa.field("page_count", pa.int32()),
    pa.field("page_width_pt", pa.float64()), pa.field("page_height_pt", pa.float64()),
    pa.field("render_dpi", pa.float64()), pa.field("rendered_width", pa.int32()),
    pa.field("rendered_height", pa.int32()),
]
_CACHE_ENTRIES = 4096
MAX_IMAGES_PER_REQUEST = 250
"""Base64 images one request may carry (qwen-vl-facts.md §2.1: 250 via base64, 256 via URL)."""
MAX_INPUT_TOKENS = {"qwen-vl-ocr": 30_000, "qwen3-vl-plus": 258_048}
"""Max input tokens per request where the model list states it (qwen-vl-facts.md §4, §8); others: no token check."""


def for_documents(job: JobConfig, manifest: Manifest) -> tuple[JobConfig, Manifest]:
    """With ``[documents]``: the job keyed by ``page_id`` and a manifest that yields page rows; else unchanged."""
    if job.documents is None:
        return job, manifest
    require_columns(manifest, job.input.id_column, job.input.image_columns)
    if len(job.input.image_columns) != 1:
        raise ConfigError(f"{job.input.path}: with [documents], name one image column (the document's path); "
                          f"got {list(job.input.image_columns)}")
    image_column = job.input.image_columns[0]
    if manifest.schema.field(image_column).type not in (pa.string(), pa.large_string()):
        raise ConfigError(f"{job.input.path}: column {image_column!r} must hold file paths (text) for [documents]; "
                          f"it is {manifest.schema.field(image_column).type}")
    set_render_processes(job.documents.render_processes)
    expander = Expander(job.documents, job.input.id_column, image_column, manifest.root, job.resize_policy(),
                        job.images.jpeg_quality, MAX_INPUT_TOKENS.get(tokens.normalize_model(job.model.name)))
    schema = expander.schema(manifest.schema)
    clash = sorted(set(manifest.columns) & (set(schema.names) - set(manifest.columns) - {image_column}))
    if clash:
        raise ConfigError(f"{job.input.path}: column(s) {', '.join(clash)} are added for document pages; rename "
                          "them in the manifest")
    pages = DocumentManifest(path=manifest.path, format=manifest.format, schema=schema, paths=manifest.paths,
                             base_dir=manifest.base_dir, batch_rows=manifest.batch_rows, layout=manifest.layout,
                             inner=manifest, expander=expander)
    return job.model_copy(update={"input": job.input.model_copy(update={"id_column": PAGE_ID})}), pages


def keyed_like(job: JobConfig, opened: JobConfig) -> JobConfig:
    """``job`` keyed by the id column :func:`for_documents` chose (``page_id``), for callers holding the job as
    written."""
    if job.input.id_column == opened.input.id_column:
        return job
    return job.model_copy(update={"input": job.input.model_copy(update={"id_column": opened.input.id_column})})


@dataclass(frozen=True)
class DocumentManifest(Manifest):
    """A manifest whose rows are document pages; ``inner`` is the manifest as written."""

    inner: Manifest | None = field(default=None, repr=False)
    expander: Expander | None = field(default=None, repr=False)

    def batches(self, batch_rows: int | None = None, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        assert self.inner is not None and self.expander is not None, "built by for_documents"
        if self.inner.format == "images":  # a folder or glob: PDFs and TIFFs are inputs too
            source = folder.read_folder(self.inner.path, self.inner.batch_rows, None,
                                        suffixes=IMAGE_SUFFIXES | DOCUMENT_SUFFIXES)
        else:
            source = self.inner.batches(self.inner.batch_rows)
        for batch in source:
            expanded = self.expander.expand(batch, self.schema)
            limit = batch_rows or self.batch_rows
            for start in range(0, expanded.num_rows, limit):
                part = expanded.slice(start, limit)
                yield part.select(columns) if columns else part


@dataclass
class Expander:
    """Turns manifest rows into page rows (or one multi-page row per document with ``pages = "all"``)."""

    config: DocumentsConfig
    id_column: str
    image_column: str
    base_dir: Path
    policy: ResizePolicy
    jpeg_quality: int
    max_input_tokens: int | None = None
    _cache: OrderedDict[tuple[Any, ...], list[PageTarget] | DocumentError] = field(default_factory=OrderedDict)

    def schema(self, inner: pa.Schema) -> pa.Schema:
        cell = pa.list_(PAGE_CELL) if self.config.pages == "all" else PAGE_CELL
        fields = [pa.field(PAGE_ID, pa.string())]
        fields += [pa.field(f.name, cell) if f.name == self.image_column else f for f in inner]
        if self.id_column != "doc_id":
            fields.append(pa.field("doc_id", pa.string()))
        fields += PAGE_FIELDS if self.config.pages == "each" else [pa.field("page_count", pa.int32())]
        return pa.schema(fields)

    def expand(self, batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
        rows: list[dict[str, Any]] = []
        for row in batch.to_pylist():
            rows.extend(self._rows_of(row))
        return pa.RecordBatch.from_pylist(rows, schema=schema)

    def _rows_of(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        doc_id = "" if row.get(self.id_column) is None else str(row[self.id_column])
        value = row.get(self.image_column)
        base = {**row, "doc_id": doc_id}
        path = self._document_path(value)
        # an ordinary image (or an empty cell: the row's own check reports it)
        if path is None or not isinstance(value, str):
            cell: Any = {"path": value} if value else None
            return [{**base, PAGE_ID: doc_id, self.image_column: [cell] if cell and self._all else cell}]
        kind = document_kind(path)
        assert kind is not None
        pages = self._pages(path, kind)
        if isinstance(pages, DocumentError):
            error = {"path": value, "error": str(pages), "error_code": pages.code}
            return [{**base, PAGE_ID: doc_id, self.image_column: [error] if self._all else error}]
        cells = [self._cell(value, path, kind, number, target) for number, target in enumerate(pages, start=1)]
        too_big = self._one_request_error(path, pages) if self._all else None
        if too_big is not None:
            error = {"path": value, "error": str(too_big), "error_code": too_big.code}
            return [{**base, PAGE_ID: doc_id, self.image_column: [error], "page_count": len(pages)}]
        if self._all:
            return [{**base, PAGE_ID: doc_id, self.image_column: cells, "page_count": len(pages)}]
        return [{**base, PAGE_ID: f"{doc_id}#p{number:04d}", self.image_column: cell, "page_number": number,
                 "page_count": len(pages), "page_width_pt": target.width_pt, "page_height_pt": target.height_pt,
                 "render_dpi": round(target.dpi, 2), "rendered_width": target.width,
                 "rendered_height": target.height}
                for number, (cell, target) in enumerate(zip(cells, pages, strict=True), start=1)]

    def _one_request_error(self, path: Path, pages: list[PageTarget]) -> DocumentError | None:
        """``pages = "all"``: the provider's per-request image count and input-token limits, checked here."""
        fix = 'use pages = "each", or lower [documents] max_pages / [model] max_pixels'
        if len(pages) > MAX_IMAGES_PER_REQUEST:
            return DocumentError(f"{path}: {len(pages):,} pages in one request, over the {MAX_IMAGES_PER_REQUEST} "
                                 f"images a request may carry; {fix}", "too_many_images")
        image_tokens = sum(p.width * p.height // self.policy.factor**2 + tokens.VISION_MARKER_TOKENS for p in pages)
        if self.max_input_tokens is not None and image_tokens > self.max_input_tokens:
            return DocumentError(f"{path}: {len(pages):,} pages take {image_tokens:,} image tokens in one request, "
                                 f"over the model's max input of {self.max_input_tokens:,}; {fix}",
                                 "request_too_large")
        return None

    @property
    def _all(self) -> bool:
        return self.config.pages == "all"

    def _cell(self, value: str, path: Path, kind: str, number: int, target: PageTarget) -> dict[str, Any]:
        return {"path": value, "file": str(path), "kind": kind, "page": number, "width": target.width,
                "height": target.height, "quality": self.jpeg_quality}

    def _document_path(self, value: object) -> Path | None:
        """The resolved path when the cell names a PDF or TIFF file, else None."""
        if not isinstance(value, str) or os.path.splitext(value.strip())[1].lower() not in DOCUMENT_SUFFIXES:
            return None
        try:
            ref = image_ref(value, column=self.image_column, base_dir=self.base_dir)
        except InputRowError:
            return None
        return ref.path if ref.kind == "path" else None

    def _pages(self, path: Path, kind: Any) -> list[PageTarget] | DocumentError:
        """Page targets from page sizes (cached by file identity: a run reads the manifest twice)."""
        try:
            stat = path.stat()
        except OSError:
            return DocumentError(f"{path}: file not found; correct the path in the manifest (relative paths "
                                 "resolve against the manifest's folder) or add the file", "file_not_found")
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._list(path, kind)
            self._cache[key] = cached
            if len(self._cache) > _CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return cached

    def _list(self, path: Path, kind: Any) -> list[PageTarget] | DocumentError:
        try:
            pages = list_pages(path, kind, self.policy, self.config.max_dpi)
        except DocumentError as exc:
            return exc
        except ImportError:
            return DocumentError(f"{path}: reading PDFs needs pypdfium2: pip install 'qwenvl-batch[pdf]'",
                                 "pdf_support_missing")
        if not pages:
            return DocumentError(f"{path}: the document has no pages; re-export it or remove the row", "no_pages")
        if len(pages) > self.config.max_pages:
            return DocumentError(f"{path}: {len(pages):,} pages, over [documents] max_pages = "
                                 f"{self.config.max_pages:,}; raise max_pages or split the document",
                                 "too_many_pages")
        return pages


# ---------------------------------------------------------------------------------------------- document view


DOCUMENT_COLUMNS = ["doc_id", "page_count", "pages_done", "pages_failed", "text", "page_spans", "prompt_tokens",
                    "completion_tokens", "total_tokens", "image_tokens", "cost", "currency", "errors"]


def document_view(pages: pd.DataFrame, source: Path | None = None) -> pd.DataFrame:
    """Page rows → one row per document (documents in first-seen order, pages in page order).

    ``text``: the pages' answers joined with a blank line; ``page_spans``: ``[[start, end, page], ...]`` character
    offsets of each page's answer in ``text`` (olmOCR's ``pdf_page_numbers``); tokens and cost summed;
    ``pages_failed``: pages without an answer (errors, or no row yet). A document that could not be opened is one
    row with its error in ``errors``; rows that are ordinary images come through as one-page documents.
    """
    if pages.empty:
        return pd.DataFrame(columns=DOCUMENT_COLUMNS)
    if "page_number" not in pages.columns:
        where = f"{source}: " if source else ""
        if "page_count" in pages.columns:
            raise ConfigError(f'{where}this is a pages = "all" output: it already has one row per document; use '
                              "the rows as they are (load_results(out) / export --rows)")
        raise ConfigError(f"{where}these results have no document pages (the job had no [documents] section); "
                          "use the per-row results instead")
    key = "doc_id" if "doc_id" in pages.columns else PAGE_ID
    frame = pages.assign(_page=pages["page_number"].fillna(1).astype(int), doc_id=pages[key])
    frame = frame.sort_values(["doc_id", "_page"], kind="stable")
    order = {doc: n for n, doc in enumerate(pd.unique(pages[key]))}
    rows = [_document_row(doc, group) for doc, group in frame.groupby("doc_id", sort=False)]
    out = pd.DataFrame(rows, columns=DOCUMENT_COLUMNS)
    return out.sort_values("doc_id", key=lambda s: s.map(order)).reset_index(drop=True)


def _document_row(doc: Any, group: pd.DataFrame) -> dict[str, Any]:
    text, spans = "", []
    for page, response, status in zip(group["_page"], group["response"], group["status"], strict=True):
        piece = response if status == "ok" and isinstance(response, str) else ""
        if text:
            text += PAGE_SEPARATOR
        spans.append([len(text), len(text) + len(piece), int(page)])
        text += piece
    count = group["page_count"].dropna()
    page_count = int(count.iloc[0]) if len(count) else len(group)
    done = int((group["status"] == "ok").sum())
    row: dict[str, Any] = {
        "doc_id": doc,
        "page_count": page_count,
        "pages_done": done,
        "pages_failed": max(page_count, len(group)) - done,  # errors, and pages with no row yet
        "text": text,
        "page_spans": spans,
    }
    for column in ("prompt_tokens", "completion_tokens", "total_tokens", "image_tokens", "cost"):
        if column in group.columns:
            row[column] = group[column].sum(min_count=1)
    if "currency" in group.columns:
        row["currency"] = next((c for c in group["currency"] if isinstance(c, str)), None)
    triples = zip(group["_page"], group["status"], group["error_message"], strict=True)
    errors = [f"p{page}: {message}" for page, status, message in triples if status != "ok"]
    row["errors"] = "; ".join(errors)[:2000] if errors else None
    return row
