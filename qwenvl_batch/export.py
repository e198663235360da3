"""``qwenvl-batch export OUT --documents docs.parquet``: an output written to one file, per document or per row.

The output folder is the truth, one row per page; ``--documents`` writes the document view
(:func:`qwenvl_batch.documents.document_view`: one row per document, answers joined in page order with page
spans, summed tokens and cost, failed pages), ``--rows`` the rows as they are. The file type follows the suffix:
``.parquet``, ``.csv`` or ``.jsonl``. Kept out of cli.py so the command is one line there.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:  # pandas loads only when a command uses it (`--version` stays fast)
    import pandas as pd

_WRITERS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl"}


def add_export(commands: argparse._SubParsersAction) -> None:
    """Register the ``export`` subcommand."""
    exp = commands.add_parser("export", help="write an output as one file: one row per document (--documents) or "
                                             "per row (--rows)")
    exp.add_argument("output", help="output folder written by 'run'")
    exp.add_argument("--documents", metavar="FILE",
                     help="one row per document ([documents] jobs): .parquet/.csv/.jsonl")
    exp.add_argument("--rows", metavar="FILE", help="every row as stored: .parquet/.csv/.jsonl")
    exp.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    if not args.documents and not args.rows:
        raise ConfigError("export: say what to write: --documents FILE (one row per document) and/or --rows FILE")
    for target, documents in ((args.documents, True), (args.rows, False)):
        if target:
            count = export(args.output, Path(target), documents=documents)
            print(f"wrote {target} ({count:,} {'document' if documents else 'row'}(s))")
    return 0


def export(output: str | Path, target: Path, *, documents: bool) -> int:
    """Write the output's rows (or documents) to ``target``; returns the number of rows written."""
    from .store import load_results

    kind = _WRITERS.get(target.suffix.lower())
    if kind is None:
        raise ConfigError(f"export: {target}: use a .parquet, .csv or .jsonl file name")
    if not Path(output).exists():
        raise ConfigError(f"export: {output} does not exist (give the [output] path of a job that has run)")
    frame = load_results(output, documents=documents)
    target.parent.mkdir(parents=True, exist_ok=True)
    _write(frame, target, kind)
    return len(frame)


def _write(frame: pd.DataFrame, target: Path, kind: str) -> None:
    tmp = target.with_name(target.name + ".tmp")
    if kind == "parquet":
        frame.to_parquet(tmp, index=False)
    elif kind == "csv":
        frame.to_csv(tmp, index=False)
    else:
        frame.to_json(tmp, orient="records", lines=True, date_format="iso")
    tmp.replace(target)  # a reader never sees half a file
