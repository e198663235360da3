"""Job file (TOML) + CLI overrides → one frozen, validated ``JobConfig``.

Why pydantic: a misspelt key in a job file must be an error, not a silently ignored setting that costs money
(``max_token = 50`` would otherwise send requests without a cap). ``extra="forbid"`` gives that for free, with
messages that name the key; ``openai`` already depends on pydantic, so it adds nothing to install.

Paths in a job file are relative to the job file's folder, so a job runs the same from any working directory.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .currency import split_cap
from .errors import ConfigError

if TYPE_CHECKING:
    from .media import ResizePolicy
    from .pricing import PriceTable

REGION_BASE_URLS: dict[str, str] = {
    "intl": "https://dashscope-intl.aliyuncs.com/compatible-mode/v1",  # Singapore
    "us": "https://dashscope-us.aliyuncs.com/compatible-mode/v1",  # Virginia
    "cn": "https://dashscope.aliyuncs.com/compatible-mode/v1",  # Beijing
}

SIMULATOR_API_KEY = "sk-simulator"
BATCH_CHAT_BASE_URL = "https://batch.dashscope.aliyuncs.com/compatible-mode/v1"  # Beijing only


class _Section(BaseModel):
    # allow_inf_nan=False: ``timeout_s = inf`` or ``nan`` is a config error naming the key, never a traceback later
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class InputConfig(_Section):
    """Where the manifest is and which of its columns matter."""

    path: Path
    id_column: str = "id"
    image_columns: tuple[str, ...] = ("image",)
    format: Literal["auto", "csv", "parquet", "jsonl", "webdataset", "wds", "images", "folder"] = "auto"

    @field_validator("path", mode="before")
    @classmethod
    def _list_as_braces(cls, value: Any) -> Any:
        """A list of files (tar shards, Parquet files) travels as one brace pattern: see inputs/patterns.py."""
        from .inputs.patterns import list_as_pattern

        return list_as_pattern(value) if isinstance(value, (list, tuple)) else value

    @field_validator("image_columns", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("image_columns")
    @classmethod
    def _not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("list at least one image column")
        return value


class SchemaConfig(_Section):
    """``[output.schema]``: answers as typed columns (structured.py). Exactly one of file / fields / model."""

    file: Path | None = None
    fields: dict[str, Any] | None = None
    model: str | None = None
    mode: Literal["auto", "json_schema", "json_object", "prompt"] = "auto"
    repair_attempts: int = Field(default=1, ge=0, le=3)  # bounded: a re-ask loop on bad JSON is a cost trap

    @model_validator(mode="after")
    def _one_source(self) -> SchemaConfig:
        given = [name for name in ("file", "fields", "model") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of file, fields or model" + (f" (got {', '.join(given)})"
                                                                             if given else ""))
        return self


class OutputConfig(_Section):
    """Where results go: a Parquet dataset folder (see store.py for the layout)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    path: Path
    answer_schema: SchemaConfig | None = Field(default=None, alias="schema")


class ModelConfig(_Section):
    """The endpoint and the sampling parameters: everything that decides what a request asks for."""

    name: str
    region: Literal["intl", "us", "cn"] | None = None
    base_url: str | None = None
    api_key_env: str = "DASHSCOPE_API_KEY"
    api_key_optional: bool = False
    stream: bool | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    extra_body: dict[str, Any] = Field(default_factory=dict)
    min_pixels: int | None = Field(default=None, ge=1)
    max_pixels: int | None = Field(default=None, ge=1)
    # realtime: one request per row; batch: the provider's Batch API (files + /batches, half price, hours);
    # batch-chat: the realtime runner against DashScope's Batch Chat host (see README 'Batch mode')
    mode: Literal["realtime", "batch", "batch-chat"] = "realtime"

    @model_validator(mode="after")
    def _endpoint(self) -> ModelConfig:
        if self.region and self.base_url:
            raise ValueError("set either region or base_url, not both")
        return self

    @property
    def endpoint(self) -> str:
        """The base URL requests go to (region default: intl, Singapore; Batch Chat: its Beijing host)."""
        if self.base_url:
            return self.base_url.rstrip("/")
        if self.mode == "batch-chat":
            return BATCH_CHAT_BASE_URL
        return REGION_BASE_URLS[self.region or "intl"]

    @property
    def high_resolution(self) -> bool:
        """Whether ``vl_high_resolution_images`` is on; it changes the token count per image."""
        return bool(self.extra_body.get("vl_high_resolution_images", False))

    @property
    def streams(self) -> bool:
        """Stream when asked, and always for stream-only models (QVQ, ``*-thinking``) unless told not to."""
        if self.stream is not None:
            return self.stream
        return is_stream_only(self.name) or bool(self.extra_body.get("enable_thinking", False))


