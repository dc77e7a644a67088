"""Saving and loading detector state and source positions, consistently.

A checkpoint has a sequence number ``seq``. Its state rows (only keys changed since the last
checkpoint) are written first, then one row per partition to ``checkpoints``: a checkpoint
exists once its positions are written. On start, the newest ``seq`` in ``checkpoints`` is the
committed one; state rows written after it by a process that died mid-checkpoint are deleted
before anything is read, so they can never win a merge. Each key's state is the row with the
largest ``seq`` not above the committed one.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detectors.base import Detector, KeySpace, Snapshot, StateRows
from detectors.models.reference import Reference
from streams.store.store import Store
from streams.worker.pipeline import Pipeline

MODEL = "model"  # entity type of model-level state rows
ROUTING = "_routing"
REFERENCES = "_references"
CLOCKS = "_clocks"  # the pipeline's event-time bookkeeping (Pipeline.clocks)
KEYS = "_keys"  # detector name of the key map's rows: each key's last-seen event time
EXTRA = "+extra"  # entity type suffix of per-key blobs (Snapshot.extras)
# how reads of model_references pick one row per (model_id, model_version): operator's first
REFERENCE_PRECEDENCE = "(automatic = 0, seq)"
# sink tables whose rows carry the checkpoint that wrote them, and the column
SEQ_COLUMNS = {
    "outbox": "created_seq",
    "alerts": "ckpt_seq",
    "findings": "ckpt_seq",
    "window_metrics": "ckpt_seq",
}


def committed_seq(store: Store) -> int:
    rows = store.query("SELECT max(seq) FROM checkpoints").result_rows
    return int(rows[0][0] or 0)


def begin(store: Store) -> None:
    """Once per open store: drop rows of an unfinished checkpoint (state, outbox) and start the
    sequence after every row written so far. Workers sharing one store in a process share the
    sequence."""
    if store.next_seq:
        return
    seq = committed_seq(store)
    stale = store.query(
        "SELECT count() FROM detector_state WHERE seq > {s:UInt64}", {"s": seq}
    ).result_rows[0][0]
    if stale:
        store.command("DELETE FROM detector_state WHERE seq > {s:UInt64}", {"s": seq})
    # outbox rows staged by that checkpoint: its replay stages them again
    # (streams/alerting/outbox.py);
    # decisions it flushed: its replay decides again (schemas/clickhouse/0003_checkpoint_seq.sql)
    for table, column in SEQ_COLUMNS.items():
        written = store.query(
            f"SELECT count() FROM {table} WHERE {column} > {{s:UInt64}}", {"s": seq}
        ).result_rows[0][0]
        if written:
            store.command(f"DELETE FROM {table} WHERE {column} > {{s:UInt64}}", {"s": seq})
    # automatic references it wrote: its replay builds them again; an operator's stay
    auto = "automatic = 1 AND seq > {s:UInt64}"
    written = store.query(f"SELECT count() FROM model_references WHERE {auto}", {"s": seq})
    if written.result_rows[0][0]:
        store.command(f"DELETE FROM model_references WHERE {auto}", {"s": seq})
    # above every row written so far, an operator's reference set before the first run too
    newest = max(
        int(store.query(f"SELECT max(seq) FROM {table}").result_rows[0][0] or 0)
        for table in ("detector_state", "model_references")
    )
    store.next_seq = max(seq, newest) + 1


def take_seq(store: Store) -> int:
    seq = store.next_seq
    store.next_seq += 1
    return seq


def positions(store: Store, source: str) -> dict[int, tuple[int, int]]:
    """partition -> (next offset, max event time) of the committed checkpoint of ``source``."""
    rows = store.query(
        "SELECT partition, argMax(next_offset, seq), argMax(max_ts_ms, seq) FROM checkpoints "
        "WHERE source = {src:String} GROUP BY partition",
        {"src": source},
    ).result_rows
    return {int(p): (int(o), int(t)) for p, o, t in rows}


def _state_table(seq: int, det: str, rows: list[tuple[str, int, str, bytes, int]]) -> pa.Table:
    return pa.table(
        {
            "detector": pa.array([det] * len(rows), pa.string()),
            "entity_type": pa.array([r[0] for r in rows], pa.string()),
            "partition": pa.array([r[1] for r in rows], pa.int32()),
            "key": pa.array([r[2] for r in rows], pa.string()),
            "data": pa.array([r[3] for r in rows], pa.binary()),
            "deleted": pa.array([r[4] for r in rows], pa.uint8()),
            "seq": pa.array([seq] * len(rows), pa.uint64()),
        }
    )


def _keyed_rows(rows: StateRows) -> list[tuple[str, int, str, bytes, int]]:
    raw = rows.data.tobytes()
    width = rows.data.dtype.itemsize
    parts = rows.partition.tolist()
    return [
        (rows.entity_type, parts[i], key, raw[i * width : (i + 1) * width], 0)
        for i, key in enumerate(rows.keys)
    ]


@dataclass(frozen=True, slots=True)
class Prepared:
    """One checkpoint's rows, built once: writing them again after a transient store failure
    writes the same rows with the same ``seq`` (snapshots clear the dirty marks, so they cannot
    be taken twice)."""

    seq: int
    tables: tuple[tuple[str, pa.Table], ...]  # (store table, rows), positions last
    snapshot_s: dict[str, float] = field(default_factory=dict)  # seconds per detector snapshot

    def without(self, partitions: set[int]) -> Prepared:
        """The checkpoint minus the keyed state and positions of revoked ``partitions`` (their
        new owner replays from the previous checkpoint; model-level rows stay)."""
        if not partitions:
            return self
        drop = pa.array(sorted(partitions), pa.int32())
        kept = tuple(
            (name, t.filter(pc.invert(pc.is_in(t["partition"], value_set=drop))))
            for name, t in self.tables
        )
        return Prepared(self.seq, kept, self.snapshot_s)


def prepare(
    store: Store,
    pipeline: Pipeline,
    source: str,
    next_offsets: dict[int, int],
    new_references: list[Reference],
    blobs: dict[str, bytes] | None = None,
) -> Prepared:
    """Take one checkpoint's state rows and positions (no I/O: :func:`write` stores them);
    ``blobs`` are the worker's own model-level state (the alert lifecycle), by name."""
    seq = take_seq(store)
    tables: list[tuple[str, pa.Table]] = []
    evicted = pipeline.evicted
    pipeline.evicted = {}
    snapshot_s: dict[str, float] = {}
    for det in pipeline.detectors:
        t0 = time.perf_counter()
        snap = det.snapshot(pipeline.keyspace)
        rows: list[tuple[str, int, str, bytes, int]] = []
        # deletions first: a key evicted and seen again since the last checkpoint has both rows
        # under this seq, and the later one must win (in ``load`` and in the table's merges)
        for et, keys in evicted.items():
            if et in det.entity_types:
                rows.extend((et, part, k, b"", 1) for k, part in keys)
        for keyed in snap.keyed:
            rows.extend(_keyed_rows(keyed))
        for et, key, part, blob in snap.extras:
            rows.append((et + EXTRA, part, key, blob or b"", 0 if blob else 1))
        if snap.model is not None:
            rows.append((MODEL, -1, "", snap.model, 0))
        if rows:
            tables.append(("detector_state", _state_table(seq, det.name, rows)))
        snapshot_s[det.name] = time.perf_counter() - t0
    key_rows = _key_rows(pipeline, evicted)
    if key_rows:
        tables.append(("detector_state", _state_table(seq, KEYS, key_rows)))
    extra: list[tuple[str, int, str, bytes, int]] = [(MODEL, -1, CLOCKS, pipeline.clocks(), 0)]
    if pipeline.features.changed:
        extra.append((MODEL, -1, ROUTING, pipeline.features.snapshot(), 0))
    extra.append((MODEL, -1, REFERENCES, pipeline.references.snapshot(), 0))
    extra.extend((MODEL, -1, name, blob, 0) for name, blob in (blobs or {}).items())
    tables.append(("detector_state", _state_table(seq, "_pipeline", extra)))
    now_ms = int(time.time() * 1000)
    if new_references:
        refs = {
            "model_id": [r.model_id for r in new_references],
            "model_version": [r.model_version for r in new_references],
            "n_events": pa.array([r.n_events for r in new_references], pa.uint64()),
            "source": ["auto"] * len(new_references),
            "data": pa.array([r.to_bytes() for r in new_references], pa.binary()),
            "created_at": pa.array([now_ms] * len(new_references), pa.timestamp("ms")),
            "seq": pa.array([seq] * len(new_references), pa.uint64()),
            "automatic": pa.array([1] * len(new_references), pa.uint8()),
        }
        tables.append(("model_references", pa.table(refs)))
    maxts = pipeline.watermark.max_ts
    positions = {
        "source": [source] * len(next_offsets),
        "partition": pa.array(list(next_offsets), pa.int32()),
        "next_offset": pa.array(list(next_offsets.values()), pa.int64()),
        "max_ts_ms": pa.array([maxts.get(p, -(2**63)) for p in next_offsets], pa.int64()),
        "seq": pa.array([seq] * len(next_offsets), pa.uint64()),
        "saved_at": pa.array([now_ms] * len(next_offsets), pa.timestamp("ms")),
    }
    tables.append(("checkpoints", pa.table(positions)))
    return Prepared(seq, tuple(tables), snapshot_s)


