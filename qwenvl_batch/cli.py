"""The ``qwenvl-batch`` command: parse → config → library call → render → exit code.

This is the one place where exceptions become messages and exit codes:

====  ==========================================================================================
0     the run finished (rows that ended in ``error`` are counted in the summary, not fatal)
1     the job stopped on a job-level error (bad key, quota, unknown model); re-run to continue
2     the job file, a flag or the manifest is wrong; nothing was sent
130   interrupted by Ctrl-C (SIGINT); 143: by SIGTERM. Committed results are kept; re-run to continue
====  ==========================================================================================
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .errors import ConfigError, Interrupted, JobError
from .redact import install_log_redaction, redact

EXIT_OK, EXIT_JOB, EXIT_CONFIG = 0, 1, 2


class _SubcommandParser(argparse.ArgumentParser):
    """Every subcommand also takes -v/--verbose, so it works before or after the subcommand's name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                          help="-v: retry decisions; -vv: HTTP too")


from .export import add_export  # noqa: E402  (issue 12)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenvl-batch",
        description="Run Qwen-VL (or any OpenAI-compatible vision model) over an image manifest into Parquet.",
    )
    parser.add_argument("--version", action="version", version=f"qwenvl-batch {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: retry decisions; -vv: HTTP too")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_SubcommandParser)
    _add_run(commands)
    _add_estimate(commands)
    _add_report(commands)
    _add_status(commands)
    _add_simulate(commands)
    _add_batches(commands)
    add_export(commands)  # export OUT --documents FILE (export.py)
    return parser


# Flags that override the job file: name -> add_argument keywords. `run` takes them all, `estimate` a subset.
_OVERRIDE_FLAGS: dict[str, dict[str, Any]] = {
    "--input": {"help": "manifest (CSV, Parquet or JSONL), relative to the current directory"},
    "--output": {"help": "output folder (Parquet dataset), relative to the current directory"},
    "--model": {"help": "model name, e.g. qwen3-vl-flash"},
    "--base-url": {"help": "OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (replaces region)"},
    "--api-key-env": {"help": "environment variable that holds the API key (default DASHSCOPE_API_KEY)"},
    "--concurrency": {"type": int, "help": "requests in flight at once"},
    "--rpm": {"type": float, "help": "requests-per-minute limit"},
    "--tpm": {"type": float, "help": "tokens-per-minute limit (prompt + completion)"},
    "--max-attempts": {"type": int, "help": "attempts per row before it is recorded as an error"},
    "--timeout": {"type": float, "help": "total seconds allowed for one request attempt"},
    "--limit": {"type": int, "metavar": "N", "help": "only the first N rows of the manifest"},
    "--max-cost": {"metavar": "AMOUNT",
                   "help": 'spend cap for the output (all runs together), e.g. 25 or "180 CNY"; a bare number is in '
                           "the currency the model is priced in (see README 'Cost')"},
    "--prices": {"metavar": "FILE", "help": "price file that extends/overrides the built-in prices"},
    "--retry-failed": {"action": "store_true", "help": "send rows that ended in 'error' again"},
    "--rerun-changed": {"action": "store_true",
                        "help": "redo rows whose prompt, model or parameters changed since they were done"},
    "--simulate": {"action": "store_true",
                   "help": "answer from the built-in simulator on 127.0.0.1 (no key, no cost, not real answers)"},
    "--progress": {"choices": ["auto", "bar", "lines", "off"],
                   "help": "progress display (auto: a bar on a terminal, a line every 5 s otherwise)"},
    # README 'Batch mode'
    "--mode": {"choices": ["realtime", "batch", "batch-chat"],
               "help": "realtime requests, the provider's Batch API (half price, hours), or Batch Chat"},
    "--fallback": {"choices": ["none", "realtime"],
                   "help": "mode = batch: send rows still pending after the batches (expired) in realtime"},
    "--keep-files": {"action": "store_true",
                     "help": "mode = batch: keep the uploaded and result files at the provider"},
}


def _add_overrides(parser: argparse.ArgumentParser, flags: Sequence[str]) -> None:
    for flag in flags:
        parser.add_argument(flag, **_OVERRIDE_FLAGS[flag])


