"""An answer schema: what a structured answer must look like, and the Arrow types its fields become.

Three ways to write it (``[output.schema]``), one tree here (``Node``): a JSON Schema file (a draft 2020-12
subset: object, properties, required, type, enum, items, nested objects, nullable — ``"type": [T, "null"]``,
``"nullable": true`` or ``anyOf`` with null; local ``$ref`` to ``$defs``), a compact TOML form
(``fields = { total = "number", items = [{ amount = "number" }] }``) or a pydantic model (through its JSON Schema).
Why one tree: validation, the Arrow type, the JSON Schema sent as ``response_format`` and the template written
into a prompt must never disagree about what a field is.

Arrow types (every field nullable: a row that fails validation has nulls): object → struct, array → list,
string → string, enum → string (Parquet dictionary-encodes it), number → float64, integer → int64,
boolean → bool, ``format: date`` → date32, ``format: date-time`` → timestamp[us, UTC].
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from .errors import ConfigError

SCALARS = ("string", "number", "integer", "boolean", "date", "datetime")
MAX_DEPTH = 8


class SchemaError(ValueError):
    """A schema that cannot be used; the caller adds which file or setting it came from."""


@dataclass(frozen=True)
class Node:
    """One field's shape. ``kind`` is object, array or one of SCALARS; ``nullable`` means null is a valid value."""

    kind: str
    nullable: bool = False
    properties: tuple[tuple[str, Node], ...] = ()
    required: frozenset[str] = frozenset()
    items: Node | None = None
    enum: tuple[Any, ...] | None = None
    description: str | None = None

    # -- Arrow --------------------------------------------------------------------------------------------
    def arrow_type(self) -> pa.DataType:
        """The Arrow type of this field's values (nullability is the field's, always True)."""
        if self.kind == "object":
            return pa.struct([pa.field(name, child.arrow_type()) for name, child in self.properties])
        if self.kind == "array":
            assert self.items is not None
            return pa.list_(self.items.arrow_type())
        return _ARROW[self.kind]

    def to_arrow(self, value: Any) -> Any:
        """A validated value as the Python value Arrow converts to ``arrow_type`` (dates parsed, unknown keys
        dropped, missing keys null)."""
        if value is None:
            return None
        if self.kind == "object":
            return {name: child.to_arrow(value.get(name)) for name, child in self.properties}
        if self.kind == "array":
            assert self.items is not None
            return [self.items.to_arrow(v) for v in value]
        if self.kind == "date":
            return dt.date.fromisoformat(value)
        if self.kind == "datetime":
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
        if self.kind == "number":
            return float(value)
        if self.kind == "integer":
            return int(value)
        return value

    # -- validation ---------------------------------------------------------------------------------------
    def errors(self, value: Any, path: str = "$") -> list[str]:
        """Every way ``value`` breaks the schema, each naming its JSON path (empty when valid)."""
        if value is None:
            return [] if self.nullable else [f"{path}: null is not allowed (expected {self.describe()})"]
        problem = self._type_problem(value)
        if problem:
            return [f"{path}: {problem}"]
        if self.enum is not None and value not in self.enum:
            return [f"{path}: {value!r} is not one of {list(self.enum)}"]
        if self.kind == "object":
            found = [f"{path}: missing required key {name!r}" for name in sorted(self.required) if name not in value]
            for name, child in self.properties:
                if name in value:
                    found += child.errors(value[name], f"{path}.{name}")
            return found
        if self.kind == "array":
            assert self.items is not None
            return [e for i, v in enumerate(value) for e in self.items.errors(v, f"{path}[{i}]")]
        return []

    def _type_problem(self, value: Any) -> str | None:
        ok = {
            "object": isinstance(value, dict),
            "array": isinstance(value, list),
            "string": isinstance(value, str),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool),
            "integer": (isinstance(value, int) and not isinstance(value, bool))
            or (isinstance(value, float) and value.is_integer()),  # 2020-12: 3.0 is an integer
            "boolean": isinstance(value, bool),
            "date": isinstance(value, str) and _parses(dt.date.fromisoformat, value),
            "datetime": isinstance(value, str) and _parses(
                lambda v: dt.datetime.fromisoformat(v.replace("Z", "+00:00")), value),
        }[self.kind]
        if ok:
            return None
        return f"expected {self.describe()}, got {_json_kind(value)} {_short(value)}"

    def describe(self) -> str:
        """A few words for messages: 'a number', 'a date (YYYY-MM-DD)', 'one of [...]'."""
        if self.enum is not None:
            return f"one of {list(self.enum)}"
        return {"object": "an object", "array": "an array", "string": "a string", "number": "a number",
                "integer": "an integer", "boolean": "true or false", "date": "a date (YYYY-MM-DD)",
                "datetime": "a date-time (ISO 8601)"}[self.kind]

    # -- what is sent -------------------------------------------------------------------------------------
    def json_schema(self) -> dict[str, Any]:
        """This node as plain JSON Schema (what ``response_format`` carries and what a prompt quotes)."""
        out: dict[str, Any]
        if self.kind == "object":
            out = {"type": "object", "properties": {n: c.json_schema() for n, c in self.properties},
                   "required": sorted(self.required), "additionalProperties": False}
        elif self.kind == "array":
            assert self.items is not None
            out = {"type": "array", "items": self.items.json_schema()}
        elif self.kind in ("date", "datetime"):
            out = {"type": "string", "format": "date" if self.kind == "date" else "date-time"}
        else:
            out = {"type": self.kind}
        if self.enum is not None:
            out["enum"] = list(self.enum)
        if self.nullable:
            out["type"] = [out["type"], "null"]
        if self.description:
            out["description"] = self.description
        return out

    def template(self) -> Any:
        """The compact value template (keys with type names), the shape qwen-vl-ocr's key-information prompt
        expects: ``{"total": "number", "items": [{"amount": "number"}]}``."""
        if self.kind == "object":
            return {name: child.template() for name, child in self.properties}
        if self.kind == "array":
            assert self.items is not None
            return [self.items.template()]
        if self.enum is not None:
            return " | ".join(str(v) for v in self.enum)
        return self.kind

    def depth(self) -> int:
        """Nesting levels of objects (a flat object is 1)."""
        if self.kind == "object":
            return 1 + max((c.depth() for _, c in self.properties), default=0)
        if self.kind == "array" and self.items is not None:
            return self.items.depth()
        return 0