def _key_rows(
    pipeline: Pipeline, evicted: dict[str, list[tuple[str, int]]]
) -> list[tuple[str, int, str, bytes, int]]:
    """Rows of the key map: the last-seen time of every key seen since the last checkpoint,
    and a deletion for every key evicted since. Without them a restore would know a key's
    detector state but not when it was last seen, and evict it at the wrong time."""
    rows: list[tuple[str, int, str, bytes, int]] = []
    for et, gone in sorted(evicted.items()):
        rows.extend((et, part, k, b"", 1) for k, part in gone)  # first: see ``load``
    for et, slots in sorted(pipeline.keyspace.maps.items()):
        keys, parts, seen = slots.take_seen()
        rows.extend(_keyed_rows(StateRows(et, keys, parts, seen.view("V8"))))
    return rows


def write(store: Store, prepared: Prepared) -> int:
    """Store a prepared checkpoint, positions last; safe to call again after a failure."""
    for name, table in prepared.tables:
        store.insert_arrow(name, table)
    return sum(t.num_rows for name, t in prepared.tables if name == "detector_state")


def save(
    store: Store,
    pipeline: Pipeline,
    source: str,
    next_offsets: dict[int, int],
    new_references: list[Reference],
) -> int:
    """Write one checkpoint; returns the number of state rows written."""
    return write(store, prepare(store, pipeline, source, next_offsets, new_references))