def _overrides(args: argparse.Namespace, flags: Sequence[str]) -> dict[str, Any]:
    """The override flags as config.load_job expects them (dest names; unset flags are None/False)."""
    return {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag in flags}


_ESTIMATE_FLAGS = ["--input", "--model", "--concurrency", "--rpm", "--tpm", "--limit", "--prices", "--mode"]


def _add_run(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run", help="run a job (resumes: rows already done are not sent again)",
        description="Run a job file. Re-running the same command resumes: rows already 'ok' are not sent again.",
    )
    run.add_argument("job", help="job file (TOML), e.g. jobs/caption.toml")
    _add_overrides(run, list(_OVERRIDE_FLAGS))
    # issue 15: on a Ray cluster (pip install "qwenvl-batch[ray]"; README "Beyond one machine: Ray")
    run.add_argument("--ray", action="store_true", help="run the job in shards on a Ray cluster (one rate limit, "
                                                        "same per-row resume); needs the [ray] extra")
    run.add_argument("--ray-address", metavar="ADDR", help="the cluster to join (auto, ray://HOST:10001); without "
                                                           "it a local Ray cluster is started for the run")
    run.add_argument("--workers", type=int, default=2, metavar="N", help="shards (Ray workers) for --ray (default 2)")
    run.set_defaults(handler=_cmd_run)


def _add_simulate(commands: argparse._SubParsersAction) -> None:
    sim = commands.add_parser(
        "simulate", help="start the built-in DashScope-compatible SIMULATOR (for demos, tests, benchmarks)",
        description="Serve a simulated Model Studio OpenAI-compatible endpoint on 127.0.0.1. Not the real service.",
    )
    sim.add_argument("--port", type=int, default=8000, help="port (0: pick a free one)")
    sim.add_argument("--latency", type=float, default=0.0, help="base latency per request, seconds")
    sim.add_argument("--latency-dist", choices=["fixed", "uniform", "lognormal"], default="fixed",
                     help="lognormal: heavy-tailed around --latency, like the real service")
    sim.add_argument("--latency-max", type=float, default=60.0, help="cap on one request's latency, seconds")
    sim.add_argument("--rpm", type=float, help="enforce a requests-per-minute limit (429 limit_requests)")
    sim.add_argument("--tpm", type=float, help="enforce a tokens-per-minute limit (429 insufficient_quota)")
    sim.add_argument("--fail-500-rate", type=float, default=0.0, help="share of requests answered 500")
    sim.add_argument("--fail-503-rate", type=float, default=0.0, help="share of requests answered 503")
    sim.add_argument("--drop-rate", type=float, default=0.0, help="share of connections dropped")
    sim.add_argument("--hang-rate", type=float, default=0.0, help="share of requests never answered")
    sim.add_argument("--truncate-rate", type=float, default=0.0, help="share of streams cut short")
    sim.add_argument("--persona", default="dashscope",
                     choices=["dashscope", "vllm", "llamacpp", "llamacpp-noimage", "litellm", "litellm-retrying"],
                     help="answer like another server (error bodies, usage, streams; README 'Other servers')")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--request-log", help="append one JSON line per request to this file")
    sim.set_defaults(handler=_cmd_simulate)


def _add_estimate(commands: argparse._SubParsersAction) -> None:
    est = commands.add_parser(
        "estimate", help="tokens, cost range and wall time of a job, before anything is sent",
        description="Estimate a job from the manifest and image headers only: nothing is sent, nothing is written.",
    )
    est.add_argument("job", help="job file (TOML), e.g. jobs/caption.toml")
    _add_overrides(est, _ESTIMATE_FLAGS)
    est.add_argument("--typical-completion-tokens", type=int, metavar="N",
                     help="answer length behind the low cost (default: min(max_tokens, 150), a short caption; "
                          "raise it for OCR or long answers)")
    est.add_argument("--latency", type=float, default=3.0, metavar="SECONDS",
                     help="assumed seconds per request, for the concurrency bound on wall time (default 3)")
    est.add_argument("--format", choices=["text", "json"], default="text")
    est.add_argument("--json", dest="format", action="store_const", const="json", help="same as --format json")
    est.set_defaults(handler=_cmd_estimate)


