"""Columns of the fast decoder: vetting pyarrow's table of a block and building batch columns.

:func:`vet` finds the rows of a table that pyarrow read but wire schema v1 refuses (NaN, nulls,
ranges, sizes, timestamps), which then go to the reference check; :func:`to_piece` turns the other
rows into numpy columns, and :func:`assemble` joins the pieces of one batch in input order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, TypeAlias, cast

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from schemas.batch import F64, I32, I64, EventBatch, Limits, StrArray
from schemas.event_schema import INT64_MAX, OPTIONAL_STRINGS, REQUIRED_STRINGS, STATUS_MAX
from schemas.timestamps import TS_END_MS, TS_MIN_MS, Bool, ts_text_ms

Column: TypeAlias = pa.ChunkedArray  # pyarrow has no type stubs: Any to mypy


def _true(x: Column | pa.Array) -> Bool:
    """A boolean column as numpy, null as False."""
    out: Bool = pc.fill_null(x, False).to_numpy(zero_copy_only=False)
    return out


def _non_finite(x: Column) -> Bool:
    if not pa.types.is_floating(x.type):
        return np.zeros(len(x), bool)
    return _true(pc.invert(pc.is_finite(x)))


def _field(struct: Column, name: str) -> Column | None:
    i = struct.type.get_field_index(name)
    return pc.struct_field(struct, i) if i >= 0 else None


def _members(struct: Column | None) -> list[tuple[str, Column]]:
    """(name, values) of every field of an open object (features, scores, attributes), parent
    nulls applied. One flatten for all: ``pc.struct_field`` costs time in the number of fields
    per call, so a message with 30,000 feature names would take minutes field by field."""
    if struct is None or struct.type.num_fields == 0:
        return []
    names = [struct.type.field(i).name for i in range(struct.type.num_fields)]
    return list(zip(names, struct.flatten(), strict=True))


def _map_bad(struct: Column | None, ok_types: tuple[pa.DataType, ...], n: int) -> Bool:
    """Rows of an open object (features, scores, attributes) with a value of a wrong type."""
    bad = np.zeros(n, bool)
    for _, child in _members(struct):
        if child.type not in ok_types:
            bad |= _true(child.is_valid())
        else:
            bad |= _non_finite(child)
    return bad


def vet(table: pa.Table, limits: Limits) -> tuple[Bool, I64]:
    """Rows that need the reference check, and ts in epoch ms (meaningful for the others)."""
    n, col = table.num_rows, table.column
    version = _column(table, "schema_version")
    bad = np.ones(n, bool) if version is None else ~_true(version.is_valid())
    bad |= _int_bad(version, 1, 1)
    for name in REQUIRED_STRINGS:
        bad |= ~_true(pc.greater(pc.binary_length(col(name)), 0))
    ts = col("ts")
    if pa.types.is_string(ts.type):
        ts_ms, ok = ts_text_ms(ts)
    else:
        ts_ms, ok = int_column(ts, 0, n), _true(ts.is_valid())
    bad |= ~(ok & (ts_ms >= TS_MIN_MS) & (ts_ms < TS_END_MS))
    bad |= _int_bad(_column(table, "status"), 0, STATUS_MAX)
    for name in ("tokens_in", "tokens_out"):
        bad |= _int_bad(_column(table, name), 0, INT64_MAX)
    bad |= _non_finite(col("latency_ms"))
    inp, out, text_max = col("input"), col("output"), limits.max_text_bytes
    numeric = (pa.int64(), pa.float64(), pa.bool_(), pa.string(), pa.null())
    bad |= _map_bad(_field(inp, "features"), numeric, n)
    vector = pc.struct_field(inp, "vector")
    bad |= _true(pc.greater(pc.list_value_length(vector), limits.max_vector_dim))
    values = pc.list_flatten(vector)
    _mark(bad, vector, _true(pc.invert(pc.is_finite(values))) | ~_true(values.is_valid()))
    bad |= _true(pc.greater(pc.binary_length(pc.struct_field(inp, "prompt")), text_max))
    messages = pc.struct_field(inp, "messages")
    items = pc.list_flatten(messages)
    content = pc.struct_field(items, "content")
    item_bad = ~_true(items.is_valid()) | ~_true(pc.struct_field(items, "role").is_valid())
    item_bad |= ~_true(content.is_valid()) | _true(pc.greater(pc.binary_length(content), text_max))
    _mark(bad, messages, item_bad)
    bad |= _label_bad(_field(out, "label"))
    bad |= _map_bad(_field(out, "scores"), (pa.int64(), pa.float64(), pa.null()), n)
    bad |= _non_finite(pc.struct_field(out, "value"))
    bad |= _true(pc.greater(pc.binary_length(pc.struct_field(out, "text")), text_max))
    truth = col("ground_truth") if "ground_truth" in table.schema.names else None
    bad |= _truth_bad(truth, n)
    bad |= _map_bad(col("attributes"), (pa.string(), pa.null()), n)
    return bad, ts_ms


def _column(table: pa.Table, name: str) -> Column | None:
    return table.column(name) if name in table.schema.names else None


def _int_bad(x: Column | None, lo: int, hi: int) -> Bool | bool:
    """Rows whose value is not an integral number in [lo, hi] (null is fine)."""
    if x is None or x.type == pa.null():
        return False
    if x.type == pa.int64():
        return _true(pc.or_(pc.less(x, lo), pc.greater(x, hi)))
    if x.type == pa.float64():
        ok = pc.and_(pc.equal(pc.floor(x), x), pc.greater_equal(x, float(lo)))
        ok = pc.and_(ok, pc.less(x, float(hi) + 1))
        return _true(x.is_valid()) & ~_true(ok)
    return _true(x.is_valid())


def _truth_bad(truth: Column | None, n: int) -> Bool:
    if truth is None or truth.type in (pa.string(), pa.int64(), pa.null()):
        return np.zeros(n, bool)
    if pa.types.is_floating(truth.type):
        return _non_finite(truth)
    return _true(truth.is_valid())


def _label_bad(label: Column | None) -> Bool | bool:
    """An output.label that is not a string or an integer within +-2**53."""
    if label is None or label.type in (pa.string(), pa.null()):
        return False
    if label.type == pa.int64():
        return _true(pc.greater(pc.abs(label), 2**53))
    if label.type == pa.float64():
        integral = pc.equal(pc.floor(label), label)
        return ~_true(pc.and_(integral, pc.less_equal(pc.abs(label), 2.0**53)))
    return _true(label.is_valid())


def _mark(bad: Bool, lists: Column, item_bad: Bool) -> None:
    """Set ``bad`` on the rows whose list holds a bad item."""
    if item_bad.any():
        bad[pc.list_parent_indices(lists).to_numpy()[item_bad]] = True


@dataclass
class Piece:
    """Columns of some good messages, read by one fast pass."""

    idx: I64
    cols: dict[str, npt.NDArray[Any]]
    num: dict[str, F64] = field(default_factory=dict)
    cat: dict[str, StrArray] = field(default_factory=dict)
    scores: dict[str, F64] = field(default_factory=dict)


_NUMERIC = (pa.int64(), pa.float64(), pa.bool_())


def to_piece(table: pa.Table, idx: I64, ts_ms: I64) -> Piece:
    n, col = table.num_rows, table.column
    cols: dict[str, npt.NDArray[Any]] = {"ts_ms": ts_ms}
    for name in (*REQUIRED_STRINGS, *OPTIONAL_STRINGS):
        cols[name] = string_column(col(name), n)
    cols["status"] = int_column(_column(table, "status"), 200, n).astype(np.int32)
    cols["latency_ms"] = float_column(col("latency_ms"))
    cols["tokens_in"] = int_column(_column(table, "tokens_in"), -1, n)
    cols["tokens_out"] = int_column(_column(table, "tokens_out"), -1, n)
    piece = Piece(idx, cols)
    inp, out = col("input"), col("output")
    # a member of another type (an object, an array) is null in every row left after vetting;
    # its type survives the filter, and casting it would raise
    for name, child in _members(_field(inp, "features")):
        if child.type == pa.string():
            piece.cat[name] = child.to_numpy(zero_copy_only=False)
        elif child.type in _NUMERIC:
            piece.num[name] = float_column(child)
    cols["vector"], cols["vector_len"] = padded_vector(pc.struct_field(inp, "vector"))
    cols["prompt"] = _prompt(inp, n)
    label = _field(out, "label")
    if label is not None and label.type == pa.float64():
        label = pc.cast(label, pa.int64())
    cols["output_label"] = string_column(label, n, to_text=True)
    for name, child in _members(_field(out, "scores")):
        if child.type in _NUMERIC:
            piece.scores[name] = float_column(child)
    cols["output_value"] = float_column(pc.struct_field(out, "value"))
    cols["output_text"] = string_column(pc.struct_field(out, "text"), n)
    cols["finish_reason"] = string_column(pc.struct_field(out, "finish_reason"), n)
    truth = col("ground_truth") if "ground_truth" in table.schema.names else None
    cols["ground_truth"] = number_text(truth, n)
    cols["attributes"] = attributes_text(col("attributes"), n)
    return piece


def _prompt(inp: Column, n: int) -> StrArray:
    """input.prompt, else the messages' contents joined by newlines, else ""."""
    prompt = pc.struct_field(inp, "prompt")
    messages = pc.struct_field(inp, "messages")
    if messages.null_count == n:
        return string_column(prompt, n)
    joined = [
        pa.ListArray.from_arrays(chunk.offsets, pc.struct_field(chunk.values, "content"))
        for chunk in messages.chunks
    ]
    text = pc.binary_join(pa.chunked_array(joined, pa.list_(pa.string())), "\n")
    return string_column(pc.coalesce(prompt, pc.if_else(messages.is_valid(), text, None)), n)