_ARROW: dict[str, pa.DataType] = {
    "string": pa.string(), "number": pa.float64(), "integer": pa.int64(), "boolean": pa.bool_(),
    "date": pa.date32(), "datetime": pa.timestamp("us", tz="UTC"),
}


def _parses(parse: Any, value: str) -> bool:
    try:
        parse(value)
    except ValueError:
        return False
    return True


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(type(value), "value")


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


# ------------------------------------------------------------------------------------------ JSON Schema in
def from_json_schema(schema: Mapping[str, Any]) -> Node:
    """A JSON Schema (the subset above) → Node; SchemaError naming the JSON path of what is not supported."""
    if not isinstance(schema, Mapping):
        raise SchemaError("the schema must be a JSON object")
    root = _node(schema, schema.get("$defs") or schema.get("definitions") or {}, "$", 0)
    if root.kind != "object":
        raise SchemaError(f"the top level must be an object (\"type\": \"object\"), not {root.kind}")
    if not root.properties:
        raise SchemaError("the top-level object has no properties: list the fields the answer must have")
    return root


def _node(spec: Any, defs: Mapping[str, Any], path: str, depth: int) -> Node:
    if depth > MAX_DEPTH:
        raise SchemaError(f"{path}: nested deeper than {MAX_DEPTH} levels (a recursive $ref?)")
    if not isinstance(spec, Mapping):
        raise SchemaError(f"{path}: expected a schema object, got {_short(spec)}")
    spec = _resolve_ref(spec, defs, path)
    nullable = bool(spec.get("nullable", False))
    variants = spec.get("anyOf") or spec.get("oneOf")
    if variants is not None:  # pydantic writes Optional[X] as anyOf [X, {"type": "null"}]
        real = [v for v in variants if not (isinstance(v, Mapping) and v.get("type") == "null")]
        if len(real) != 1:
            raise SchemaError(f"{path}: anyOf/oneOf is supported only as 'X or null'")
        inner = _node(real[0], defs, path, depth + 1)
        return _replace(inner, nullable=True, description=spec.get("description") or inner.description)
    kind = spec.get("type")
    if isinstance(kind, list):
        nullable = nullable or "null" in kind
        kinds = [k for k in kind if k != "null"]
        if len(kinds) != 1:
            raise SchemaError(f"{path}: a type list may name one type and null, got {kind}")
        kind = kinds[0]
    enum = spec.get("enum")
    if kind is None and "const" in spec:
        enum = [spec["const"]]
    if kind is None and enum:
        kind = "string" if all(isinstance(v, str) for v in enum) else None
    if kind is None and "properties" in spec:
        kind = "object"
    description = spec.get("description")
    if kind == "object":
        props = spec.get("properties") or {}
        if not isinstance(props, Mapping):
            raise SchemaError(f"{path}.properties: must be an object")
        children = tuple((str(n), _node(c, defs, f"{path}.{n}", depth + 1)) for n, c in props.items())
        required = spec.get("required") or []
        unknown = sorted(set(required) - set(props))
        if unknown:
            raise SchemaError(f"{path}: required names {unknown} that are not in properties")
        return Node("object", nullable, children, frozenset(required), description=description)
    if kind == "array":
        if "items" not in spec:
            raise SchemaError(f"{path}: an array needs 'items' (the type of its elements)")
        return Node("array", nullable, items=_node(spec["items"], defs, f"{path}[]", depth + 1),
                    description=description)
    if kind == "string" and spec.get("format") in ("date", "date-time"):
        kind = "date" if spec["format"] == "date" else "datetime"
    if kind not in SCALARS:
        raise SchemaError(f"{path}: type {kind!r} is not supported (use object, array, string, number, integer, "
                          "boolean; null via a type list)")
    if enum is not None and (not isinstance(enum, list) or not enum):
        raise SchemaError(f"{path}: enum must be a non-empty list")
    return Node(kind, nullable, enum=tuple(enum) if enum is not None else None, description=description)