def _add_report(commands: argparse._SubParsersAction) -> None:
    rep = commands.add_parser("report", help="summarise an output folder (works on interrupted runs too)")
    rep.add_argument("output", help="output folder written by 'run'")
    rep.add_argument("--format", choices=["text", "markdown", "json", "csv", "html"], default="text",
                     help="html: one self-contained page with charts, on stdout (or see --html)")
    rep.add_argument("--by", metavar="COLUMN", help="group every figure by this manifest column")
    # issue 16: the HTML report and the one-screen status
    rep.add_argument("--html", metavar="FILE", help="write the HTML report (charts and tables) to FILE")
    rep.add_argument("--job", metavar="JOB", help="the job file: counts pending rows and projects time and cost to "
                                                  "the end of its manifest")
    rep.add_argument("--brief", action="store_true", help="the one-screen status instead (as 'status')")
    rep.set_defaults(handler=_cmd_report)


def _add_status(commands: argparse._SubParsersAction) -> None:
    st = commands.add_parser(
        "status", help="one screen on a (running) output: done/pending, rate, ETA, spend, last errors",
        description="One screen on an output, fast even for 10^6 rows, safe beside a running job (takes no lock).",
    )
    st.add_argument("output", help="output folder written by 'run'")
    st.add_argument("--job", metavar="JOB", help="the job file: counts pending rows against its manifest, for the "
                                                 "ETA and the projected spend")
    st.add_argument("--watch", type=float, metavar="N", help="redraw every N seconds until Ctrl-C")
    st.set_defaults(handler=_cmd_status)


def _cmd_run(args: argparse.Namespace) -> int:
    from .api import run_job
    from .config import load_job

    job = load_job(args.job, _overrides(args, list(_OVERRIDE_FLAGS)))
    if job.run.simulate:
        print("qwenvl-batch: --simulate: answers come from the built-in SIMULATOR, not the real service",
              file=sys.stderr)
    if (args.ray_address or args.workers != 2) and not args.ray:
        raise ConfigError("--ray-address and --workers go with --ray (run the job on a Ray cluster)")
    try:
        summary = _run_on_ray(job, args) if args.ray else run_job(job)
    except JobError as exc:
        _print_summary(exc.summary)
        print(f"\nqwenvl-batch: stopped: {redact(str(exc))}", file=sys.stderr)  # issue 18: no secret on screen
        print(f"Committed results are kept in {job.output.path}. To continue, fix the cause and run again:\n"
              f"  {_rerun_command()}", file=sys.stderr)
        if isinstance(exc, Interrupted):
            return 128 + exc.signum
        return EXIT_JOB
    _print_summary(summary)
    return EXIT_OK


def _run_on_ray(job: Any, args: argparse.Namespace) -> Any:
    try:
        from .ray import run_job_on_ray
    except ImportError as exc:
        raise ConfigError(f"--ray: {exc}") from None
    return run_job_on_ray(job, address=args.ray_address, workers=args.workers)


def _print_summary(summary: object | None) -> None:
    lines = getattr(summary, "lines", None)
    if lines is not None:
        print(redact("\n".join(lines())))


def _rerun_command() -> str:
    return redact(" ".join(shlex.quote(part) for part in ["qwenvl-batch", *sys.argv[1:]]))  # no password echoed


def _add_batches(commands: argparse._SubParsersAction) -> None:
    bat = commands.add_parser("batches", help="list (or --cancel) the Batch API batches of an output",
                              description="The batches of an output run with mode = batch: state and counts.")
    bat.add_argument("output", help="output folder written by 'run' with mode = batch")
    bat.add_argument("--cancel", action="store_true",
                     help="cancel every unfinished batch (lines already answered are still billed)")
    bat.add_argument("--api-key-env", default="DASHSCOPE_API_KEY", help="variable holding the API key")
    bat.set_defaults(handler=_cmd_batches)