def string_column(x: Column | None, n: int, to_text: bool = False) -> StrArray:
    """A string column as an object array, "" where null; ``to_text`` casts numbers first."""
    if x is None or x.null_count == len(x):
        return np.full(n, "", dtype=object)
    if to_text and x.type != pa.string():
        x = pc.cast(x, pa.string())
    out: StrArray = pc.fill_null(x, "").to_numpy(zero_copy_only=False)
    return out


def float_column(x: Column) -> F64:
    out: F64 = pc.fill_null(pc.cast(x, pa.float64(), safe=False), np.nan).to_numpy()
    return out


def int_column(x: Column | None, default: int, n: int) -> I64:
    """An integer column (read as int64, or as float64 when some value was written 200.0)."""
    if x is None or x.null_count == len(x):
        return np.full(n, default, np.int64)
    return np.asarray(pc.fill_null(pc.cast(x, pa.int64()), default).to_numpy(), dtype=np.int64)


def number_text(x: Column | None, n: int) -> StrArray:
    """ground_truth: strings as they are, numbers as the shortest text of their float64."""
    if x is not None and x.type in (pa.int64(), pa.float64()):
        x = pc.cast(x, pa.float64(), safe=False)
    return string_column(x, n, to_text=True)


def padded_vector(vector: Column) -> tuple[F64, I32]:
    n = len(vector)
    lens = pc.fill_null(pc.list_value_length(vector), 0).to_numpy().astype(np.int32)
    out = np.full((n, int(lens.max()) if n else 0), np.nan)
    if out.size:
        flat = pc.list_flatten(vector).to_numpy()
        starts = np.repeat(np.cumsum(lens) - lens, lens)
        out[np.repeat(np.arange(n), lens), np.arange(len(flat)) - starts] = flat
    return out, lens


