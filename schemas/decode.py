"""Fast batch decoder: raw wire schema v1 messages to one :class:`EventBatch` plus rejects.

The messages are joined into one NDJSON buffer and read by ``pyarrow.json.read_json`` with an
explicit schema for the fixed fields (so a number where a string belongs fails), then vetted
column by column for what pyarrow lets through (NaN/Infinity, nulls, ranges, sizes, timestamps,
unknown fields). No Python runs per message on this path.

pyarrow refuses a whole block for one bad message. Then the block is scanned in windows parsed
as single blocks, where pyarrow names the row it stopped at and costs only the rows before it;
what it reads without naming a row (unknown fields, two objects in one message) is split in
halves. Every message the fast path cannot vouch for goes to
:func:`~schemas.event_schema.check_event`, the row-at-a-time reference, which rejects it with a
reason or returns its canonical form; canonical forms get a second fast pass, grouped so that
valid events with different inferred types (feature ``a`` is 1 here and "x" there) do not meet.
Either way pyarrow builds every column, so a good message's columns do not depend on its
neighbours or on the path that read it.

>>> d = decode([b'{"schema_version":1,"event_id":"e1","ts":"2025-01-01T02:00:00+02:00",'
...             b'"model_id":"m","api_key_id":"k","output":{"label":1}}', b'{"ts":NaN}'])
>>> d.batch.event_id.tolist(), d.batch.ts_ms.tolist(), d.batch.output_label.tolist()
(['e1'], [1735689600000], ['1'])
>>> [(r.index, r.reason) for r in d.rejects]
[(1, 'non_finite_number')]
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, cast

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from schemas.batch import (
    F64,
    I32,
    I64,
    Decoded,
    EventBatch,
    Limits,
    Reject,
    StrArray,
    empty_batch,
)
from schemas.event_schema import (
    INPUT_FIELDS,
    INT64_MAX,
    OPTIONAL_STRINGS,
    OUTPUT_FIELDS,
    REQUIRED_STRINGS,
    STATUS_MAX,
    TOP_FIELDS,
    TS_END_MS,
    TS_MIN_MS,
    check_event,
)

Bool = npt.NDArray[np.bool_]
Column: TypeAlias = pa.ChunkedArray  # pyarrow has no type stubs: Any to mypy

# A message longer than this with as many brackets might nest deep enough to overflow pyarrow's
# recursive parser (it segfaults somewhere past 10,000 levels); such messages go to the reference.
_DEPTH_SCREEN = 1000
_NEWLINES_TO_TAB = bytes.maketrans(b"\n\r", b"\t\t")
_TS_SNIFF = re.compile(rb'"ts"\s*:\s*(.)')
_ERROR_ROW = re.compile(r" in row (\d+)$")
_MESSAGE_FIELDS = frozenset(("role", "content"))
# A refused block this small is checked message by message rather than split further: a
# pyarrow read costs ~200 us however small, the reference check ~20 us per message.
_LEAF = 16
# Messages per parse when scanning a refused block for its stops; pyarrow's cost per call grows
# with the buffer it is given, even when it stops early.
_WINDOW, _MAX_WINDOW = 256, 4096
DEFAULT_LIMITS = Limits()


def _explicit_schema(ts_type: pa.DataType) -> pa.Schema:
    string = pa.string()
    message = pa.struct([("role", string), ("content", string)])
    inp = pa.struct(
        [
            ("features", pa.struct([])),
            ("vector", pa.list_(pa.float64())),
            ("prompt", string),
            ("messages", pa.list_(message)),
        ]
    )
    out = pa.struct(
        [
            ("scores", pa.struct([])),
            ("value", pa.float64()),
            ("text", string),
            ("finish_reason", string),
        ]
    )
    return pa.schema(
        [
            ("ts", ts_type),
            *((name, string) for name in (*REQUIRED_STRINGS, *OPTIONAL_STRINGS)),
            ("latency_ms", pa.float64()),
            ("input", inp),
            ("output", out),
            ("attributes", pa.struct([])),
        ]
    )


# ts is a string or an integer; pyarrow would infer ISO-looking strings as naive timestamps, so
# it is read as one explicit type, guessed from the block's first message and retried as the other
_PARSE = {
    as_text: pj.ParseOptions(
        explicit_schema=_explicit_schema(pa.string() if as_text else pa.int64()),
        unexpected_field_behavior="infer",
    )
    for as_text in (True, False)
}


def _buffer(msgs: Sequence[bytes], lens: I64, joined: bytes | None = None) -> pa.Buffer:
    """The messages as NDJSON, one per line."""
    data: bytes | bytearray = b"\n".join(msgs) if joined is None else joined
    if data.count(b"\n") != len(msgs) - 1 or b"\r" in data:
        # a raw newline is legal only between tokens, where a tab is too; inside a string both
        # are illegal, so pyarrow still refuses what json.loads refuses
        data = bytearray(data.translate(_NEWLINES_TO_TAB))
        np.frombuffer(data, np.uint8)[np.cumsum(lens[:-1] + 1) - 1] = ord("\n")
    return pa.py_buffer(data)


def _parse(buf: pa.Buffer, as_text: bool, block_size: int) -> tuple[pa.Table | None, str]:
    """pyarrow's table of NDJSON, or its error message."""
    options = pj.ReadOptions(use_threads=True, block_size=block_size)
    try:
        return pj.read_json(buf, read_options=options, parse_options=_PARSE[as_text]), ""
    except pa.ArrowException as e:
        return None, str(e)


