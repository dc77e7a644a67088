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
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.json as pj

from schemas.batch import I64, Decoded, Limits, Reject, empty_batch
from schemas.columns import Piece, assemble, to_piece, vet
from schemas.event_schema import (
    INPUT_FIELDS,
    OPTIONAL_STRINGS,
    OUTPUT_FIELDS,
    REQUIRED_STRINGS,
    TOP_FIELDS,
    check_event,
)
from schemas.timestamps import Bool
from schemas.timestamps import ts_text_ms as ts_text_ms

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
        self.pieces: list[Piece] = []
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
        bad, ts_ms = vet(table, self.limits)
        if bad.any():
            if trusted:
                i = int(idx[np.flatnonzero(bad)[0]])
                raise AssertionError(f"decoder bug: fast path refuses canonical message {i}")
            for i in idx[bad]:
                self.reference(int(i))
            if bad.all():
                return
            table, idx, ts_ms = table.filter(pa.array(~bad)), idx[~bad], ts_ms[~bad]
        self.pieces.append(to_piece(table, idx, ts_ms))

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
    batch, rows = assemble(run.pieces, lens, part, offs)
    return Decoded(batch, rows, rejects)