class PromptConfig(_Section):
    """Templates filled from the row's columns with ``{column}``; ``{{`` and ``}}`` are literal braces."""

    system: str | None = None
    user: str = ""


class LimitsConfig(_Section):
    """How hard to push: concurrency, rate limits, retries, timeouts."""

    concurrency: int = Field(default=16, ge=1, le=4096)
    # Floors: below them a request would wait hours to be admitted, so the run would hang silently (rpm = 1e-9).
    requests_per_minute: float | None = Field(default=None, ge=1 / 60)  # at least one request an hour
    tokens_per_minute: float | None = Field(default=None, ge=100)  # one small image request (~100 tokens) a minute
    max_attempts: int = Field(default=6, ge=1, le=100)
    max_retry_time_s: float = Field(default=600.0, gt=0)
    timeout_s: float = Field(default=180.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    stream_idle_timeout_s: float = Field(default=60.0, gt=0)
    retry_initial_s: float = Field(default=1.0, ge=0)
    retry_max_s: float = Field(default=60.0, ge=0)
    grace_s: float = Field(default=10.0, ge=0)
    max_cost: float | None = Field(default=None, ge=0)
    max_cost_currency: str | None = None  # None: the currency the job's model and region are priced in
    http_client: Literal["auto", "httpx", "aiohttp"] = "auto"
    max_inflight_mb: float = Field(default=512.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _cap_with_currency(cls, data: Any) -> Any:
        """``max_cost = "50 CNY"`` → ``max_cost = 50``, ``max_cost_currency = "CNY"`` (see currency.split_cap)."""
        return split_cap(data) if isinstance(data, Mapping) else data


class ImagesConfig(_Section):
    """How local images are sent. ``resize = "auto"``: an image the provider would shrink is shrunk here first, to
    exactly the size the provider would use (so the tokens are the same) — 10-50x fewer bytes for big scans, at the
    cost of a resample and a re-encode (JPEG at ``jpeg_quality``, PNG for greyscale/palette pages when smaller).
    ``"off"`` sends the original file bytes."""

    resize: Literal["auto", "off"] = "auto"
    jpeg_quality: int = Field(default=90, ge=1, le=95)


class DocumentsConfig(_Section):
    """``[documents]`` (issue 12): PDFs and multi-page TIFFs become one row per page (see documents.py)."""

    pages: Literal["each", "all"] = "each"
    max_pages: int = Field(default=200, ge=1, le=100_000)
    max_dpi: float = Field(default=300.0, gt=0, le=1200)
    render_processes: int = Field(default=1, ge=1, le=64)


class PricingConfig(_Section):
    """Prices beyond the built-in table: a TOML file in the same format (see qwenvl_batch/prices.toml)."""

    file: Path | None = None


class BatchConfig(_Section):
    """``mode = "batch"``: how shards are cut, how long the provider may take, how often to look (batch/)."""

    completion_window: str = Field(default="24h", pattern=r"^[1-9][0-9]*[hd]$")
    max_lines_per_file: int | None = Field(default=None, ge=1)  # None: the provider's limit (50,000)
    max_file_mb: float | None = Field(default=None, gt=0)  # None: the provider's limit, less a margin
    poll_interval_s: float | None = Field(default=None, gt=0)  # None: 30 s (remote), 0.2 s (a loopback server)
    max_rounds: int = Field(default=3, ge=1, le=20)  # batches per row: expired/transient rows go again
    keep_files: bool = False
    fallback: Literal["none", "realtime"] = "none"


class RunOptions(_Section):
    """Per-invocation choices that are not part of the job's definition."""

    limit: int | None = Field(default=None, ge=1)
    retry_failed: bool = False
    rerun_changed: bool = False
    simulate: bool = False
    progress: Literal["auto", "bar", "lines", "off"] = "auto"


class JobConfig(_Section):
    """One validated job: the file's sections plus this run's options."""

    input: InputConfig
    output: OutputConfig
    model: ModelConfig
    prompt: PromptConfig = PromptConfig()
    limits: LimitsConfig = LimitsConfig()
    images: ImagesConfig = ImagesConfig()
    documents: DocumentsConfig | None = None  # issue 12
    pricing: PricingConfig = PricingConfig()
    batch: BatchConfig = BatchConfig()
    run: RunOptions = RunOptions()
    job_file: Path | None = None

    def api_key(self) -> str:
        """The key from the environment; never logged, never written."""
        if self.run.simulate:
            return SIMULATOR_API_KEY
        key = os.environ.get(self.model.api_key_env, "").strip() if self.model.api_key_env else ""
        if key:
            return key
        if self.model.api_key_optional:
            return "EMPTY"
        raise ConfigError(
            f"No API key: set the environment variable {self.model.api_key_env} "
            f"(export {self.model.api_key_env}=sk-...), or try the job without one using --simulate."
        )

    def price_table(self) -> PriceTable:
        """The built-in prices, extended or overridden by [pricing] file / --prices."""
        from .pricing import PriceTable

        table = PriceTable.builtin()
        return table.merged(PriceTable.from_file(self.pricing.file)) if self.pricing.file else table

    def resize_policy(self) -> ResizePolicy:
        """Client-side resizing for this job's model and pixel bounds (the same ones sent with each image)."""
        from .media import ResizePolicy

        return ResizePolicy.for_model(
            self.model.name, high_resolution=self.model.high_resolution, min_pixels=self.model.min_pixels,
            max_pixels=self.model.max_pixels, enabled=self.images.resize == "auto",
            jpeg_quality=self.images.jpeg_quality,
        )

    @property
    def endpoint_identity(self) -> str:
        """What the fingerprint records about where a row was answered (the simulator is not the service)."""
        if self.run.simulate:
            return "simulator"
        if self.model.mode == "batch-chat" and not self.model.base_url:
            return REGION_BASE_URLS["cn"]  # Batch Chat queues for the same Beijing models: the same answers
        return self.model.endpoint


def is_stream_only(model: str) -> bool:
    """QVQ and thinking-only models answer only streamed requests (provider doc, 'QVQ supports only streaming')."""
    name = model.lower()
    return name.startswith("qvq") or "thinking" in name


# CLI flag name -> (section, key); the CLI passes a dict of the flags the user set.
OVERRIDES: dict[str, tuple[str, str]] = {
    "input": ("input", "path"),
    "output": ("output", "path"),
    "model": ("model", "name"),
    "base_url": ("model", "base_url"),
    "api_key_env": ("model", "api_key_env"),
    "concurrency": ("limits", "concurrency"),
    "rpm": ("limits", "requests_per_minute"),
    "tpm": ("limits", "tokens_per_minute"),
    "max_attempts": ("limits", "max_attempts"),
    "timeout": ("limits", "timeout_s"),
    "max_cost": ("limits", "max_cost"),
    "prices": ("pricing", "file"),
    "limit": ("run", "limit"),
    "retry_failed": ("run", "retry_failed"),
    "rerun_changed": ("run", "rerun_changed"),
    "simulate": ("run", "simulate"),
    "progress": ("run", "progress"),
    "mode": ("model", "mode"),
    "fallback": ("batch", "fallback"),
    "keep_files": ("batch", "keep_files"),
}


def load_job(path: str | Path, overrides: Mapping[str, Any] | None = None) -> JobConfig:
    """Read a job file, apply overrides (CLI flags; ``None`` values are ignored) and validate."""
    job_path = Path(path)
    try:
        raw = tomllib.loads(job_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"Job file not found: {job_path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{job_path}: not valid TOML: {exc}") from None
    return job_from_dict(raw, base_dir=job_path.resolve().parent, overrides=overrides, job_file=job_path)


def job_from_dict(
    raw: Mapping[str, Any],
    *,
    base_dir: Path,
    overrides: Mapping[str, Any] | None = None,
    job_file: Path | None = None,
) -> JobConfig:
    """Build a JobConfig from a dict shaped like the TOML file (handy from a notebook)."""
    data = {section: dict(values) if isinstance(values, Mapping) else values for section, values in raw.items()}
    cwd_paths = _apply_overrides(data, overrides or {})
    where = str(job_file) if job_file else "job"
    try:
        job = JobConfig.model_validate({**data, "job_file": job_file})
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(where, exc)) from None
    return _resolve_paths(job, base_dir, cwd_paths)


def _apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> set[str]:
    """Put CLI values into their sections; returns the path keys given on the command line (relative to cwd)."""
    cwd_paths: set[str] = set()
    for flag, value in overrides.items():
        if value is None or value is False:  # a flag not given: the job file (or the default) stands
            continue
        if flag not in OVERRIDES:
            raise ConfigError(f"Unknown override {flag!r}")
        section, key = OVERRIDES[flag]
        data.setdefault(section, {})[key] = value
        if flag in ("input", "output", "prices"):
            cwd_paths.add(flag)
        if flag == "base_url":  # a URL given on the command line replaces the job file's region
            data[section].pop("region", None)
        if flag == "max_cost":  # --max-cost "50 CNY" replaces the job file's cap, its currency included
            data[section].pop("max_cost_currency", None)
    return cwd_paths


def _resolve_paths(job: JobConfig, base_dir: Path, cwd_paths: set[str]) -> JobConfig:
    """Job-file paths are relative to the job file; paths given as flags are relative to the working directory."""

    def resolve(path: Path, from_cli: bool) -> Path:
        if path.is_absolute():
            return path
        return (Path.cwd() / path) if from_cli else (base_dir / path)

    prices = job.pricing.file
    schema = job.output.answer_schema
    if schema is not None and schema.file is not None:  # always beside the job file, like its other paths
        schema = schema.model_copy(update={"file": resolve(schema.file, False)})
    return job.model_copy(
        update={
            "input": job.input.model_copy(update={"path": resolve(job.input.path, "input" in cwd_paths)}),
            "output": job.output.model_copy(update={"path": resolve(job.output.path, "output" in cwd_paths),
                                                    "answer_schema": schema}),
            "pricing": job.pricing.model_copy(
                update={"file": resolve(prices, "prices" in cwd_paths) if prices else None}),
        }
    )


def _describe_validation_error(where: str, exc: ValidationError) -> str:
    """One line per problem, naming the key as it is written in the job file."""
    lines = [f"{where}: invalid job file:"]
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{key}' (check the spelling; see README 'Job file')")
        elif err["type"] == "missing":
            lines.append(f"  - missing key '{key}'")
        else:
            lines.append(f"  - '{key}': {err['msg']}")
    return "\n".join(lines)


def check_override_names(overrides: Mapping[str, Any]) -> None:
    """A name that is not an override (a typo in a notebook) is a TypeError listing the known ones."""
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        names, known = ", ".join(map(repr, unknown)), ", ".join(sorted(OVERRIDES))
        raise TypeError(f"unknown job override(s) {names}; known: {known}")


def with_overrides(job: JobConfig, overrides: Mapping[str, Any]) -> JobConfig:
    """A copy of ``job`` with overrides applied, by the CLI flag names (``simulate=True``, ``limit=10``...).

    A name that is not an override is a TypeError (a typo in a notebook must not be silently ignored); a value
    the job file would refuse is a ConfigError. Paths given here are relative to the working directory.
    """
    check_override_names(overrides)
    if not overrides:
        return job
    data = job.model_dump(exclude={"job_file"})
    cwd_paths = _apply_overrides(data, overrides)
    where = str(job.job_file) if job.job_file else "job"
    try:
        updated = JobConfig.model_validate({**data, "job_file": job.job_file})
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(where, exc)) from None
    return _resolve_paths(updated, Path.cwd(), cwd_paths)
