"""Structured output: ``[output.schema]`` → how the request asks for JSON, how the answer is parsed, validated and
repaired, and the typed columns it becomes.

Modes (``mode = "auto"`` picks per endpoint and model; next-phase-facts.md §4):

* ``json_schema``: ``response_format = {"type": "json_schema", ...}`` — servers with grammar-constrained decoding
  (vLLM, SGLang, OpenAI, LiteLLM in front of them): an endpoint that is not Model Studio, serving a model that is
  not named like a Model Studio model (a proxy in front of Model Studio follows Model Studio's rules).
* ``json_object``: ``response_format = {"type": "json_object"}`` plus the schema in the prompt — Model Studio's
  Qwen3-VL and Qwen-VL-Max/Plus families. The word "JSON" is always in the prompt (Model Studio refuses
  ``json_object`` without it). Refused with thinking on (Model Studio: "Json mode response is not supported when
  enable_thinking is true").
* ``prompt``: the schema in the prompt only — models without JSON mode: ``qwen-vl-ocr`` (with its documented
  key-information-extraction prompt and a value template), Qwen2.5-VL, QVQ and thinking models.

How it plugs in: ``sending_job`` returns the job as it is sent — the schema instruction appended to the user
prompt, ``response_format`` in ``extra_body`` — so the fingerprint (resume, ``--rerun-changed``), the token
estimate and the requests all see the schema without a second code path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa

from . import answer_schema as schemas
from .answer_schema import AnswerSchema, SchemaError
from .config import JobConfig, is_stream_only
from .errors import ConfigError

ANSWER_PREFIX = "answer."
# Result columns a job with [output.schema] adds (store.py keeps them apart from the manifest's columns).
STRUCTURED_FIELDS: list[pa.Field] = [
    pa.field("answer_json", pa.string()),  # the JSON text the model wrote (fences and prose around it removed)
    pa.field("parse_error", pa.string()),  # null when the answer is valid
    pa.field("repairs", pa.int32()),  # re-asks sent after an invalid answer (each one billed)
    pa.field("repair_cost", pa.float64()),  # their cost, included in ``cost``
]
STRUCTURED_COLUMNS = frozenset(f.name for f in STRUCTURED_FIELDS)
OCR_MAX_DEPTH = 3  # qwen-vl-ocr's key-information extraction takes schemas of at most 3 levels

KIE_PROMPT = (
    "Assume you are an information extraction expert. You are given a JSON schema. Fill the value part of this "
    "schema with information from the image. Only output valid JSON. What You See Is What You Get. Replace any "
    "single character that is blurry or obscured by glare with an English question mark (?). If there is no "
    "corresponding value, fill it with null. No explanation is needed. The content of the input JSON schema is as "
    "follows: "
)  # qwen-vl-ocr's key_information_extraction prompt (qwen-vl-facts.md §8), for OpenAI-compatible mode
JSON_PROMPT = ("Answer with only a JSON object, no prose and no code fences. It must match this JSON Schema "
               "(use null where the image does not show a value): ")
REPAIR_PROMPT = ("Your previous answer could not be used: {error}.\nYour previous answer was:\n{answer}\n"
                 "Answer again with only the corrected JSON object, nothing else.")
REPAIR_QUOTE_CHARS = 2000


def is_answer_column(name: str) -> bool:
    """Whether an output column belongs to the structured answer (store.py's schema checks use it)."""
    return name in STRUCTURED_COLUMNS or name.startswith(ANSWER_PREFIX)


@dataclass(frozen=True)
class Checked:
    """An answer checked against the schema: ``value`` (converted for Arrow) when valid, else ``error``."""

    value: dict[str, Any] | None
    answer_json: str | None
    error: str | None
    code: str | None  # invalid_json | schema_mismatch

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Structured:
    """A job's resolved structured-output settings."""

    schema: AnswerSchema
    mode: str
    reason: str  # why this mode (shown by estimate/summary)
    repair_attempts: int
    ocr: bool

    # -- what is sent -------------------------------------------------------------------------------------
    def instruction(self) -> str:
        """The text appended to the user prompt."""
        if self.ocr and self.mode == "prompt":
            return KIE_PROMPT + json.dumps(self.schema.root.template(), ensure_ascii=False)
        if self.mode == "json_schema":
            return "Answer in JSON, following the response format's schema."
        return JSON_PROMPT + json.dumps(self.schema.root.json_schema(), ensure_ascii=False)

    def repair_prompt_tokens(self, max_tokens: int | None) -> int:
        """Extra prompt tokens of a re-ask at most: the note, the error and the quoted answer (≤ 2,000 chars)."""
        from .tokens import text_tokens

        quoted = min(max_tokens or REPAIR_QUOTE_CHARS, REPAIR_QUOTE_CHARS)  # a token is at least one character
        return text_tokens(REPAIR_PROMPT) + 100 + quoted

    def response_format(self) -> dict[str, Any] | None:
        if self.mode == "json_object":
            return {"type": "json_object"}
        if self.mode == "json_schema":
            return {"type": "json_schema",
                    "json_schema": {"name": "answer", "schema": self.schema.root.json_schema(), "strict": True}}
        return None

    def repair_messages(self, messages: list[dict[str, Any]], answer: str, error: str) -> list[dict[str, Any]]:
        """The same request with the problem appended as one more text part of the user message (one turn:
        qwen-vl-ocr answers only the latest question, so a conversation would not work there)."""
        quoted = answer if len(answer) <= REPAIR_QUOTE_CHARS else answer[:REPAIR_QUOTE_CHARS] + " [...]"
        note = {"type": "text", "text": REPAIR_PROMPT.format(error=error, answer=quoted)}
        out = [dict(m) for m in messages]
        last = out[-1]
        content = last.get("content")
        last["content"] = [*content, note] if isinstance(content, list) else [
            {"type": "text", "text": str(content or "")}, note]
        return out

    # -- what comes back ----------------------------------------------------------------------------------
    def check(self, text: str, finish_reason: str | None = None) -> Checked:
        """Parse (tolerating code fences and prose around the object; not repairing broken JSON), validate, and
        convert for Arrow."""
        found = extract_json(text)
        cut = " (the answer was cut at max_tokens: raise [model] max_tokens)" if finish_reason == "length" else ""
        if isinstance(found, str):
            return Checked(None, None, found + cut, "invalid_json")
        value, raw = found
        problems = self.schema.root.errors(value)
        if not problems and self.schema.model is not None:
            problems = _model_problems(self.schema.model, value)
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            return Checked(None, raw, "does not match the schema: " + "; ".join(problems[:3]) + more + cut,
                           "schema_mismatch")
        return Checked(self.schema.root.to_arrow(value), raw, None, None)

    # -- columns ------------------------------------------------------------------------------------------
    def answer_fields(self) -> list[pa.Field]:
        """One typed column per top-level field (``answer.<name>``), then the structured result columns."""
        fields = [pa.field(ANSWER_PREFIX + name, node.arrow_type()) for name, node in self.schema.root.properties]
        return fields + STRUCTURED_FIELDS

    def columns(self, checked: Checked) -> dict[str, Any]:
        """The answer's column values (all null when it is not valid)."""
        value = checked.value or {}
        out = {ANSWER_PREFIX + name: value.get(name) for name, _ in self.schema.root.properties}
        out.update(answer_json=checked.answer_json, parse_error=checked.error)
        return out


_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)