def load(
    store: Store, pipeline: Pipeline, partitions: set[int] | None, model_level: bool = True
) -> int:
    """Restore keyed state rows of ``partitions`` (all when None) and, with ``model_level``,
    model-level state and the stored references (loaded once per worker: later assignments
    must not roll it back). References are loaded even before the first checkpoint: an
    operator may set one on a fresh store."""
    seq = committed_seq(store)
    if seq == 0:
        if model_level:
            _add_references(store, pipeline)
        return 0
    where = "seq <= {s:UInt64}"
    params: dict[str, Any] = {"s": seq}
    if partitions is not None:
        where += " AND partition IN {parts:Array(Int32)}"
        params["parts"] = sorted(partitions)
    if model_level:
        where = f"({where}) OR (seq <= {{s:UInt64}} AND partition = -1)"
    else:
        where += " AND partition >= 0"
    # within one seq a deletion is written before the key's fresh rows (``prepare``): they win
    newest = "(seq, deleted = 0)"
    result = store.query(
        f"SELECT detector, entity_type, partition, key, argMax(data, {newest}), "
        f"argMax(deleted, {newest}) FROM detector_state WHERE {where} "
        "GROUP BY detector, entity_type, partition, key",
        params,
        binary=True,
    ).result_rows
    by_det: dict[str, list[tuple[str, int, str, bytes]]] = defaultdict(list)
    for det, et, part, key, data, deleted in result:
        if not deleted:
            by_det[_text(det)].append((_text(et), int(part), _text(key), bytes(data)))
    _restore_keys(by_det.pop(KEYS, []), pipeline.keyspace)
    pipe_rows = {key: data for _, _, key, data in by_det.pop("_pipeline", [])}
    if ROUTING in pipe_rows:
        pipeline.features.restore(pipe_rows[ROUTING])
    if CLOCKS in pipe_rows:
        pipeline.restore_clocks(pipe_rows[CLOCKS])
    if model_level:
        if REFERENCES in pipe_rows:
            pipeline.references.restore(pipe_rows[REFERENCES])
        _add_references(store, pipeline)  # after the builders: a stored reference ends one
    for det in pipeline.detectors:
        _restore(det, by_det.get(det.name, []), pipeline.keyspace)
    return len(result)