def _read(buf: pa.Buffer, lens: I64, as_text: bool) -> tuple[pa.Table | None, bool, bool]:
    """The block as a table (None if pyarrow refuses it or it is not shaped like schema v1),
    whether it failed on ts being a string in some messages and an integer in others, and the
    better guess of the ts type."""
    block_size = max(1 << 21, int(lens.max()) + 64)
    table, error = _parse(buf, as_text, block_size)
    if table is None and "Column(/ts)" in error:
        table, error = _parse(buf, not as_text, block_size)
        if table is None and "Column(/ts)" in error:
            return None, True, as_text
        as_text = not as_text
    if table is not None and (table.num_rows != len(lens) or not _shape_ok(table.schema)):
        table = None
    return table, False, as_text


def _ts_is_text(raw: bytes) -> bool:
    """A guess (the first "ts" key may be a nested one) that is only ever a speed-up."""
    sniff = _TS_SNIFF.search(raw)
    return sniff is None or sniff.group(1) == b'"'


def _children(t: pa.DataType) -> set[str]:
    return {t.field(i).name for i in range(t.num_fields)}


def _shape_ok(schema: pa.Schema) -> bool:
    """No field outside schema v1 (unknown fields may be null, so they are found per message)."""
    if not set(schema.names) <= TOP_FIELDS:
        return False
    inp, out = schema.field("input").type, schema.field("output").type
    messages = inp.field("messages").type.value_type
    return (
        _children(inp) <= set(INPUT_FIELDS)
        and _children(out) <= set(OUTPUT_FIELDS)
        and _children(messages) <= _MESSAGE_FIELDS
    )


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


def _map_bad(struct: Column | None, ok_types: tuple[pa.DataType, ...], n: int) -> Bool:
    """Rows of an open object (features, scores, attributes) with a value of a wrong type."""
    bad = np.zeros(n, bool)
    if struct is None:
        return bad
    for i in range(struct.type.num_fields):
        child = pc.struct_field(struct, i)
        if child.type not in ok_types:
            bad |= _true(child.is_valid())
        else:
            bad |= _non_finite(child)
    return bad


def _vet(table: pa.Table, limits: Limits) -> tuple[Bool, I64]:
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
class _Piece:
    """Columns of some good messages, read by one fast pass."""

    idx: I64
    cols: dict[str, npt.NDArray[Any]]
    num: dict[str, F64] = field(default_factory=dict)
    cat: dict[str, StrArray] = field(default_factory=dict)
    scores: dict[str, F64] = field(default_factory=dict)