_SHORT_ESCAPES = {"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _json_string_body(x: Column) -> Column:
    """Strings escaped exactly as ``json.dumps(..., ensure_ascii=False)`` does, without quotes."""
    x = pc.replace_substring(pc.replace_substring(x, "\\", "\\\\"), '"', '\\"')
    if _true(pc.match_substring_regex(x, r"[\x00-\x1f]")).any():
        for code in range(32):
            c = chr(code)
            x = pc.replace_substring(x, c, _SHORT_ESCAPES.get(c, f"\\u{code:04x}"))
    return x


def attributes_text(attrs: Column, n: int) -> StrArray:
    """Compact JSON text with sorted keys (null values dropped), "" where absent."""
    valid = _true(attrs.is_valid())
    if not valid.any():
        return np.full(n, "", dtype=object)
    pieces = [
        pc.fill_null(
            pc.binary_join_element_wise(
                "," + json.dumps(name, ensure_ascii=False) + ':"', _json_string_body(child), '"', ""
            ),
            "",
        )
        for name, child in sorted(_members(attrs), key=lambda member: member[0])
        if child.type == pa.string()
    ]
    if pieces:
        body = pc.utf8_slice_codeunits(pc.binary_join_element_wise(*pieces, ""), 1)
        out = string_column(pc.binary_join_element_wise("{", body, "}", ""), n)
    else:
        out = np.full(n, "{}", dtype=object)
    out[~valid] = ""
    return out


def assemble(pieces: list[Piece], lens: I64, part: I32, offs: I64) -> tuple[EventBatch, I64]:
    """Concatenate pieces in input order and finish the batch-level columns."""
    idx = np.concatenate([p.idx for p in pieces])
    order = np.argsort(idx, kind="stable")
    rows, m = idx[order], len(idx)
    sizes = [len(p.idx) for p in pieces]

    def column(name: str) -> npt.NDArray[Any]:
        return np.concatenate([p.cols[name] for p in pieces])[order]

    def merged(maps: list[dict[str, npt.NDArray[Any]]], fill: Any) -> dict[str, npt.NDArray[Any]]:
        names = sorted(set().union(*maps))
        return {
            name: np.concatenate(
                [
                    mp.get(name, np.full(k, fill, dtype=object if fill is None else float))
                    for mp, k in zip(maps, sizes, strict=True)
                ]
            )[order]
            for name in names
        }

    num = merged([p.num for p in pieces], np.nan)
    scores = merged([p.scores for p in pieces], np.nan)
    cat_codes, cat_values = _encode(merged([p.cat for p in pieces], None), m)
    width = max(p.cols["vector"].shape[1] for p in pieces)
    vector = np.concatenate(
        [
            np.pad(
                p.cols["vector"],
                ((0, 0), (0, width - p.cols["vector"].shape[1])),
                constant_values=np.nan,
            )
            for p in pieces
        ]
    )[order]
    plain: dict[str, Any] = {name: column(name) for name in _PLAIN_COLUMNS}
    batch = EventBatch(
        **plain,
        num_names=tuple(num),
        num_values=_matrix(num, m),
        cat_names=tuple(cat_values),
        cat_codes=cat_codes,
        cat_values=tuple(cat_values.values()),
        vector=vector,
        score_labels=tuple(scores),
        scores=_matrix(scores, m),
        partition=part[rows],
        offset=offs[rows],
        payload_bytes=lens[rows].astype(np.int32),
    )
    return batch, rows


_PLAIN_COLUMNS = (
    *REQUIRED_STRINGS,
    *OPTIONAL_STRINGS,
    "ts_ms",
    "status",
    "latency_ms",
    "tokens_in",
    "tokens_out",
    "vector_len",
    "prompt",
    "output_label",
    "output_value",
    "output_text",
    "finish_reason",
    "ground_truth",
    "attributes",
)


def _matrix(columns: dict[str, npt.NDArray[Any]], m: int) -> F64:
    out = np.empty((m, len(columns)), np.float64)
    for j, values in enumerate(columns.values()):
        out[:, j] = values
    return out


def _encode(cat: dict[str, npt.NDArray[Any]], m: int) -> tuple[I32, dict[str, tuple[str, ...]]]:
    """Dictionary-encode string features: codes into sorted values, -1 where absent."""
    codes = np.full((m, len(cat)), -1, np.int32)
    values: dict[str, tuple[str, ...]] = {}
    for j, (name, column) in enumerate(cat.items()):
        present = np.not_equal(column, cast(Any, None))
        uniq, inverse = np.unique(column[present], return_inverse=True)
        codes[present, j] = inverse
        values[name] = tuple(uniq.tolist())
    return codes, values