def _add_references(store: Store, pipeline: Pipeline) -> None:
    for ref in load_references(store):
        pipeline.references.add(ref)


def _restore_keys(rows: list[tuple[str, int, str, bytes]], keyspace: KeySpace) -> None:
    """Saved keys back into the key map with their last-seen times (``_key_rows``)."""
    by_type: dict[str, list[tuple[str, int, str, bytes]]] = defaultdict(list)
    for row in rows:
        by_type[row[0]].append(row)
    for et, items in by_type.items():
        seen = np.frombuffer(b"".join(d for *_, d in items), np.int64)
        keyspace[et].restore_seen([k for _, _, k, _ in items], [p for _, p, _, _ in items], seen)


def load_blob(store: Store, name: str) -> bytes | None:
    """The latest committed worker blob saved with ``prepare(..., blobs={name: ...})``."""
    rows = store.query(
        "SELECT argMax(data, seq) FROM detector_state WHERE detector = '_pipeline' "
        "AND key = {k:String} AND seq <= {s:UInt64}",
        {"k": name, "s": committed_seq(store)},
        binary=True,
    ).result_rows
    return bytes(rows[0][0]) if rows and rows[0][0] else None


def _restore(det: Detector, rows: list[tuple[str, int, str, bytes]], keyspace: KeySpace) -> None:
    model: bytes | None = None
    keyed: dict[str, list[tuple[int, str, bytes]]] = defaultdict(list)
    extras: list[tuple[str, str, int, bytes | None]] = []
    for et, part, key, data in rows:
        if et == MODEL:
            model = data
        elif et.endswith(EXTRA):
            extras.append((et.removesuffix(EXTRA), key, part, data))
        else:
            keyed[et].append((part, key, data))
    state = []
    for et, items in keyed.items():
        width = len(items[0][2])
        records = np.frombuffer(b"".join(d for _, _, d in items), dtype=f"V{width}")
        state.append(
            StateRows(
                et,
                tuple(k for _, k, _ in items),
                np.array([p for p, _, _ in items], np.int32),
                records,
            )
        )
    if state or model is not None or extras:
        det.restore(Snapshot(keyed=tuple(state), model=model, extras=tuple(extras)), keyspace)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def load_references(store: Store) -> list[Reference]:
    """The reference in force per (model, model_version): an operator's (``reference set``)
    over the worker's automatic one whatever their ``seq``, then the newest."""
    rows = store.query(
        f"SELECT argMax(data, {REFERENCE_PRECEDENCE}) FROM model_references "
        "GROUP BY model_id, model_version",
        binary=True,
    ).result_rows
    return [Reference.from_bytes(bytes(r[0])) for r in rows]