def _piece(table: pa.Table, idx: I64, ts_ms: I64) -> _Piece:
    n, col = table.num_rows, table.column
    cols: dict[str, npt.NDArray[Any]] = {"ts_ms": ts_ms}
    for name in (*REQUIRED_STRINGS, *OPTIONAL_STRINGS):
        cols[name] = string_column(col(name), n)
    cols["status"] = int_column(_column(table, "status"), 200, n).astype(np.int32)
    cols["latency_ms"] = float_column(col("latency_ms"))
    cols["tokens_in"] = int_column(_column(table, "tokens_in"), -1, n)
    cols["tokens_out"] = int_column(_column(table, "tokens_out"), -1, n)
    piece = _Piece(idx, cols)
    inp, out = col("input"), col("output")
    feats = _field(inp, "features")
    for i in range(feats.type.num_fields if feats is not None else 0):
        assert feats is not None
        name, child = feats.type.field(i).name, pc.struct_field(feats, i)
        if child.type == pa.string():
            piece.cat[name] = child.to_numpy(zero_copy_only=False)
        elif child.type != pa.null():
            piece.num[name] = float_column(child)
    cols["vector"], cols["vector_len"] = padded_vector(pc.struct_field(inp, "vector"))
    cols["prompt"] = _prompt(inp, n)
    label = _field(out, "label")
    if label is not None and label.type == pa.float64():
        label = pc.cast(label, pa.int64())
    cols["output_label"] = string_column(label, n, to_text=True)
    scores = _field(out, "scores")
    for i in range(scores.type.num_fields if scores is not None else 0):
        assert scores is not None
        if scores.type.field(i).type != pa.null():
            piece.scores[scores.type.field(i).name] = float_column(pc.struct_field(scores, i))
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
    kinds = sorted((attrs.type.field(i).name, i) for i in range(attrs.type.num_fields))
    pieces = [
        pc.fill_null(
            pc.binary_join_element_wise(
                "," + json.dumps(name, ensure_ascii=False) + ':"',
                _json_string_body(pc.struct_field(attrs, i)),
                '"',
                "",
            ),
            "",
        )
        for name, i in kinds
        if attrs.type.field(i).type == pa.string()
    ]
    if pieces:
        body = pc.utf8_slice_codeunits(pc.binary_join_element_wise(*pieces, ""), 1)
        out = string_column(pc.binary_join_element_wise("{", body, "}", ""), n)
    else:
        out = np.full(n, "{}", dtype=object)
    out[~valid] = ""
    return out


def _days_from_civil(y: I64, m: I64, d: I64) -> I64:
    y = y - (m <= 2)
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + np.where(m > 2, -3, 9)) + 2) // 5 + d - 1
    out: I64 = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
    return out


_DAYS_IN_MONTH = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])


