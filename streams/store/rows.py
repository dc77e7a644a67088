"""Rows for the store, as Arrow tables built from columns (one insert per table per flush).

Ids are deterministic so a replay writes the same rows again and the store's
ReplacingMergeTree tables keep one: ``finding_id`` hashes (event_id, detector), ``alert_id``
hashes (detector, model_id, entity_type, entity, episode start in event time); both are defined
with their records in ``schemas/``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa

from detectors.base import AlertChange, Findings, WindowMetric
from schemas.alert import Alert, new_alert
from schemas.batch import EventBatch
from schemas.finding import finding_id
from streams.store.fingerprint import hex16

TS = pa.timestamp("ms", tz="UTC")


def _sparse_map(
    names: Sequence[str],
    present: npt.NDArray[np.bool_],
    values: npt.NDArray[Any],
    kind: pa.DataType,
) -> pa.Array:
    """A Map(String, kind) column from a (rows, names) matrix: the cells where ``present``."""
    n = present.shape[0]
    offsets = np.zeros(n + 1, np.int32)
    if not names:
        return pa.MapArray.from_arrays(
            pa.array(offsets), pa.array([], pa.string()), pa.array([], kind)
        )
    np.cumsum(present.sum(axis=1), out=offsets[1:])
    # each cell's key as its column's index, taken from the names in Arrow (no str per cell)
    columns = np.broadcast_to(np.arange(len(names), dtype=np.int32), present.shape)[present]
    keys = pa.array(names, pa.string()).take(pa.array(columns))
    return pa.MapArray.from_arrays(pa.array(offsets), keys, pa.array(values[present], kind))


def _map(names: Sequence[str], matrix: npt.NDArray[np.float64]) -> pa.Array:
    """A Map(String, Float64) column from a (rows, names) matrix; NaN cells are left out."""
    return _sparse_map(names, ~np.isnan(matrix), matrix, pa.float64())


def _categories(batch: EventBatch) -> pa.Array:
    """A Map(String, String) column from the dictionary-encoded categorical features."""
    codes = batch.cat_codes
    values = np.empty(codes.shape, dtype=object)
    for j, dictionary in enumerate(batch.cat_values):
        values[:, j] = np.asarray((*dictionary, ""), dtype=object)[codes[:, j]]
    return _sparse_map(batch.cat_names, codes >= 0, values, pa.string())


def _vector(batch: EventBatch) -> pa.Array:
    n = batch.n
    lengths = batch.vector_len.astype(np.int32)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    width = batch.vector.shape[1] if batch.vector.ndim == 2 else 0
    mask = np.arange(width)[None, :] < lengths[:, None]
    values = batch.vector[mask].astype(np.float32) if width else np.zeros(0, np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float32()))


def text_hmac(key: bytes, text: str) -> str:
    """The keyed fingerprint of a text column (``prompt_hmac``, ``output_text_hmac``): the first
    128 bits of HMAC-SHA256, hex."""
    data = text.encode("utf-8", "surrogatepass")
    return hmac.new(key, data, hashlib.sha256).hexdigest()[:32]


def _text(texts: npt.NDArray[np.object_], key: bytes, store_text: str) -> tuple[pa.Array, pa.Array]:
    """(stored text, keyed HMAC-SHA256 fingerprint); raw text is kept only when configured."""
    present = np.flatnonzero(texts != "")
    if not present.size:  # no text in the batch (tabular models): two columns of ""
        offsets = pa.py_buffer(bytes(4 * len(texts) + 4))
        empty = pa.StringArray.from_buffers(len(texts), offsets, pa.py_buffer(b""))
        return empty, empty
    fingerprints = np.full(len(texts), "", dtype=object)
    for i in present.tolist():
        fingerprints[i] = text_hmac(key, texts[i])
    if store_text == "raw":
        stored = texts
    else:
        stored = np.full(len(texts), "", dtype=object)
        for i in present.tolist():
            stored[i] = f"[redacted {len(texts[i])} chars]"
    return pa.array(stored, pa.string()), pa.array(fingerprints, pa.string())


def events_table(
    batch: EventBatch,
    hmac_key: bytes,
    store_text: str = "redacted",
    fingerprints: npt.NDArray[np.uint64] | None = None,
) -> pa.Table:
    """The ``events`` rows of a batch; ``fingerprints`` (per row, ``streams/store/fingerprint.py``)
    of
    the messages the events arrived as, empty when not given."""
    prompt, prompt_hmac = _text(batch.prompt, hmac_key, store_text)
    out_text, out_hmac = _text(batch.output_text, hmac_key, store_text)
    s = pa.string()
    return pa.table(
        {
            "event_id": pa.array(batch.event_id, s),
            "ts": pa.array(batch.ts_ms, TS),
            "model_id": pa.array(batch.model_id, s),
            "model_version": pa.array(batch.model_version, s),
            "api_key_id": pa.array(batch.api_key_id, s),
            "tenant": pa.array(batch.tenant, s),
            "client_ip": pa.array(batch.client_ip, s),
            "user_agent": pa.array(batch.user_agent, s),
            "session_id": pa.array(batch.session_id, s),
            "status": pa.array(batch.status, pa.int32()),
            "latency_ms": pa.array(batch.latency_ms, pa.float64()),
            "tokens_in": pa.array(batch.tokens_in, pa.int64()),
            "tokens_out": pa.array(batch.tokens_out, pa.int64()),
            "features": _map(batch.num_names, batch.num_values),
            "categories": _categories(batch),
            "vector": _vector(batch),
            "prompt": prompt,
            "prompt_hmac": prompt_hmac,
            "output_label": pa.array(batch.output_label, s),
            "scores": _map(batch.score_labels, batch.scores),
            "output_value": pa.array(batch.output_value, pa.float64()),
            "output_text": out_text,
            "output_text_hmac": out_hmac,
            "finish_reason": pa.array(batch.finish_reason, s),
            "ground_truth": pa.array(batch.ground_truth, s),
            "attributes": pa.array(batch.attributes, s),
            "payload_bytes": pa.array(batch.payload_bytes, pa.int32()),
            "source_partition": pa.array(batch.partition, pa.int32()),
            "source_offset": pa.array(batch.offset, pa.int64()),
            "fingerprint": (
                pa.array([""] * batch.n, s) if fingerprints is None else hex16(fingerprints)
            ),
        }
    )


def findings_table(
    batch: EventBatch,
    found: Findings,
    detector: str,
    version: str,
    atlas: tuple[str, ...],
    owasp: tuple[str, ...],
) -> pa.Table:
    rows = found.rows
    event_ids = batch.event_id[rows]
    ids = np.array([finding_id(e, detector) for e in event_ids], dtype=object)
    n = len(rows)
    s = pa.string()
    return pa.table(
        {
            "finding_id": pa.array(ids, s),
            "event_id": pa.array(event_ids, s),
            "ts": pa.array(batch.ts_ms[rows], TS),
            "model_id": pa.array(batch.model_id[rows], s),
            "api_key_id": pa.array(batch.api_key_id[rows], s),
            "client_ip": pa.array(batch.client_ip[rows], s),
            "session_id": pa.array(batch.session_id[rows], s),
            "detector": pa.array([detector] * n, s),
            "detector_version": pa.array([version] * n, s),
            "label": pa.array(found.label, s),
            "score": pa.array(found.score, pa.float64()),
            "atlas": pa.array([list(atlas)] * n, pa.list_(s)),
            "owasp": pa.array([list(owasp)] * n, pa.list_(s)),
            "evidence": pa.array(found.evidence, s),
        }
    )


def alert_record(
    change: AlertChange,
    detector: str,
    version: str,
    atlas: tuple[str, ...],
    owasp: tuple[str, ...],
    emitted_at_ms: int,
) -> Alert:
    """One alert v1 record (``schemas/alert.py``) from an episode change: how every producer
    (detectors, pipeline health, outages, retention gaps) makes its alerts."""
    return new_alert(
        detector=detector,
        detector_version=version,
        model_id=change.model_id,
        tenant=change.tenant,
        entity_type=change.entity_type,
        entity=change.entity,
        episode_start_ms=change.episode_start_ms,
        status=change.status,
        ts_ms=change.ts_ms,
        emitted_at_ms=emitted_at_ms,
        severity=change.severity,
        score=change.score,
        threshold=change.threshold,
        title=change.title,
        summary=change.summary,
        first_seen_ms=change.first_seen_ms,
        last_seen_ms=change.last_seen_ms,
        event_count=change.event_count,
        resolved_ms=change.resolved_ms,
        evidence=change.evidence,
        linked_entities=change.linked_entities,
        sample_event_ids=change.sample_event_ids,
        atlas=atlas,
        owasp=owasp,
    )


def alert_version(record: Mapping[str, Any]) -> int:
    """ReplacingMergeTree version: later event time wins, a resolution beats a firing update,
    more events win a tie. Deterministic, so a replay writes the same version."""
    latest = int(max(record["last_seen"], record["resolved_at"] or 0))
    resolved = int(record["status"] == "resolved")
    return (latest << 21) | (resolved << 20) | min(int(record["event_count"]), (1 << 20) - 1)


def alerts_table(records: Sequence[Mapping[str, Any]]) -> pa.Table:
    s = pa.string()

    def col(name: str) -> list[Any]:
        return [r[name] for r in records]

    return pa.table(
        {
            "alert_id": pa.array(col("alert_id"), s),
            "schema_version": pa.array(col("schema_version"), pa.uint8()),
            "ts": pa.array(col("ts"), TS),
            "emitted_at": pa.array(col("emitted_at"), TS),
            "detector": pa.array(col("detector"), s),
            "detector_version": pa.array(col("detector_version"), s),
            "severity": pa.array(col("severity"), s),
            "status": pa.array(col("status"), s),
            "resolved_at": pa.array(col("resolved_at"), TS),
            "model_id": pa.array(col("model_id"), s),
            "tenant": pa.array(col("tenant"), s),
            "entity_type": pa.array(col("entity_type"), s),
            "entity": pa.array(col("entity"), s),
            "linked_entities": pa.array([orjson.dumps(v).decode() for v in col("linked_entities")]),
            "score": pa.array(col("score"), pa.float64()),
            "threshold": pa.array(col("threshold"), pa.float64()),
            "title": pa.array(col("title"), s),
            "summary": pa.array(col("summary"), s),
            "atlas": pa.array(col("atlas"), pa.list_(s)),
            "owasp": pa.array(col("owasp"), pa.list_(s)),
            "evidence": pa.array(
                [orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode() for v in col("evidence")]
            ),
            "first_seen": pa.array(col("first_seen"), TS),
            "last_seen": pa.array(col("last_seen"), TS),
            "event_count": pa.array(col("event_count"), pa.uint64()),
            "sample_event_ids": pa.array(col("sample_event_ids"), pa.list_(s)),
            "incident_id": pa.array(col("incident_id"), s),
            "runbook": pa.array(col("runbook"), s),
            "version": pa.array([alert_version(r) for r in records], pa.uint64()),
        }
    )


def metrics_table(metrics: Sequence[WindowMetric]) -> pa.Table:
    s = pa.string()
    return pa.table(
        {
            "model_id": pa.array([m.model_id for m in metrics], s),
            "detector": pa.array([m.detector for m in metrics], s),
            "metric": pa.array([m.metric for m in metrics], s),
            "feature": pa.array([m.feature for m in metrics], s),
            "window_start": pa.array([m.window_start_ms for m in metrics], TS),
            "window_end": pa.array([m.window_end_ms for m in metrics], TS),
            "value": pa.array([float(m.value) for m in metrics], pa.float64()),
            "event_count": pa.array([m.event_count for m in metrics], pa.uint64()),
        }
    )
