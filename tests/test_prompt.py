"""Prompt templates and row fingerprints (pure logic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from qwenvl_batch import ConfigError, job_from_dict
from qwenvl_batch.prompt import RowRenderer, build_messages, fingerprint_hex, parse_fingerprints, template_fields


def _renderer(tmp_path: Path, user: str = "Caption {hint}", **model: object) -> RowRenderer:
    job = job_from_dict({
        "input": {"path": "m.csv", "image_columns": ["image"]},
        "output": {"path": "out"},
        "model": {"name": "qwen3-vl-flash", **model},
        "prompt": {"user": user},
    }, base_dir=tmp_path)
    return RowRenderer(job, ["id", "image", "hint", "other"], tmp_path)


BATCH = pa.record_batch({
    "id": ["a", "b", "c"],
    "image": ["x.jpg", "y.jpg", "z.jpg"],
    "hint": ["sunny", None, ""],
    "other": ["1", "2", "3"],
})


def test_template_fields() -> None:
    """Field names are found with conversions and format specs; positional fields are refused."""
    assert template_fields("A {x} {y!r} {z:>5} {{literal}}") == {"x", "y", "z"}
    with pytest.raises(ConfigError):
        template_fields("a {} b")


def test_missing_column_names_it(tmp_path: Path) -> None:
    """A template column missing from the manifest is an error naming it."""
    with pytest.raises(ConfigError, match=r"\{nope\}"):
        _renderer(tmp_path, user="{nope}")


def test_render_fills_nulls_with_empty_text(tmp_path: Path) -> None:
    """A null cell renders as an empty string, not 'None'."""
    rendered = _renderer(tmp_path).render({"id": "b", "image": "y.jpg", "hint": None, "other": "2"})
    assert rendered.user == "Caption " and rendered.error is None and rendered.images[0].value == "y.jpg"


def test_empty_image_cell_is_an_input_error(tmp_path: Path) -> None:
    """A row without an image becomes an input error, not an exception."""
    rendered = _renderer(tmp_path).render({"id": "b", "image": "", "hint": "", "other": ""})
    assert rendered.error is not None and rendered.error.error_type == "input"


def test_fingerprints_change_with_used_values_only(tmp_path: Path) -> None:
    """Editing a used cell changes that row's fingerprint; an unused column changes nothing."""
    renderer = _renderer(tmp_path)
    base = renderer.fingerprints(BATCH)
    assert len(set(base.tolist())) == 3
    edited = BATCH.set_column(2, "hint", pa.array(["rainy", None, ""]))
    assert (renderer.fingerprints(edited) != base).tolist() == [True, False, False]
    other = BATCH.set_column(3, "other", pa.array(["9", "9", "9"]))
    assert (renderer.fingerprints(other) == base).all()


def test_null_and_empty_differ(tmp_path: Path) -> None:
    """A null cell and an empty string are different inputs."""
    renderer = _renderer(tmp_path, user="Caption")
    one = pa.record_batch({"id": ["a", "b"], "image": ["x.jpg", "x.jpg"], "hint": [None, ""], "other": ["", ""]})
    fps = renderer.fingerprints(one)
    assert fps[0] == fps[1]  # hint is not used by this template: identical requests
    renderer = _renderer(tmp_path)
    fps = renderer.fingerprints(one)
    assert fps[0] != fps[1]


def test_fingerprints_change_with_job_settings(tmp_path: Path) -> None:
    """max_tokens, the model and the template are part of every row's fingerprint."""
    base = _renderer(tmp_path).fingerprints(BATCH)
    assert (_renderer(tmp_path, max_tokens=50).fingerprints(BATCH) != base).all()
    assert (_renderer(tmp_path, name="qwen3-vl-plus").fingerprints(BATCH) != base).all()
    assert (_renderer(tmp_path, user="Caption: {hint}").fingerprints(BATCH) != base).all()


def test_list_image_cells_are_fingerprinted(tmp_path: Path) -> None:
    """Multi-image cells hash their references; changing one image changes the fingerprint."""
    renderer = _renderer(tmp_path)
    batch = pa.record_batch({"id": ["a"], "image": pa.array([["x.jpg", "y.jpg"]]), "hint": [""], "other": [""]})
    swapped = batch.set_column(1, "image", pa.array([["x.jpg", "q.jpg"]]))
    assert renderer.fingerprints(batch)[0] != renderer.fingerprints(swapped)[0]


def test_hex_round_trip() -> None:
    """Fingerprints survive the hex form the output stores."""
    values = np.array([0, 1, 2**64 - 1, 1234567890123], dtype=np.uint64)
    assert (parse_fingerprints(fingerprint_hex(values)) == values).all()


def test_messages_put_pixel_bounds_beside_image_url(tmp_path: Path) -> None:
    """min/max_pixels are siblings of image_url (DashScope), images come before the text."""
    from qwenvl_batch.media import PreparedImage

    rendered = _renderer(tmp_path).render({"id": "a", "image": "x.jpg", "hint": "h", "other": ""})
    image = PreparedImage(url="data:image/png;base64,AA", mime="image/png", width=10, height=10, sent_bytes=24)
    messages = build_messages(rendered, [image], min_pixels=3072, max_pixels=8388608)
    parts = messages[-1]["content"]
    assert parts[0] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"},
                        "min_pixels": 3072, "max_pixels": 8388608}
    assert parts[1] == {"type": "text", "text": "Caption h"}


def test_fingerprint_column_parsing_matches_the_slow_path() -> None:
    """Vectorised parsing of a (chunked, sliced, null-holding) fingerprint column equals the per-string path."""
    values = fingerprint_hex(np.array([1, 2**63, 12345, 2**64 - 1, 7], dtype=np.uint64))
    column = pa.chunked_array([pa.array(values[:2]), pa.array([values[2], None, values[4]])])
    from qwenvl_batch.prompt import fingerprints_of

    expected = parse_fingerprints([*values[:3], None, values[4]])
    assert (fingerprints_of(column) == expected).all()
    sliced = pa.array(values).slice(2)
    assert (fingerprints_of(sliced) == parse_fingerprints(values[2:])).all()