def ts_text_ms(ts: Column) -> tuple[I64, Bool]:
    """Epoch ms of RFC 3339 strings (fraction truncated) and whether each one is valid: the
    grammar of :data:`~schemas.event_schema.TS_PATTERN`, on the bytes of the whole column."""
    arr = ts.combine_chunks() if isinstance(ts, pa.ChunkedArray) else ts
    n = len(arr)
    ok = _true(arr.is_valid())
    if n == 0 or not ok.any():
        return np.zeros(n, np.int64), ok
    _, offsets, values = arr.buffers()
    ends = np.frombuffer(offsets, np.int32, n + 1, arr.offset * 4).astype(np.int64)
    start, length = ends[:-1], np.diff(ends)
    # padded so that fixed positions of short or null strings index something
    data = np.zeros(int(ends[-1]) + 32, np.int64)
    if ends[-1]:
        data[: ends[-1]] = np.frombuffer(values, np.uint8, int(ends[-1]))
    head = data[start[:, None] + np.arange(19)] - ord("0")  # "YYYY-MM-DDTHH:MM:SS"
    ok &= length >= 20
    ok &= ((head[:, _HEAD_DIGITS] >= 0) & (head[:, _HEAD_DIGITS] <= 9)).all(axis=1)
    ok &= (head[:, _HEAD_PUNCT] == _HEAD_PUNCT_CHARS).all(axis=1)
    ok &= np.isin(head[:, 10] + ord("0"), (ord("T"), ord("t"), ord(" ")))
    last = data[start + length - 1]
    zulu = (last == ord("Z")) | (last == ord("z"))
    tz = data[np.maximum(start + length - 6, 0)[:, None] + np.arange(6)] - ord("0")
    tz_digits = ((tz[:, [1, 2, 4, 5]] >= 0) & (tz[:, [1, 2, 4, 5]] <= 9)).all(axis=1)
    signed = np.isin(tz[:, 0] + ord("0"), (ord("+"), ord("-"))) & (tz[:, 3] == ord(":") - 48)
    ok &= zulu | (tz_digits & signed & (length >= 25))
    # between the seconds and the offset: nothing, or "." and at least one digit
    frac_at, frac_end = start + 19, start + length - np.where(zulu, 1, 6)
    non_digit = np.concatenate(([0], np.cumsum((data < ord("0")) | (data > ord("9")))))
    digits = frac_end - frac_at - 1
    has_frac = frac_end > frac_at
    frac_ok = (data[frac_at] == ord(".")) & (digits >= 1)
    frac_ok &= non_digit[np.maximum(frac_end, frac_at + 1)] == non_digit[frac_at + 1]
    ok &= ~has_frac | frac_ok
    frac_ms = np.zeros(n, np.int64)
    for k, scale in ((1, 100), (2, 10), (3, 1)):
        frac_ms += np.where(has_frac & (digits >= k), data[frac_at + k] - ord("0"), 0) * scale
    y = head[:, 0] * 1000 + head[:, 1] * 100 + head[:, 2] * 10 + head[:, 3]
    mo, d = head[:, 5] * 10 + head[:, 6], head[:, 8] * 10 + head[:, 9]
    h, mi, s = (
        head[:, 11] * 10 + head[:, 12],
        head[:, 14] * 10 + head[:, 15],
        head[:, 17] * 10 + head[:, 18],
    )
    off_h = np.where(zulu, 0, tz[:, 1] * 10 + tz[:, 2])
    off_m = np.where(zulu, 0, tz[:, 4] * 10 + tz[:, 5])
    sign = np.where(tz[:, 0] == ord("-") - 48, -1, 1)
    month = np.clip(mo, 1, 12)
    leap = (y % 4 == 0) & ((y % 100 != 0) | (y % 400 == 0)) & (month == 2)
    ok &= (mo >= 1) & (mo <= 12) & (d >= 1) & (d <= _DAYS_IN_MONTH[month - 1] + leap)
    ok &= (h < 24) & (mi < 60) & (s < 60) & (off_h < 24) & (off_m < 60)
    secs = _days_from_civil(y, month, d) * 86400 + h * 3600 + mi * 60 + s
    secs -= sign * (off_h * 60 + off_m) * 60
    return np.where(ok, secs * 1000 + frac_ms, 0), ok


