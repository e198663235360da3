"""``qwenvl-batch status OUT``: one screen on a job that may be running for days — is it still going, how fast,
what is failing, what will it cost.

Fast on big outputs (10^7 rows in a few seconds and a few hundred MB, see ``benchmarks/scale_read.py``): it reads
only the few columns it shows, a part at a time (``output_scan.newest_rows``), never the responses, keeps running
totals, and takes no lock, so it can run every few seconds beside the writer. Rows are de-duplicated by id
(newest wins) exactly as ``load_results`` does, so its counts are the counts ``report`` prints.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import JobConfig
from .errors import ConfigError
from .manifest import open_manifest
from .output_scan import newest_rows
from .store import OutputStore, open_for_reading, state_dir_for
from .timeline import RECENT_WINDOW_S, eta_s, projected

__all__ = ["ErrorLine", "Status", "manifest_rows", "read_status", "render_status", "watch"]

_COLUMNS = ["status", "error_type", "error_code", "error_message", "finished_at", "cost", "currency", "simulated"]
_LAST_ERRORS = 5
_MESSAGE_CHARS = 160


@dataclass(frozen=True)
class ErrorLine:
    """One of the most recent errors, for the status screen."""

    finished_at: float | None
    row_id: str
    error_type: str
    error_code: str
    message: str


@dataclass(frozen=True)
class Status:
    """What ``status`` shows, as data (tests compare it with ``report``'s summary)."""

    output: Path
    now: float  # epoch seconds
    ok: int
    error: int
    total: int | None  # manifest rows (after --limit), when the job file was given
    first: float | None  # first and last finished_at, epoch seconds
    last: float | None
    rate_per_min: float  # over the last RECENT_WINDOW_S seconds
    spend: dict[str, float] = field(default_factory=dict)  # per currency, never added across currencies
    simulated: int = 0
    last_errors: list[ErrorLine] = field(default_factory=list)
    writer: str = ""

    @property
    def done(self) -> int:
        return self.ok + self.error

    @property
    def pending(self) -> int | None:
        return None if self.total is None else max(self.total - self.done, 0)

    @property
    def eta_s(self) -> float | None:
        return None if self.pending is None else eta_s(self.pending, self.rate_per_min)

    def projected_spend(self) -> dict[str, float]:
        """Spend per currency once every manifest row is done, at the cost per done row so far."""
        out = {}
        for currency, amount in self.spend.items():
            value = projected(amount, self.done, self.total)
            if value is not None:
                out[currency] = value
        return out


def manifest_rows(job: JobConfig) -> int:
    """Rows the job will process: the manifest's row count (Parquet: from its footer; CSV/JSONL: one pass over the
    id column only), capped by ``--limit``."""
    manifest = open_manifest(job.input.path, job.input.format)
    if job.documents is not None:  # issue 12: documents count as their pages (listed from page sizes, not rendered)
        from .documents import for_documents

        job, manifest = for_documents(job, manifest)
        rows = sum(batch.num_rows for batch in manifest.batches(65_536, columns=[job.input.id_column]))
    elif manifest.format == "parquet":
        rows = pq.ParquetFile(manifest.path).metadata.num_rows
    else:
        rows = sum(batch.num_rows for batch in manifest.batches(65_536, columns=[job.input.id_column]))
    return min(rows, job.run.limit) if job.run.limit else rows


def read_status(output: str | Path, *, total: int | None = None, now: float | None = None) -> Status:
    """The status of an output (finished, interrupted or being written), from a column-subset pass over it,
    one part at a time (memory does not grow with the output: running totals, and the newest few errors)."""
    path = Path(output)
    if not path.exists() and not state_dir_for(path).exists():
        raise ConfigError(f"{path}: no such output (yet): check the path, or start the job with "
                          "`qwenvl-batch run JOB` (the output is the job file's [output] path)")
    store = open_for_reading(path)
    now = time.time() if now is None else now
    tally = _Tally(now)
    for table in newest_rows(store, [store.id_column, *_COLUMNS]):
        tally.add(table, store.id_column)
    return Status(
        output=Path(output),
        now=now,
        ok=tally.ok,
        error=tally.error,
        total=total,
        first=tally.first,
        last=tally.last,
        rate_per_min=tally.rate_per_min(),
        spend=tally.spend,
        simulated=tally.simulated,
        last_errors=[error for _, _, error in sorted(tally.errors, key=lambda e: (e[0], e[1]), reverse=True)],
        writer=writer_state(store),
    )


class _Tally:
    """Running totals over the tables of ``newest_rows``: counts, first/last time, rows in the recent window
    (what ``timeline.recent_rate_per_min`` counts), spend per currency, and the ``_LAST_ERRORS`` newest errors."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.ok = self.error = self.simulated = self.recent = self.position = 0
        self.first: float | None = None
        self.last: float | None = None
        self.spend: dict[str, float] = {}
        self.errors: list[tuple[float, int, ErrorLine]] = []  # (time or -inf, position, line): newest kept

    def add(self, table: pa.Table, id_column: str) -> None:
        status = table.column("status")
        times = _epoch(table.column("finished_at"))
        finite = times[np.isfinite(times)]
        self.ok += _count(pc.equal(status, "ok"))
        self.error += _count(pc.equal(status, "error"))
        self.simulated += _count(table.column("simulated"))
        if finite.size:
            low, high = float(finite.min()), float(finite.max())
            self.first = low if self.first is None else min(self.first, low)
            self.last = high if self.last is None else max(self.last, high)
            since = self.now - RECENT_WINDOW_S
            self.recent += int(np.count_nonzero((finite > since) & (finite <= self.now)))
        if table.num_rows:
            from .currency import add_spend

            add_spend(self.spend, table.column("cost"), table.column("currency"))
        self._newest_errors(table, id_column, times)
        self.position += table.num_rows

    def _newest_errors(self, table: pa.Table, id_column: str, times: np.ndarray) -> None:
        """Keep the ``_LAST_ERRORS`` newest error rows (ties: the later row first), messages read for those only."""
        is_error = pc.fill_null(pc.equal(table.column("status"), "error"), False).to_numpy(zero_copy_only=False)
        where = np.flatnonzero(is_error)
        if where.size == 0:
            return
        keyed = np.where(np.isfinite(times[where]), times[where], -np.inf)
        for j in np.argsort(keyed, kind="stable")[::-1][:_LAST_ERRORS].tolist():
            i = int(where[j])
            row = table.slice(i, 1).to_pylist()[0]
            line = ErrorLine(
                finished_at=float(times[i]) if np.isfinite(times[i]) else None,
                row_id=str(row[id_column]),
                error_type=str(row["error_type"] or "(missing)"),
                error_code=str(row["error_code"] or "(missing)"),
                message=_one_line(str(row["error_message"] or "")),
            )
            self.errors.append((float(keyed[j]), self.position + i, line))
        self.errors = sorted(self.errors, key=lambda e: (e[0], e[1]), reverse=True)[:_LAST_ERRORS]

    def rate_per_min(self) -> float:
        """As ``timeline.recent_rate_per_min`` over all the times, from the counts kept."""
        if self.first is None:
            return 0.0
        span = min(RECENT_WINDOW_S, self.now - self.first)
        return self.recent * 60.0 / span if span > 0 else 0.0


def _count(mask: pa.ChunkedArray | pa.Array) -> int:
    return int(pc.sum(pc.fill_null(mask, False).cast(pa.int64())).as_py() or 0)


def _epoch(column: pa.ChunkedArray) -> np.ndarray:
    """A timestamp column as float epoch seconds (NaN for nulls)."""
    if column.num_chunks == 0 or len(column) == 0:
        return np.empty(0, "float64")
    micros = pc.cast(pc.cast(column, pa.timestamp("us", tz="UTC"), safe=False), pa.int64())
    return micros.to_numpy(zero_copy_only=False).astype("float64") / 1e6


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 1].rstrip() + "…"


def writer_state(store: OutputStore) -> str:
    """Whether a run is writing this output now: the state folder's lock file names the run that last took it,
    and Linux's /proc/locks says whether the lock is held (read without taking it: a reader must never make a
    run that is starting fail with "output in use")."""
    lock = store.state_dir / "lock"
    try:
        holder = lock.read_text(encoding="utf-8").strip()
    except OSError:
        return "no run has written this output with a lock (an output of an older version, or a copy)"
    held = _flock_held(lock)
    if held is None:
        host = holder.rsplit(" on ", 1)[-1] if " on " in holder else ""
        if host and host != socket.gethostname():
            return f"unknown: the lock names {holder} (another machine)"
        pid = holder.split()[1] if holder.startswith("process ") else ""
        held = pid.isdigit() and _alive(int(pid))
    return f"running ({holder})" if held else f"not running (the last run was {holder or 'unknown'})"


def _flock_held(path: Path) -> bool | None:
    """True/False from /proc/locks (Linux: lists every flock by device and inode); None where it cannot tell."""
    try:
        info = path.stat()
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    return any(wanted in line.split() and "FLOCK" in line for line in lines)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------- render


def _clock(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3 h 05 min``, ``2 d 04 h``: as precise as a person reading an ETA needs."""
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours:02d} h"


