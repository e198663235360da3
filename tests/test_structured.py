"""Structured output ([output.schema]): schema → Arrow types, parsing and validation, each mode end to end against
the simulator, bounded repair and its cost, refusals before sending, and resume after a schema edit."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import image_rows, write_manifest

from qwenvl_batch import ConfigError, run_job
from qwenvl_batch.answer_schema import SchemaError, from_fields, from_json_schema
from qwenvl_batch.config import job_from_dict
from qwenvl_batch.simulator import SimulatorConfig, SimulatorThread
from qwenvl_batch.structured import auto_mode, extract_json, resolve

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"caption": "string", "tags": ["string"], "safety": "safe | questionable | unsafe", "quality": "integer"}
PRICES = {"file": None}


def schema_job(make_job: Any, tmp_path: Path, rows: list[dict[str, Any]], *, schema: dict[str, Any] | None = None,
               **kwargs: Any) -> Any:
    """A make_job job with an [output.schema] (compact FIELDS, json_object) over ``rows``."""
    job = make_job(write_manifest(tmp_path / "m.csv", rows), **kwargs)
    section = {"fields": FIELDS, "mode": "json_object", **(schema or {})}
    raw = job.model_dump(exclude={"job_file"})
    raw["output"]["schema"] = section
    raw["output"].pop("answer_schema", None)
    return job_from_dict(raw, base_dir=tmp_path)


# ------------------------------------------------------------------------------------------ schema → Arrow
@pytest.mark.parametrize(("spec", "arrow"), [
    ({"type": "string"}, pa.string()),
    ({"type": "number"}, pa.float64()),
    ({"type": "integer"}, pa.int64()),
    ({"type": "boolean"}, pa.bool_()),
    ({"type": "string", "format": "date"}, pa.date32()),
    ({"type": "string", "format": "date-time"}, pa.timestamp("us", tz="UTC")),
    ({"type": "string", "enum": ["a", "b"]}, pa.string()),
    ({"enum": ["a", "b"]}, pa.string()),
    ({"type": ["number", "null"]}, pa.float64()),
    ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, pa.int64()),
    ({"type": "array", "items": {"type": "string"}}, pa.list_(pa.string())),
    ({"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "string"}}},
     pa.struct([pa.field("x", pa.float64()), pa.field("y", pa.string())])),
    ({"type": "array", "items": {"type": "object", "properties": {"n": {"type": "integer"}}}},
     pa.list_(pa.struct([pa.field("n", pa.int64())]))),
])
def test_json_schema_constructs_map_to_arrow_types(spec: dict[str, Any], arrow: pa.DataType) -> None:
    """Every supported construct has its Arrow type (objects → structs, arrays → lists, date → date32...)."""
    root = from_json_schema({"type": "object", "properties": {"f": spec}})
    assert root.properties[0][1].arrow_type() == arrow


def test_every_answer_column_is_nullable(tmp_path: Path, sim, make_job) -> None:
    """The output schema's answer columns are all nullable, required fields included (error rows are null)."""
    job = schema_job(make_job, tmp_path, image_rows(tmp_path, 1))
    structured = resolve(job)
    assert structured is not None
    fields = structured.answer_fields()
    assert [f.name for f in fields][:4] == ["answer.caption", "answer.tags", "answer.safety", "answer.quality"]
    assert all(f.nullable for f in fields)


def test_compact_form_matches_the_json_schema_form() -> None:
    """The compact TOML form and the equivalent JSON Schema give the same Arrow types."""
    compact = from_fields({"total": "number", "date": "date", "items": [{"amount": "number"}], "ok": "boolean"})
    full = from_json_schema({"type": "object", "properties": {
        "total": {"type": "number"}, "date": {"type": "string", "format": "date"},
        "items": {"type": "array", "items": {"type": "object", "properties": {"amount": {"type": "number"}}}},
        "ok": {"type": "boolean"}}})
    assert compact.arrow_type() == full.arrow_type()
    assert compact.required == frozenset({"total", "date", "items", "ok"})