_HEAD_DIGITS = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18]
_HEAD_PUNCT = [4, 7, 13, 16]
_HEAD_PUNCT_CHARS = np.array([ord(c) - ord("0") for c in "--::"])


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _Run:
    """One call of :func:`decode`: the fast passes, the reference checks and their results."""

    def __init__(self, messages: list[bytes], limits: Limits, lens: I64) -> None:
        self.messages, self.limits, self.lens = messages, limits, lens
        self.rejects: list[Reject] = []
        self.pieces: list[_Piece] = []
        self.redo: list[tuple[int, dict[str, Any]]] = []

    def screen(self, data: bytes) -> Bool:
        """Messages the fast path may read: in size, starting with "{", not possibly deep."""
        lens, n = self.lens, len(self.lens)
        ok = (lens > 0) & (lens <= self.limits.max_message_bytes)
        first = np.zeros(n, np.uint8)
        first[ok] = np.frombuffer(data, np.uint8)[(np.cumsum(lens + 1) - lens - 1)[ok]]
        ok &= first == ord("{")
        if not data.isascii():
            # pyarrow does not validate UTF-8 (bad bytes surface later, as errors on conversion)
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                for i in np.flatnonzero(ok):
                    ok[i] = self.messages[i].isascii() or _is_utf8(self.messages[i])
        for i in np.flatnonzero(ok & (lens >= _DEPTH_SCREEN)):
            m = self.messages[i]
            ok[i] = m.count(b"{") + m.count(b"[") < _DEPTH_SCREEN
        return ok

    def reference(self, i: int) -> None:
        raw = bytes(self.messages[i])
        result = check_event(raw, self.limits)
        if isinstance(result, tuple):
            self.rejects.append(Reject(i, result[0], result[1], raw))
        else:
            self.redo.append((i, result))

    def block(self, idx: I64, joined: bytes | None = None, rounds: int = 0) -> None:
        """Decode raw messages; set aside the ones pyarrow refuses for the reference check."""
        everything = joined is not None  # the first block of the batch: all the messages
        msgs = self.messages if everything else [self.messages[i] for i in idx]
        lens = self.lens if everything else self.lens[idx]
        buf = _buffer(msgs, lens, joined)
        table, ts_mixed, as_text = _read(buf, lens, _ts_is_text(msgs[0]))
        if table is not None:
            self.accept(table, idx)
            return
        text = np.array([_ts_is_text(m) for m in msgs]) if ts_mixed else None
        if text is not None and text.any() and not text.all():
            self.block(idx[text])
            self.block(idx[~text])
        elif rounds >= 2 or len(idx) <= _LEAF:
            # parts read on their own but not all together: valid messages whose types differ
            for i in idx:
                self.reference(int(i))
        else:
            good = self.scan(idx, buf, lens, as_text)
            if len(good):
                self.block(good, rounds=rounds + 1)

    def scan(self, idx: I64, buf: pa.Buffer, lens: I64, as_text: bool) -> I64:
        """The messages before, between and after the ones pyarrow stops at; those go to the
        reference check. Parsed as one block, a window of messages costs only the rows up to
        the stop, and pyarrow names the row it stopped at."""
        starts = np.cumsum(lens + 1) - lens - 1
        good: list[I64] = []
        at, stops, window = 0, 0, _WINDOW
        while at < len(idx):
            if stops >= _LEAF and at < stops * _LEAF:
                # dense errors: message by message is cheaper than a parse per error
                for i in idx[at:]:
                    self.reference(int(i))
                break
            end = min(len(idx), at + window)
            part = buf.slice(int(starts[at]), int(starts[end - 1] + lens[end - 1] - starts[at]))
            table, error = _parse(part, as_text, part.size + 1)
            row = _ERROR_ROW.search(error)
            if table is not None or row is None:
                chunk = idx[at:end]
                ok = table is not None and table.num_rows == len(chunk) and _shape_ok(table.schema)
                good.append(chunk if ok else self.split(chunk))
                at, window = end, min(2 * window, _MAX_WINDOW)
                continue
            stop = min(at + int(row.group(1)), end - 1)
            if stop - at < _LEAF and "changed from" in error:
                # the odd type may be the first rows', not the stop's: check them all
                for i in idx[at : stop + 1]:
                    self.reference(int(i))
            else:
                good.append(idx[at:stop])
                self.reference(int(idx[stop]))
            at, stops = stop + 1, stops + 1
        return np.concatenate(good) if good else np.empty(0, np.int64)

    def split(self, idx: I64) -> I64:
        """The messages of halves pyarrow reads; the others go to the reference check. For what
        pyarrow reads without naming a row: unknown fields, two objects in one message."""
        if len(idx) <= _LEAF:
            for i in idx:
                self.reference(int(i))
            return np.empty(0, np.int64)
        lens = self.lens[idx]
        msgs = [self.messages[i] for i in idx]
        table, ts_mixed, _ = _read(_buffer(msgs, lens), lens, _ts_is_text(msgs[0]))
        if table is not None or ts_mixed:
            return idx
        half = len(idx) // 2
        return np.concatenate([self.split(idx[:half]), self.split(idx[half:])])

    def accept(self, table: pa.Table, idx: I64, trusted: bool = False) -> None:
        """Keep the rows of a table that pass the vetting; check the others one by one."""
        bad, ts_ms = _vet(table, self.limits)
        if bad.any():
            if trusted:
                i = int(idx[np.flatnonzero(bad)[0]])
                raise AssertionError(f"decoder bug: fast path refuses canonical message {i}")
            for i in idx[bad]:
                self.reference(int(i))
            if bad.all():
                return
            table, idx, ts_ms = table.filter(pa.array(~bad)), idx[~bad], ts_ms[~bad]
        self.pieces.append(_piece(table, idx, ts_ms))

    def trusted(self, idx: I64, msgs: list[bytes]) -> None:
        """Decode canonical forms of valid messages, splitting blocks whose types conflict."""
        lens = np.fromiter(map(len, msgs), np.int64, len(msgs))
        table, _, _ = _read(_buffer(msgs, lens), lens, _ts_is_text(msgs[0]))
        if table is not None:
            self.accept(table, idx, trusted=True)
        elif len(idx) == 1:
            raise AssertionError(f"decoder bug: pyarrow refuses canonical message {idx[0]}")
        else:
            half = len(idx) // 2
            self.trusted(idx[:half], msgs[:half])
            self.trusted(idx[half:], msgs[half:])

    def redo_valid(self) -> None:
        """Decode the valid messages the fast path could not, by canonical form, in groups whose
        inferred types agree (a feature may be a number in one event and a string in another)."""
        groups: list[tuple[dict[str, str], list[tuple[int, dict[str, Any]]]]] = []
        for item in sorted(self.redo, key=lambda item: item[0]):
            kinds = _kinds(item[1])
            for seen, members in groups:
                if all(seen.get(path, kind) == kind for path, kind in kinds.items()):
                    seen.update(kinds)
                    members.append(item)
                    break
            else:
                groups.append((kinds, [item]))
        for _, members in groups:
            idx = np.array([i for i, _ in members], np.int64)
            self.trusted(idx, [_canonical_bytes(ev) for _, ev in members])