def _resolve_ref(spec: Mapping[str, Any], defs: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    ref = spec.get("$ref")
    if ref is None:
        return spec
    name = str(ref).rsplit("/", 1)[-1]
    if not str(ref).startswith("#/") or name not in defs:
        raise SchemaError(f"{path}: $ref {ref!r} is not a local definition ($defs) of this file")
    return {**defs[name], **{k: v for k, v in spec.items() if k != "$ref"}}


def _replace(node: Node, **changes: Any) -> Node:
    from dataclasses import replace

    return replace(node, **changes)


# ------------------------------------------------------------------------------------------ compact form in
def from_fields(fields: Mapping[str, Any], path: str = "fields") -> Node:
    """The compact TOML form → Node. Values: a type name (string, number, integer, boolean, date, datetime), an
    enum written ``"a | b | c"``, an inline table (a nested object) or a one-element list (an array of it).
    Every field is required and nullable: the model must give every key, null when the image does not say."""
    if not isinstance(fields, Mapping) or not fields:
        raise SchemaError(f"{path}: list at least one field, e.g. fields = {{ total = \"number\" }}")
    children = tuple((str(n), _compact(v, f"{path}.{n}")) for n, v in fields.items())
    return Node("object", False, children, frozenset(n for n, _ in children))


def _compact(value: Any, path: str) -> Node:
    if isinstance(value, Mapping):
        return _replace(from_fields(value, path), nullable=True)
    if isinstance(value, list):
        if len(value) != 1:
            raise SchemaError(f"{path}: an array is written as a one-element list, e.g. [\"string\"] or "
                              "[{ amount = \"number\" }]")
        return Node("array", True, items=_replace(_compact(value[0], f"{path}[]"), nullable=True))
    if isinstance(value, str):
        if "|" in value:
            choices = tuple(c.strip() for c in value.split("|") if c.strip())
            if len(choices) < 2:
                raise SchemaError(f"{path}: an enum needs two or more choices, e.g. \"safe | unsafe\"")
            return Node("string", True, enum=choices)
        name = value.strip().lower().replace("date-time", "datetime")
        if name in SCALARS:
            return Node(name, True)
    raise SchemaError(f"{path}: {value!r} is not a type; use one of {', '.join(SCALARS)}, an enum \"a | b\", an "
                      "inline table or a one-element list")


# ------------------------------------------------------------------------------------------ pydantic in
def import_model(spec: str, base_dir: Path) -> type:
    """``"pkg.mod:Model"`` imported with the job's folder first on the path; SchemaError saying what failed."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SchemaError(f"model = {spec!r}: write it as \"package.module:ClassName\"")
    added = str(base_dir) not in sys.path
    if added:
        sys.path.insert(0, str(base_dir))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module; say which and why
        raise SchemaError(f"model = {spec!r}: cannot import {module_name} from {base_dir} "
                          f"({type(exc).__name__}: {exc})") from None
    finally:
        if added:
            sys.path.remove(str(base_dir))
    model = getattr(module, attr, None)
    if model is None or not hasattr(model, "model_json_schema"):
        raise SchemaError(f"model = {spec!r}: {module_name} has no pydantic model called {attr}")
    return model


def from_model(model: type) -> Node:
    """A pydantic model → Node, through its JSON Schema (nested models as $defs, Optional as anyOf null)."""
    return from_json_schema(model.model_json_schema())  # type: ignore[attr-defined]


def load_json_schema_file(path: Path) -> Node:
    """A ``.schema.json`` file → Node; SchemaError for an unreadable file, bad JSON or an unsupported construct."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SchemaError(f"cannot read it ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SchemaError(f"not valid JSON ({exc})") from None
    return from_json_schema(data)


@dataclass(frozen=True)
class AnswerSchema:
    """A resolved schema with where it came from (for messages) and its fingerprint (for resume)."""

    root: Node
    source: str
    model: type | None = field(default=None, compare=False)

    @property
    def fingerprint(self) -> str:
        """A hash of the schema as sent: editing it makes every row a 'changed settings' row."""
        text = json.dumps(self.root.json_schema(), sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def config_error(source: str, exc: SchemaError) -> ConfigError:
    """A schema problem as the job-level error the CLI prints (exit 2, nothing sent)."""
    return ConfigError(f"{source}: cannot use this answer schema: {exc}. Nothing was sent; fix the schema "
                       "(see README 'Structured output')")