@pytest.mark.parametrize(("spec", "fragment"), [
    ({"type": "string"}, "$: the top level must be an object"),
    ({"type": "object", "properties": {"a": {"type": "tuple"}}}, "$.a: type 'tuple' is not supported"),
    ({"type": "object", "properties": {"a": {"type": "array"}}}, "$.a: an array needs 'items'"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/X"}}}, "$.a: $ref"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "not in properties"),
])
def test_unsupported_schemas_name_the_path(spec: dict[str, Any], fragment: str) -> None:
    """A schema outside the subset is refused with the JSON path of the construct."""
    with pytest.raises(SchemaError) as info:
        from_json_schema(spec)
    assert fragment.replace("$: ", "") in str(info.value)


def test_validation_names_each_problem_by_path() -> None:
    """Validation reports wrong types, missing keys, bad enums and null where not allowed, each with its path."""
    root = from_json_schema({"type": "object", "required": ["n", "kind"], "properties": {
        "n": {"type": "integer"}, "kind": {"enum": ["a", "b"]}, "d": {"type": "string", "format": "date"},
        "items": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number"}}}}}})
    errors = root.errors({"kind": "c", "d": "2025-13-40", "items": [{"x": "1"}]})
    text = "\n".join(errors)
    assert "$: missing required key 'n'" in text
    assert "$.kind: 'c' is not one of ['a', 'b']" in text
    assert "$.d: expected a date (YYYY-MM-DD)" in text
    assert "$.items[0].x: expected a number, got string" in text
    assert root.errors({"n": 3.0, "kind": "a"}) == []  # 3.0 is an integer in draft 2020-12
    assert root.errors({"n": None, "kind": "a"}) == ["$.n: null is not allowed (expected an integer)"]


@pytest.mark.parametrize(("text", "expected"), [
    ('{"a": 1}', {"a": 1}),
    ('```json\n{"a": 1}\n```', {"a": 1}),
    ('Here is the result:\n{"a": 1}\nHope this helps.', {"a": 1}),
    ('{"a": 1,}', "invalid JSON"),
    ("{'a': 1}", "invalid JSON"),
    ("no object here", "no JSON object"),
    ("", "the answer is empty"),
])
def test_parsing_tolerates_fences_and_prose_but_not_broken_json(text: str, expected: Any) -> None:
    """Code fences and prose around the object are tolerated; trailing commas and single quotes are not fixed."""
    found = extract_json(text)
    if isinstance(expected, dict):
        assert not isinstance(found, str) and found[0] == expected
    else:
        assert isinstance(found, str) and expected in found


# ------------------------------------------------------------------------------------------ modes
def test_auto_mode_per_endpoint_and_model(tmp_path: Path) -> None:
    """auto: json_schema off Model Studio, json_object for Qwen3-VL / VL-Max, prompt for OCR and thinking models."""
    def mode(model: dict[str, Any]) -> str:
        job = job_from_dict({"input": {"path": "m.csv"}, "output": {"path": "o"}, "model": model}, base_dir=tmp_path)
        return auto_mode(job)[0]

    assert mode({"name": "Qwen/Qwen2.5-VL-7B-Instruct", "base_url": "http://localhost:8000/v1"}) == "json_schema"
    assert mode({"name": "qwen3-vl-flash"}) == "json_object"
    assert mode({"name": "qwen-vl-max", "region": "cn"}) == "json_object"
    assert mode({"name": "qwen3-vl-plus", "base_url": "https://dashscope-intl.aliyuncs.com/compatible-mode/v1"}) \
        == "json_object"
    assert mode({"name": "qwen-vl-ocr"}) == "prompt"
    assert mode({"name": "qwen3-vl-plus", "extra_body": {"enable_thinking": True}}) == "prompt"
    assert mode({"name": "qvq-max"}) == "prompt"
    assert mode({"name": "qwen3-vl-flash", "base_url": "http://litellm:4000/v1"}) == "json_object"  # a proxy


def test_json_object_mode_end_to_end(tmp_path: Path, sim, make_job) -> None:
    """json_object: the request carries response_format and the word JSON; every row gets its own typed fields."""
    job = schema_job(make_job, tmp_path, image_rows(tmp_path, 6))
    summary = run_job(job)
    assert summary.ok == 6 and summary.errors == 0
    table = pq.read_table(job.output.path)
    assert table.schema.field("answer.tags").type == pa.list_(pa.string())
    assert table.schema.field("answer.quality").type == pa.int64()
    out = table.to_pandas()
    assert {r["response_format"] for r in sim.requests} == {"json_object"}
    assert all("JSON" in r["text"] for r in sim.requests)
    tags = set()
    for _, row in out.iterrows():
        tag = row["answer.caption"].split()[-1]  # the simulator's strings quote the row's image tag
        assert all(t.endswith(tag) for t in row["answer.tags"])
        assert row["answer.safety"] in ("safe", "questionable", "unsafe")
        assert json.loads(row["answer_json"])["caption"] == row["answer.caption"]
        assert pd.isna(row["parse_error"]) and row["repairs"] == 0
        tags.add(tag)
    assert len(tags) == 6  # each row its own answer


def test_prompt_mode_with_qwen_vl_ocr_uses_the_key_information_prompt(tmp_path: Path, sim, make_job) -> None:
    """prompt mode (qwen-vl-ocr): no response_format; the KIE prompt carries the value template; dates are date32."""
    job = schema_job(make_job, tmp_path, image_rows(tmp_path, 3), model={"name": "qwen-vl-ocr"},
                     schema={"fields": {"invoice_number": "string", "date": "date", "total": "number"},
                             "mode": "auto"}, prompt={"user": ""})
    summary = run_job(job)
    assert summary.ok == 3
    assert {r["response_format"] for r in sim.requests} == {None}
    text = sim.requests[0]["text"]
    assert "information extraction expert" in text and '"date": "date"' in text
    table = pq.read_table(job.output.path)
    assert table.schema.field("answer.date").type == pa.date32()
    assert table.column("answer.total").null_count == 0


def test_json_schema_mode_against_a_vllm_like_server(tmp_path: Path) -> None:
    """json_schema (auto, for a non-Model-Studio server): the schema goes in response_format and the answer fits."""
    with SimulatorThread(SimulatorConfig(persona="vllm")) as server:
        rows = image_rows(tmp_path, 3)
        raw = {"input": {"path": str(write_manifest(tmp_path / "m.csv", rows))},
               "output": {"path": str(tmp_path / "out.parquet"),
                          "schema": {"fields": {"label": "cat | dog", "count": "integer"}}},
               "model": {"name": "Qwen/Qwen2.5-VL-7B-Instruct", "base_url": server.base_url,
                         "api_key_optional": True, "api_key_env": "QWENVL_TEST_KEY"},
               "prompt": {"user": "Label row {id}."}, "run": {"progress": "off"}}
        job = job_from_dict(raw, base_dir=tmp_path)
        summary = run_job(job)
        assert summary.ok == 3
        assert {r["response_format"] for r in server.requests} == {"json_schema"}
    out = pd.read_parquet(job.output.path)
    assert set(out["answer.label"]) <= {"cat", "dog"} and out["answer.count"].dtype == "int64"


# ------------------------------------------------------------------------------------------ repair and cost
def marker_rows(tmp_path: Path, markers: list[str]) -> list[dict[str, Any]]:
    rows = image_rows(tmp_path, len(markers))
    for row, marker in zip(rows, markers, strict=True):
        row["note"] = marker
    return rows


def test_repair_fixes_invalid_json_and_costs_both_attempts(tmp_path: Path, sim, make_job) -> None:
    """Invalid JSON is re-asked once with the error; the fixed answer is ok, and both attempts are costed."""
    rows = marker_rows(tmp_path, ["[[sim:badjson:1]]", "plain"])
    job = schema_job(make_job, tmp_path, rows, prompt={"user": "Describe row {id}. {note}"})
    summary = run_job(job)
    assert summary.ok == 2
    out = pd.read_parquet(job.output.path).set_index("id")
    fixed, plain = out.loc["row-0000"], out.loc["row-0001"]
    assert fixed["repairs"] == 1 and fixed["attempts"] == 2 and fixed["status"] == "ok"
    assert plain["repairs"] == 0 and pd.isna(plain["repair_cost"])
    assert 0 < fixed["repair_cost"] < fixed["cost"]
    repair = [r for r in sim.requests if "row row-0000" in r["text"]]
    assert len(repair) == 2 and "could not be used: invalid JSON" in repair[1]["text"]
    assert fixed["prompt_tokens"] == sum(r["prompt_tokens"] for r in repair)  # both attempts' tokens
    assert summary.cost == pytest.approx(out["cost"].sum())
    line = next(line for line in summary.lines() if line.startswith("structured output"))
    assert "1 repair request(s) on 1 row(s), costing" in line and "(included in the cost above)" in line


def test_still_invalid_after_repair_is_a_parse_error_that_keeps_the_answer(tmp_path: Path, sim, make_job) -> None:
    """An answer still invalid after the repair is an error row (parse), raw answer kept, both attempts costed."""
    rows = marker_rows(tmp_path, ["[[sim:badjson]]", "plain", "plain"])
    job = schema_job(make_job, tmp_path, rows, prompt={"user": "Describe row {id}. {note}"})
    summary = run_job(job)
    assert summary.ok == 2 and summary.errors == 1 and summary.error_types == {"parse": 1}
    bad = pd.read_parquet(job.output.path).set_index("id").loc["row-0000"]
    assert bad["status"] == "error" and bad["error_type"] == "parse" and bad["error_code"] == "invalid_json"
    assert "still does not fit the schema" in bad["error_message"]
    assert bad["response"].endswith(",}") and pd.isna(bad["answer.caption"])
    assert bad["repairs"] == 1 and bad["attempts"] == 2 and bad["repair_cost"] > 0
    assert len([r for r in sim.requests if "row row-0000" in r["text"]]) == 2  # never more than one re-ask


def test_no_repair_records_the_parse_error_at_once(tmp_path: Path, sim, make_job) -> None:
    """repair_attempts = 0: an invalid answer is recorded after one request, with its parse error."""
    rows = marker_rows(tmp_path, ["[[sim:badschema:1]]", "plain"])
    job = schema_job(make_job, tmp_path, rows, prompt={"user": "Describe row {id}. {note}"},
                     schema={"repair_attempts": 0})
    run_job(job)
    bad = pd.read_parquet(job.output.path).set_index("id").loc["row-0000"]
    assert bad["error_code"] == "schema_mismatch" and "missing required key 'caption'" in bad["parse_error"]
    assert bad["repairs"] == 0 and len([r for r in sim.requests if "row row-0000" in r["text"]]) == 1


def test_fenced_answer_is_accepted_without_a_repair(tmp_path: Path, sim, make_job) -> None:
    """An answer in a ```json fence after some prose is valid as it is: no re-ask, answer_json is the object."""
    rows = marker_rows(tmp_path, ["[[sim:fenced:1]]"])
    job = schema_job(make_job, tmp_path, rows, prompt={"user": "Describe row {id}. {note}"})
    run_job(job)
    row = pd.read_parquet(job.output.path).iloc[0]
    assert row["status"] == "ok" and row["repairs"] == 0 and row["response"].startswith("Here is the JSON")
    assert json.loads(row["answer_json"])["caption"] == row["answer.caption"]


# ------------------------------------------------------------------------------------------ refusals
def test_thinking_model_with_json_object_is_refused_before_sending(tmp_path: Path, sim, make_job) -> None:
    """json_object with thinking on is refused at plan time with the fix; nothing is sent or created."""
    job = schema_job(make_job, tmp_path, image_rows(tmp_path, 2),
                     model={"name": "qwen3-vl-plus", "region": None, "base_url": None, "stream": True,
                            "extra_body": {"enable_thinking": True}})
    with pytest.raises(ConfigError, match="enable_thinking is true.*mode = 'prompt'"):
        run_job(job)
    assert sim.requests == [] and not job.output.path.exists()


@pytest.mark.parametrize(("content", "fragment"), [
    (None, "cannot read it"),
    ("{not json", "not valid JSON"),
    ('{"type": "object", "properties": {"a": {"type": "tuple"}}}', "type 'tuple' is not supported"),
])
def test_bad_schema_file_is_refused_naming_the_file(tmp_path: Path, sim, make_job, content: str | None,
                                                    fragment: str) -> None:
    """A schema file that is missing, not JSON or unsupported is refused before sending, naming file and problem."""
    path = tmp_path / "bad.schema.json"
    if content is not None:
        path.write_text(content)
    job = schema_job(make_job, tmp_path, image_rows(tmp_path, 1), schema={"file": str(path), "fields": None})
    with pytest.raises(ConfigError) as info:
        run_job(job)
    assert str(path) in str(info.value) and fragment in str(info.value)
    assert sim.requests == []


def test_schema_section_needs_exactly_one_source(tmp_path: Path) -> None:
    """[output.schema] with two sources (or none), or an unknown key, is a config error naming the key."""
    base = {"input": {"path": "m.csv"}, "model": {"name": "qwen3-vl-flash"}}
    with pytest.raises(ConfigError, match="exactly one of file, fields or model"):
        job_from_dict({**base, "output": {"path": "o", "schema": {"fields": FIELDS, "file": "x.json"}}},
                      base_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown key 'output.schema.repair'"):
        job_from_dict({**base, "output": {"path": "o", "schema": {"fields": FIELDS, "repair": 1}}}, base_dir=tmp_path)


def test_pydantic_model_from_the_job_folder(tmp_path: Path, sim, make_job) -> None:
    """model = "module:Class" imports a pydantic model beside the job file; its fields become typed columns."""
    (tmp_path / "invoice_models.py").write_text(
        "import datetime\nfrom typing import Literal\nfrom pydantic import BaseModel\n\n"
        "class Item(BaseModel):\n    description: str\n    amount: float | None = None\n\n"
        "class Invoice(BaseModel):\n    number: str\n    issued: datetime.date | None\n"
        "    kind: Literal['invoice', 'receipt']\n    items: list[Item]\n")
    job = schema_job(make_job, tmp_path, image_rows(tmp_path, 2), schema={"model": "invoice_models:Invoice",
                                                                          "fields": None})
    job = job.model_copy(update={"job_file": tmp_path / "job.toml"})
    run_job(job)
    table = pq.read_table(job.output.path)
    assert table.schema.field("answer.issued").type == pa.date32()
    assert table.schema.field("answer.items").type == pa.list_(
        pa.struct([pa.field("description", pa.string()), pa.field("amount", pa.float64())]))
    assert set(table.column("status").to_pylist()) == {"ok"}


# ------------------------------------------------------------------------------------------ resume
def test_schema_edit_is_a_settings_change_and_removed_fields_are_refused(tmp_path: Path, sim, make_job) -> None:
    """Editing the schema makes finished rows 'changed' (refused until --rerun-changed); an added field is a new
    column, a removed one is refused naming the output schema."""
    rows = image_rows(tmp_path, 3)
    run_job(schema_job(make_job, tmp_path, rows))
    grown = schema_job(make_job, tmp_path, rows, schema={"fields": {**FIELDS, "mood": "string"}})
    with pytest.raises(ConfigError, match="different settings"):
        run_job(grown)
    summary = run_job(grown, rerun_changed=True)
    assert summary.ok == 3
    out = pd.read_parquet(grown.output.path)
    assert len(out) == 3 and out["answer.mood"].notna().all()
    shrunk = schema_job(make_job, tmp_path, rows, schema={"fields": {"caption": "string"}})
    sent = len(sim.requests)
    with pytest.raises(ConfigError, match=r"output schema \(\[output.schema\]\) changed.*removed: \['answer.mood'"):
        run_job(shrunk, rerun_changed=True)
    assert len(sim.requests) == sent


# ------------------------------------------------------------------------------------------ simulator
def test_simulator_refuses_json_object_the_way_model_studio_does(sim) -> None:
    """The simulator refuses json_object without the word JSON, with thinking, and for qwen-vl-ocr (400s)."""
    url = f"{sim.base_url}/chat/completions"
    headers = {"Authorization": "Bearer sk-test"}

    def post(model: str, text: str, **extra: Any) -> tuple[int, str]:
        body = {"model": model, "messages": [{"role": "user", "content": text}],
                "response_format": {"type": "json_object"}, **extra}
        request = urllib.request.Request(url, json.dumps(body).encode(), {**headers, "Content-Type":
                                                                          "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    status, text = post("qwen3-vl-flash", "Describe it as an object")
    assert status == 400 and "must contain the word 'json'" in text
    status, text = post("qwen3-vl-plus", "Answer in JSON", stream=True, enable_thinking=True)
    assert status == 400 and "enable_thinking is true" in text
    assert post("qwen-vl-ocr", "Answer in JSON")[0] == 400
    status, text = post("qwen3-vl-flash", "Answer in JSON")
    assert status == 200 and json.loads(json.loads(text)["choices"][0]["message"]["content"])


# ------------------------------------------------------------------------------------------ shipped jobs
@pytest.mark.parametrize(("name", "mode_column"), [("ocr-invoice.toml", "answer.total"),
                                                   ("caption-tags.toml", "answer.tags")])
def test_shipped_jobs_run_with_simulate(tmp_path: Path, name: str, mode_column: str) -> None:
    """jobs/ocr-invoice.toml and jobs/caption-tags.toml run end to end with --simulate, every row ok."""
    summary = run_job(REPO / "jobs" / name, simulate=True, output=str(tmp_path / "out.parquet"), progress="off")
    assert summary.errors == 0 and summary.ok == summary.rows > 0
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert out[mode_column].notna().all()


def test_readme_structured_output_snippet_runs(tmp_path: Path) -> None:
    """The README's 'Structured output' python block runs as written after jobs/ocr-invoice.toml ran."""
    import re
    import shutil
    import subprocess
    import sys

    text = (REPO / "README.md").read_text()
    section = text.split("## Structured output", 1)[1].split("\n## ", 1)[0]
    snippet = re.search(r"```python\n(.*?)```", section, re.S)
    assert snippet is not None
    (tmp_path / "jobs").mkdir()
    for name in ("ocr-invoice.toml", "invoice.schema.json"):
        shutil.copy(REPO / "jobs" / name, tmp_path / "jobs" / name)
    (tmp_path / "sample_data").symlink_to(REPO / "sample_data")
    run_job(tmp_path / "jobs" / "ocr-invoice.toml", simulate=True, progress="off")
    done = subprocess.run([sys.executable, "-c", snippet.group(1)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "doc-0001" in done.stdout and "description" in done.stdout


def test_thinking_model_in_prompt_mode_streams_a_valid_answer(tmp_path: Path, sim, make_job) -> None:
    """auto with thinking on picks prompt mode: streamed, no response_format, reasoning kept, answer validated."""
    job = schema_job(make_job, tmp_path, image_rows(tmp_path, 2), schema={"mode": "auto"},
                     model={"name": "qwen3-vl-plus", "extra_body": {"enable_thinking": True}})
    summary = run_job(job)
    assert summary.ok == 2
    assert {r["response_format"] for r in sim.requests} == {None} and all(r["stream"] for r in sim.requests)
    out = pd.read_parquet(job.output.path)
    assert out["reasoning"].notna().all() and out["answer.caption"].notna().all()


def test_rerun_of_a_finished_structured_job_sends_nothing(tmp_path: Path, sim, make_job) -> None:
    """The same job and schema run again skips every row: the schema's fingerprint is stable."""
    job = schema_job(make_job, tmp_path, image_rows(tmp_path, 4))
    run_job(job)
    sent = len(sim.requests)
    summary = run_job(schema_job(make_job, tmp_path, image_rows(tmp_path, 4)))
    assert summary.skipped_ok == 4 and summary.to_do == 0 and len(sim.requests) == sent


def test_estimate_counts_the_schema_prompt_and_the_repair_worst_case(tmp_path: Path, sim, make_job) -> None:
    """estimate: the schema instruction's tokens are in the prompt tokens, and the worst case includes re-asks."""
    from qwenvl_batch.estimate import estimate_job

    rows = image_rows(tmp_path, 3)
    plain = estimate_job(make_job(write_manifest(tmp_path / "m.csv", rows), model={"max_tokens": 300}))
    job = schema_job(make_job, tmp_path, rows, model={"max_tokens": 300})
    structured = estimate_job(job)
    assert structured.prompt_tokens_total > plain.prompt_tokens_total + 3 * 50
    assert structured.repair_attempts == 1
    assert structured.cost_high is not None and structured.cost_high_with_repairs is not None
    assert structured.cost_high_with_repairs > 2 * structured.cost_high * 0.99
    summary = run_job(job)
    assert summary.prompt_tokens == structured.prompt_tokens_total  # the estimate counted what was sent


def test_spend_cap_counts_repairs_and_keeps_the_paid_row(tmp_path: Path, sim, make_job) -> None:
    """A re-ask that could exceed max_cost is not sent: the run stops, and the row already paid for is recorded
    (parse error, its cost kept) so the spend in the output matches what was billed."""
    from qwenvl_batch import JobError
    from qwenvl_batch.estimate import estimate_job
    from qwenvl_batch.pricing import row_cost

    rows = marker_rows(tmp_path, ["[[sim:badjson]]"])
    probe = schema_job(make_job, tmp_path, rows, prompt={"user": "Describe row {id}. {note}"},
                       model={"max_tokens": 300})
    prompt = estimate_job(probe).prompt_tokens_max
    price = probe.price_table().lookup("qwen3-vl-flash", None)
    assert price is not None
    first_worst = row_cost(price, prompt_tokens=prompt, completion_tokens=300).cost
    job = schema_job(make_job, tmp_path, rows, prompt={"user": "Describe row {id}. {note}"},
                     model={"max_tokens": 300}, limits={"max_cost": first_worst * 1.01})
    with pytest.raises(JobError, match="Spend cap reached"):
        run_job(job)
    assert len(sim.requests) == 1  # the re-ask was never sent
    row = pd.read_parquet(job.output.path).iloc[0]
    assert row["error_type"] == "parse" and row["repairs"] == 0 and row["cost"] > 0
    assert "the repair request failed: Spend cap reached" in row["error_message"]


def test_report_shows_fill_rates_parse_errors_and_repair_cost(tmp_path: Path, sim, make_job) -> None:
    """report: each answer field's fill rate, parse errors by code, and the re-asks with their cost."""
    from qwenvl_batch import load_results
    from qwenvl_batch.report import render, summarize

    rows = marker_rows(tmp_path, ["[[sim:badjson]]", "[[sim:badschema:1]]", "plain", "plain"])
    job = schema_job(make_job, tmp_path, rows, prompt={"user": "Describe row {id}. {note}"})
    run_job(job)
    summary = summarize(load_results(job.output.path))
    structured = summary["structured"]
    assert structured["fill_rate"]["caption"] == 0.75  # 3 valid rows of 4
    assert structured["parse_errors"] == 1 and structured["parse_error_codes"] == {"invalid_json": 1}
    assert structured["repairs"] == 2 and structured["rows_repaired"] == 2
    assert structured["repair_cost"]["USD"] > 0
    text = render(summary, "text")
    assert "Answer fields filled (share of all rows): caption 75%" in text
    assert "Repairs (re-asks after an invalid answer, each billed): 2 on 2 row(s)" in text