def _kind(v: Any) -> str:
    return "string" if isinstance(v, str) else "bool" if isinstance(v, bool) else "number"


def _kinds(ev: dict[str, Any]) -> dict[str, str]:
    """The JSON kind at every path whose pyarrow type is inferred and may differ between events."""
    out = {"ts": _kind(ev["ts"])}
    if "label" in ev.get("output", {}):
        out["label"] = _kind(ev["output"]["label"])
    if "ground_truth" in ev:
        out["ground_truth"] = _kind(ev["ground_truth"])
    for name, v in ev.get("input", {}).get("features", {}).items():
        if v is not None:
            out["features/" + name] = _kind(v)
    return out


def _canonical_bytes(ev: dict[str, Any]) -> bytes:
    text = json.dumps(ev, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")


def decode(
    messages: Sequence[bytes],
    limits: Limits = DEFAULT_LIMITS,
    partition: npt.NDArray[np.integer[Any]] | None = None,
    offset: npt.NDArray[np.integer[Any]] | None = None,
) -> Decoded:
    """Decode raw wire schema v1 messages; ``rows`` maps each batch row to its message."""
    n = len(messages)
    part = np.zeros(n, np.int32) if partition is None else np.asarray(partition, np.int32)
    offs = np.arange(n, dtype=np.int64) if offset is None else np.asarray(offset, np.int64)
    if part.shape != (n,) or offs.shape != (n,):
        raise ValueError(f"partition and offset need shape ({n},), got {part.shape}, {offs.shape}")
    if n == 0:
        return Decoded(empty_batch(), np.empty(0, np.int64), ())
    msgs = list(messages)
    lens = np.fromiter(map(len, msgs), np.int64, n)
    run = _Run(msgs, limits, lens)
    joined = b"\n".join(msgs)
    ok = run.screen(joined)
    for i in np.flatnonzero(~ok):
        run.reference(int(i))
    idx = np.flatnonzero(ok)
    if len(idx):
        run.block(idx, joined if len(idx) == n else None)
    if run.redo:
        run.redo_valid()
    rejects = tuple(sorted(run.rejects, key=lambda r: r.index))
    if not run.pieces:
        return Decoded(empty_batch(), np.empty(0, np.int64), rejects)
    batch, rows = _assemble(run.pieces, lens, part, offs)
    return Decoded(batch, rows, rejects)


def _assemble(pieces: list[_Piece], lens: I64, part: I32, offs: I64) -> tuple[EventBatch, I64]:
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