def _money(amount: float) -> str:
    return f"{amount:,.4f}"


def render_status(status: Status) -> str:
    """The status screen (about 15 lines: fits a phone's terminal)."""
    lines = [f"qwenvl-batch status: {status.output}   ({_clock(status.now)})"]
    if status.simulated:
        lines.append(f"SIMULATED: {status.simulated:,} row(s) were answered by the built-in simulator (--simulate), "
                     "not the real service")
    lines.append(f"Run:      {status.writer}")
    lines.append("Rows:     " + _rows_line(status))
    lines.append("Rate:     " + _rate_line(status))
    lines.append("ETA:      " + _eta_line(status))
    lines += _spend_lines(status)
    if status.last_errors:
        lines.append("Last errors (newest first):")
        for e in status.last_errors:
            when = time.strftime("%m-%d %H:%M:%S", time.gmtime(e.finished_at)) if e.finished_at else "?"
            lines.append(f"  {when}  {e.row_id}  {e.error_type}/{e.error_code}  {e.message}")
    else:
        lines.append("Last errors: none")
    return "\n".join(lines)


def _rows_line(s: Status) -> str:
    counts = f"ok {s.ok:,} · error {s.error:,}"
    if s.total is None:
        return f"{s.done:,} done ({counts}); pending unknown: pass --job JOB to count the manifest"
    share = s.done / s.total * 100 if s.total else 100.0
    return f"{s.done:,} of {s.total:,} done ({share:.1f} %): {counts} · pending {s.pending:,}"