def extract_json(text: str) -> tuple[Any, str] | str:
    """The first JSON object in ``text``: (value, its text), or a message saying why there is none.

    Tolerated: a code fence around it, prose before or after it. Not tolerated (not silently "fixed"): trailing
    commas, single quotes, comments — an answer repaired by guessing could be wrong in ways nobody sees."""
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    start = body.find("{")
    if start < 0:
        preview = " ".join(text.split())[:80]
        return f"no JSON object in the answer (it begins {preview!r})" if preview else "the answer is empty"
    decoder = json.JSONDecoder()
    try:
        value, end = decoder.raw_decode(body, start)
    except json.JSONDecodeError as exc:
        return f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    if not isinstance(value, dict):
        return "the answer is not a JSON object"
    return value, body[start:end]


def _model_problems(model: type, value: Any) -> list[str]:
    """The pydantic model's own validation (its validators too), as path: message lines."""
    from pydantic import ValidationError

    try:
        model.model_validate(value)  # type: ignore[attr-defined]
    except ValidationError as exc:
        return [f"$.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
    return []


# ---------------------------------------------------------------------------------------------- resolving
def resolve(job: JobConfig) -> Structured | None:
    """The job's structured-output settings, checked; ConfigError (naming the file or setting and the fix) for a
    schema that cannot be used or a mode the model refuses. None when the job has no ``[output.schema]``."""
    config = job.output.answer_schema
    if config is None:
        return None
    schema = load_schema(job)
    model = job.model
    ocr = model.name.lower().startswith("qwen-vl-ocr")
    mode, reason = (config.mode, "set in the job file") if config.mode != "auto" else auto_mode(job)
    where = f"{job.job_file or 'job'} [output.schema]"
    thinking = is_stream_only(model.name) or bool(model.extra_body.get("enable_thinking"))
    if model_studio(job) and mode == "json_object" and thinking:
        raise ConfigError(
            f"{where}: mode = 'json_object' with a thinking model ({model.name}"
            f"{', enable_thinking = true' if model.extra_body.get('enable_thinking') else ''}): Model Studio answers "
            "400 'Json mode response is not supported when enable_thinking is true'. Nothing was sent. Fix: set "
            "mode = 'prompt' (or 'auto'), or turn thinking off ([model] extra_body enable_thinking = false)")
    if model_studio(job) and mode == "json_object" and not has_json_mode(model.name):
        raise ConfigError(f"{where}: mode = 'json_object', but {model.name} has no JSON mode on Model Studio. "
                          "Nothing was sent. Fix: mode = 'prompt' (or 'auto')")
    if model_studio(job) and mode == "json_schema":
        raise ConfigError(f"{where}: mode = 'json_schema' is not offered for vision models on Model Studio (only "
                          "some qwen-plus text models). Nothing was sent. Fix: mode = 'json_object' or 'auto'")
    if ocr and mode == "prompt" and schema.root.depth() > OCR_MAX_DEPTH:
        raise ConfigError(f"{where}: {schema.source} nests {schema.root.depth()} levels of objects; qwen-vl-ocr's "
                          f"key-information extraction takes at most {OCR_MAX_DEPTH}. Nothing was sent")
    return Structured(schema, mode, reason, config.repair_attempts, ocr)


def load_schema(job: JobConfig) -> AnswerSchema:
    """The schema from whichever of file / fields / model the job gives; ConfigError naming the source."""
    config = job.output.answer_schema
    assert config is not None
    job_file = str(job.job_file or "job")
    base_dir = job.job_file.resolve().parent if job.job_file else Path.cwd()
    if config.file is not None:
        source = str(config.file)
        try:
            return AnswerSchema(schemas.load_json_schema_file(config.file), source)
        except SchemaError as exc:
            raise schemas.config_error(f"{source} (the [output.schema] file of {job_file})", exc) from None
    if config.fields is not None:
        try:
            return AnswerSchema(schemas.from_fields(config.fields), f"{job_file} [output.schema] fields")
        except SchemaError as exc:
            raise schemas.config_error(f"{job_file} [output.schema]", exc) from None
    assert config.model is not None
    try:
        model = schemas.import_model(config.model, base_dir)
        return AnswerSchema(schemas.from_model(model), config.model, model)
    except SchemaError as exc:
        raise schemas.config_error(f"{job_file} [output.schema] model = {config.model!r}", exc) from None


MODEL_STUDIO_NAMES = ("qwen3-vl", "qwen-vl-", "qwen2.5-vl-", "qvq", "qwen3.5")


def model_studio(job: JobConfig) -> bool:
    """Whether Model Studio's rules apply: its endpoint (a region, or a dashscope / aliyuncs host), or one of its
    model names behind another URL (a LiteLLM proxy in front of Model Studio, the simulator). A Hugging Face name
    (``Qwen/Qwen2.5-VL-7B-Instruct``) is a self-hosted server."""
    if job.model.base_url is None:
        return True
    host = (urlparse(job.model.base_url).hostname or "").lower()
    name = job.model.name.lower()
    return "dashscope" in host or host.endswith("aliyuncs.com") or name.startswith(MODEL_STUDIO_NAMES)


def has_json_mode(model: str) -> bool:
    """Model Studio VL models with JSON Object mode: the Qwen3-VL and Qwen-VL-Max/Plus families (capability cards,
    next-phase-facts.md §4.1); not qwen-vl-ocr, Qwen2.5-VL or QVQ."""
    name = model.lower()
    return name.startswith(("qwen3-vl", "qwen-vl-max", "qwen-vl-plus", "qwen3.5"))


def auto_mode(job: JobConfig) -> tuple[str, str]:
    """``mode = "auto"``: the strongest mode this endpoint and model accept, and why."""
    model = job.model
    if not model_studio(job):
        return "json_schema", "a self-hosted OpenAI-compatible server (vLLM, SGLang) with json_schema"
    if is_stream_only(model.name) or model.extra_body.get("enable_thinking"):
        return "prompt", f"{model.name} thinks, and Model Studio refuses JSON mode with thinking"
    if has_json_mode(model.name):
        return "json_object", f"{model.name} has Model Studio's JSON mode"
    return "prompt", f"{model.name} has no JSON mode on Model Studio"


def sending_job(job: JobConfig, structured: Structured | None) -> JobConfig:
    """The job as it is sent: the schema instruction appended to the user prompt (braces escaped, it is a
    template) and ``response_format`` in ``extra_body``. The job itself is unchanged."""
    if structured is None:
        return job
    instruction = structured.instruction().replace("{", "{{").replace("}", "}}")
    user = f"{job.prompt.user}\n\n{instruction}" if job.prompt.user.strip() else instruction
    extra = dict(job.model.extra_body)
    response_format = structured.response_format()
    if response_format is not None:
        extra["response_format"] = response_format
    return job.model_copy(update={"prompt": job.prompt.model_copy(update={"user": user}),
                                  "model": job.model.model_copy(update={"extra_body": extra})})


# ---------------------------------------------------------------------------------------------- reporting
def summarize_answers(df: Any) -> dict[str, Any] | None:
    """For ``report``: each answer field's fill rate (non-null share of all rows), parse errors by code, and how
    many re-asks were sent and what they cost (per currency). None for an output without ``[output.schema]``."""
    fields = [c for c in df.columns if str(c).startswith(ANSWER_PREFIX)]
    if not fields:
        return None
    rows = len(df)
    fill = {c[len(ANSWER_PREFIX):]: (float(df[c].notna().sum()) / rows if rows else None) for c in fields}
    parse = df[df["error_type"] == "parse"] if "error_type" in df.columns else df.iloc[0:0]
    repairs = df["repairs"].fillna(0) if "repairs" in df.columns else None
    repair_cost: dict[str, float] = {}
    if "repair_cost" in df.columns and "currency" in df.columns:
        for currency, part in df[df["repair_cost"].notna()].groupby("currency"):
            repair_cost[str(currency)] = round(float(part["repair_cost"].sum()), 6)
    return {
        "fill_rate": fill,
        "parse_errors": int(len(parse)),
        "parse_error_codes": {str(k): int(v) for k, v in parse["error_code"].fillna("?").value_counts().items()}
        if len(parse) else {},
        "rows_repaired": int((repairs > 0).sum()) if repairs is not None else 0,
        "repairs": int(repairs.sum()) if repairs is not None else 0,
        "repair_cost": repair_cost,
    }


def answer_lines(summary: dict[str, Any]) -> list[str]:
    """The structured-output part of a report, a few lines."""
    fill = ", ".join(f"{name} {rate:.0%}" if rate is not None else f"{name} n/a"
                     for name, rate in summary["fill_rate"].items())
    lines = [f"Answer fields filled (share of all rows): {fill}"]
    codes = ", ".join(f"{k}={v:,}" for k, v in summary["parse_error_codes"].items())
    lines.append(f"Parse errors (never valid, raw answer kept in 'response'): {summary['parse_errors']:,}"
                 + (f" ({codes})" if codes else ""))
    cost = ", ".join(f"{v:.4f} {k}" for k, v in summary["repair_cost"].items()) or "none"
    lines.append(f"Repairs (re-asks after an invalid answer, each billed): {summary['repairs']:,} on "
                 f"{summary['rows_repaired']:,} row(s), costing {cost} (included in the totals)")
    return lines


@dataclass
class RepairTally:
    """What this run's re-asks added up to, for the end-of-run summary (repairs cost money: it says so)."""

    repairs: int = 0
    rows_repaired: int = 0
    cost: float = 0.0
    parse_errors: int = 0

    def add(self, result: dict[str, Any]) -> None:
        if result.get("repairs"):
            self.repairs += int(result["repairs"])
            self.rows_repaired += 1
            self.cost += float(result.get("repair_cost") or 0.0)
        if result.get("error_type") == "parse":
            self.parse_errors += 1

    def line(self, structured: Structured, currency: str | None) -> str:
        text = (f"structured output (mode {structured.mode}: {structured.reason}): {self.parse_errors:,} row(s) "
                "never valid (error_type "
                f"'parse', raw answer kept); {self.repairs:,} repair request(s) on {self.rows_repaired:,} row(s)")
        if currency:
            text += f", costing {self.cost:.4f} {currency} (included in the cost above)"
        return text