def _cmd_batches(args: argparse.Namespace) -> int:
    from .batch import cancel_batches, list_batches

    lines = (cancel_batches if args.cancel else list_batches)(args.output, api_key_env=args.api_key_env)
    for line in lines:
        print(line.text())
    if args.cancel:
        print("cancel requested: lines answered before the cancel are kept and billed; run the job again to "
              "journal them and submit the rest")
    return EXIT_OK


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .simulator import SimulatorConfig, serve

    config = SimulatorConfig(
        latency_s=args.latency, latency_dist=args.latency_dist, latency_max_s=args.latency_max,
        requests_per_minute=args.rpm,
        tokens_per_minute=args.tpm, fail_500_rate=args.fail_500_rate, fail_503_rate=args.fail_503_rate,
        drop_rate=args.drop_rate, hang_rate=args.hang_rate, truncate_rate=args.truncate_rate, seed=args.seed,
        request_log=args.request_log, persona=args.persona,
    )
    try:
        serve(config, port=args.port)
    except OSError as exc:
        raise ConfigError(f"cannot listen on 127.0.0.1:{args.port} ({exc.strerror or exc}); the port is taken? "
                          "choose another with --port N (0 picks a free one)") from None
    return EXIT_OK


def _cmd_estimate(args: argparse.Namespace) -> int:
    from .config import load_job
    from .estimate import estimate_job, render_estimate

    job = load_job(args.job, _overrides(args, _ESTIMATE_FLAGS))
    estimate = estimate_job(job, prices=job.price_table(), typical_completion_tokens=args.typical_completion_tokens,
                            assumed_latency_s=args.latency)
    print(render_estimate(estimate, args.format))
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import render, summarize_output

    if args.brief:
        return _cmd_status(argparse.Namespace(output=args.output, job=args.job, watch=None))
    if args.html or args.format == "html":
        return _report_html(args)
    print(render(summarize_output(args.output, by=args.by), args.format))  # a part at a time: 10^7 rows fit
    return EXIT_OK


def _manifest_rows(job_file: str | None) -> int | None:
    from .config import load_job
    from .status import manifest_rows

    return manifest_rows(load_job(job_file)) if job_file else None


def _report_html(args: argparse.Namespace) -> int:
    from .report_html import render_output_html
    from .status import writer_state
    from .store import open_for_reading

    page = render_output_html(args.output, by=args.by, total=_manifest_rows(args.job),
                              writer=writer_state(open_for_reading(args.output)))
    if not args.html:
        sys.stdout.write(page)
        return EXIT_OK
    try:
        with open(args.html, "w", encoding="utf-8") as handle:
            handle.write(page)
    except OSError as exc:
        raise ConfigError(f"cannot write the HTML report to {args.html} ({exc.strerror or exc}); choose another "
                          "--html FILE") from None
    print(f"wrote {args.html} ({len(page.encode()) / 1024:,.0f} KB; open it in any browser, it needs no network)")
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    from .status import read_status, render_status, watch

    total = _manifest_rows(args.job)
    if args.watch is None:
        print(render_status(read_status(args.output, total=total)))
        return EXIT_OK
    if args.watch <= 0:
        raise ConfigError(f"--watch {args.watch:g}: give a number of seconds above 0, e.g. --watch 10")
    try:
        watch(lambda: read_status(args.output, total=total), args.watch)
    except KeyboardInterrupt:  # Ctrl-C is how a watch ends
        pass
    return EXIT_OK


def _configure_logging(verbose: int) -> None:
    """Warnings from everything; -v: this project's debug lines only; -vv: the HTTP stack's too (never Pillow's)."""
    install_log_redaction()  # issue 18: keys and URL credentials never reach a log line
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_qwenvl_batch", False)]:
        root.removeHandler(old)  # main() called again in one process (tests, a notebook): one handler, not two
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler._qwenvl_batch = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("qwenvl_batch").setLevel(logging.DEBUG if verbose else logging.NOTSET)
    for chatty in ("httpx", "httpcore", "httpx2", "httpcore2", "openai", "aiohttp.client"):  # openai>=3: httpx2
        logging.getLogger(chatty).setLevel(logging.DEBUG if verbose >= 2 else logging.NOTSET)  # reset after -vv


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"qwenvl-batch: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `qwenvl-batch report ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