def _rate_line(s: Status) -> str:
    recent = f"{s.rate_per_min:,.1f} rows/min over the last {RECENT_WINDOW_S / 60:.0f} min"
    if s.first is None or s.last is None:
        return "no row has finished yet"
    span = s.last - s.first
    whole = f"{s.done / (span / 60):,.1f} rows/min over {duration(span)}" if span > 0 else f"{s.done:,} row(s)"
    idle = s.now - s.last
    note = f"; last row finished {duration(idle)} ago" if idle > 60 else ""
    return f"{recent} (whole run: {whole}){note}"


def _eta_line(s: Status) -> str:
    if s.pending is None:
        return "unknown without --job JOB (the manifest's size)"
    if s.pending == 0:
        return "done: no manifest row is pending"
    if s.eta_s is None:
        return f"unknown: {s.pending:,} pending and no row finished in the last {RECENT_WINDOW_S / 60:.0f} min"
    return f"{duration(s.eta_s)} (about {_clock(s.now + s.eta_s)}) at the current rate"


def _spend_lines(s: Status) -> list[str]:
    if not s.spend:
        return ["Spend:    none recorded (no priced rows yet)"]
    projected_spend = s.projected_spend()
    lines = []
    for i, (currency, amount) in enumerate(sorted(s.spend.items())):
        line = f"{_money(amount)} {currency} so far"
        if currency in projected_spend and s.pending:
            line += f", projected {_money(projected_spend[currency])} {currency} for all {s.total:,} rows"
        lines.append(("Spend:    " if i == 0 else "          ") + line)
    if len(s.spend) > 1:
        lines.append("          (currencies are never added up or converted)")
    return lines


def watch(read: Callable[[], Status], every_s: float, out: TextIO = sys.stdout,
          sleep: Callable[[float], None] = time.sleep, rounds: int | None = None) -> None:
    """Redraw the status every ``every_s`` seconds until Ctrl-C (or ``rounds`` redraws, for tests)."""
    done = 0
    while rounds is None or done < rounds:
        text = render_status(read())
        if out.isatty():
            out.write("\x1b[H\x1b[2J")
        out.write(text + f"\n(refreshing every {every_s:g} s; Ctrl-C to stop)\n\n")
        out.flush()
        done += 1
        if rounds is None or done < rounds:
            sleep(every_s)
