"""``[input] path`` patterns: brace lists and ranges, globs, and which input format a path names.

WebDataset tools name shard sets with brace ranges (``shard-{00000..00099}.tar``, as in the ``webdataset``
package and img2dataset's docs), Hugging Face datasets come as several Parquet files
(``data/train-*.parquet``), and a folder of images is a folder or a glob (``photos/**/*.jpg``). A TOML list of
paths is turned into a brace list by the job file's parser (config.py), so it arrives here as one pattern too.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from qwenvl_batch.errors import ConfigError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".heif", ".jp2", ".ico", ".mpo"}
)
"""Suffixes a folder listing takes as images (the content is checked later, row by row, like any image)."""
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
MANIFEST_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl",
                     ".ndjson": "jsonl"}
_BRACE_RE = re.compile(r"\{([^{}]*)\}")
_RANGE_RE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_GLOB_CHARS = frozenset("*?[")
MAX_EXPANDED = 1_000_000


def has_pattern(text: str) -> bool:
    """Whether a path holds brace or glob syntax (and so names several files)."""
    return bool(_BRACE_RE.search(text)) or any(char in text for char in _GLOB_CHARS)


def is_glob(text: str) -> bool:
    return any(char in text for char in _GLOB_CHARS)


def expand_braces(text: str) -> list[str]:
    """``a{1..3}b`` → a1b a2b a3b (zero padding kept: ``{00..02}`` → 00 01 02); ``{x,y}`` → x y; nested ok."""
    match = _BRACE_RE.search(text)
    if match is None:
        return [text]
    head, tail = text[: match.start()], text[match.end():]
    body = match.group(1)
    numeric = _RANGE_RE.match(body)
    if numeric:
        first, last = int(numeric.group(1)), int(numeric.group(2))
        width = len(numeric.group(1)) if numeric.group(1).startswith("0") else 0
        step = 1 if last >= first else -1
        if abs(last - first) >= MAX_EXPANDED:
            raise ConfigError(f"the brace range {{{body}}} names over {MAX_EXPANDED:,} paths")
        options = [str(n).zfill(width) for n in range(first, last + step, step)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def expand_files(pattern: Path) -> list[Path]:
    """Every file a brace/glob pattern names, in order (brace order, then sorted glob matches).

    A brace name that does not exist is an error naming it (a missing shard must not be skipped silently);
    a glob that matches nothing is an error too.
    """
    files: list[Path] = []
    for item in expand_braces(str(pattern)):
        if is_glob(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise ConfigError(f"[input] path {item!r} matches no file; "
                                  "check the pattern (relative to the job file)")
            files.extend(Path(m) for m in matches if os.path.isfile(m))
        elif not os.path.isfile(item):
            raise ConfigError(f"[input] path {pattern}: {item} does not exist (or is not a file); fix the path or "
                              "the brace range")
        else:
            files.append(Path(item))
    if not files:
        raise ConfigError(f"[input] path {pattern} names no file")
    return files


def detect_format(path: Path) -> str:
    """The input format a path names: a folder or an image glob → ``images``; tars → ``webdataset``; else by suffix."""
    text = str(path)
    if not has_pattern(text) and path.is_dir():
        return "images"
    name = Path(expand_braces(text)[0]).name.lower()  # a brace list or range: its first member tells
    if name.endswith(TAR_SUFFIXES):
        return "webdataset"
    suffix = Path(name).suffix
    if suffix in MANIFEST_SUFFIXES:
        return MANIFEST_SUFFIXES[suffix]
    if is_glob(text) and (suffix in IMAGE_SUFFIXES or suffix == "" or name.endswith("*")):
        return "images"
    return ""


def glob_root(pattern: Path) -> tuple[Path, str]:
    """Split an image glob into the folder to walk and the pattern relative to it (``photos``, ``**/*.jpg``)."""
    parts = pattern.parts
    for index, part in enumerate(parts):
        if is_glob(part):
            return Path(*parts[:index]) if index else Path("."), "/".join(parts[index:])
    return pattern, ""


def glob_regex(relative: str) -> re.Pattern[str]:
    """A compiled regex for a relative glob: ``**/`` spans folders (also none), ``*`` and ``?`` stay in one."""
    out, index = [], 0
    while index < len(relative):
        if relative.startswith("**/", index):
            out.append("(?:[^/]*/)*")
            index += 3
        elif relative.startswith("**", index):
            out.append(".*")
            index += 2
        elif relative[index] == "*":
            out.append("[^/]*")
            index += 1
        elif relative[index] == "?":
            out.append("[^/]")
            index += 1
        elif relative[index] == "[":
            end = relative.find("]", index + 1)
            if end < 0:
                out.append(re.escape("["))
                index += 1
            else:
                body = relative[index + 1: end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                index = end + 1
        else:
            out.append(re.escape(relative[index]))
            index += 1
    return re.compile("".join(out) + r"\Z")


def list_as_pattern(paths: list[str] | tuple[str, ...]) -> str:
    """``["a.tar", "b.tar"]`` → ``{a.tar,b.tar}`` (a brace list), so a list of inputs is one path like any other.

    All relative (resolved against the job file's folder as usual) or all absolute (written as ``/{a,b}``).
    """
    items = [str(p) for p in paths]
    if not items:
        raise ValueError("the list of input paths is empty")
    if len(items) == 1:
        return items[0]
    if any(char in item for item in items for char in ",{}"):
        raise ValueError("a listed input path may not contain ',', '{' or '}'")
    absolute = [os.path.isabs(item) for item in items]
    if all(absolute):
        return "/{" + ",".join(item.lstrip("/") for item in items) + "}"
    if any(absolute):
        raise ValueError("list input paths all relative (to the job file) or all absolute, not a mix")
    return "{" + ",".join(items) + "}"
