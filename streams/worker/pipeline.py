"""The per-batch computation of a worker, without I/O: decode -> keys -> route -> detectors.

The worker (``streams/worker/loop.py``) feeds it polled messages and writes what it returns. Keeping
this part free of the source and the store is what lets tests run it on lists and lets the
benchmark time each stage.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import orjson

from detectors.base import (
    AlertChange,
    Detector,
    DetectorInput,
    Findings,
    KeySpace,
    Output,
    WindowMetric,
    entity_keys,
)
from detectors.models.reference import Reference
from detectors.models.reference_store import ReferenceStore
from detectors.models.routing import FeatureIndex, route
from schemas.batch import Decoded, EventBatch, Limits
from schemas.decode import decode
from streams.store import fingerprint
from streams.worker.event_ids import EventIds

INT64_MIN = int(np.iinfo(np.int64).min)


class Watermark:
    """One watermark per worker (docs/architecture.md): the minimum, over partitions that
    delivered an event in the last ``idle_partition_s`` of wall clock, of the largest event time
    seen on that partition, minus the allowed lateness. It never moves back."""

    def __init__(self, lateness_ms: int = 60_000, idle_partition_s: float = 30.0) -> None:
        self.lateness_ms = lateness_ms
        self.idle_partition_s = idle_partition_s
        self.max_ts: dict[int, int] = {}
        self.active_at: dict[int, float] = {}
        self.value = INT64_MIN

    def observe(self, partition: npt.NDArray[np.int32], ts_ms: npt.NDArray[np.int64]) -> int:
        now = time.monotonic()
        if ts_ms.size:
            parts = np.unique(partition)
            for p in parts.tolist():
                top = int(ts_ms[partition == p].max()) if parts.size > 1 else int(ts_ms.max())
                self.max_ts[p] = max(self.max_ts.get(p, INT64_MIN), top)
                self.active_at[p] = now
        active = [
            ts
            for p, ts in self.max_ts.items()
            if now - self.active_at.get(p, now) <= self.idle_partition_s
        ]
        if active:
            self.value = max(self.value, min(active) - self.lateness_ms)
        return self.value

    def restore(self, max_ts: dict[int, int]) -> None:
        """Saved latest event times per partition (a checkpoint's positions): the watermark is
        where it stood when they were saved (for a file, exactly; for Kafka, as if every
        partition were active), not back at the start of time."""
        for p, ts in max_ts.items():
            self.max_ts[p] = max(self.max_ts.get(p, INT64_MIN), ts)
        known = [ts for ts in self.max_ts.values() if ts != INT64_MIN]
        if known:
            self.value = max(self.value, min(known) - self.lateness_ms)

    def forget(self, partitions: set[int]) -> None:
        for p in partitions:
            self.max_ts.pop(p, None)
            self.active_at.pop(p, None)


@dataclass
class DetectorResult:
    """What one batch produced, ready for the sinks."""

    batch: EventBatch
    decoded: Decoded
    findings: list[tuple[Detector, Findings]] = field(default_factory=list)
    alerts: list[tuple[Detector, AlertChange]] = field(default_factory=list)
    metrics: list[WindowMetric] = field(default_factory=list)
    new_references: list[Reference] = field(default_factory=list)
    late_events: int = 0
    stage_s: dict[str, float] = field(default_factory=dict)
    # source positions of the polled messages, by message index (rejects point into these)
    partition: npt.NDArray[np.int32] = field(default_factory=lambda: np.zeros(0, np.int32))
    offset: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    # keyed fingerprint of each polled message; for conflicting_event_id rejects, the stored
    # version's fingerprint by message index
    fingerprints: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, np.uint64))
    stored_fingerprints: dict[int, int] = field(default_factory=dict)


class Pipeline:
    """Keyed state and detectors of one worker; ``process`` runs one batch through them."""

    def __init__(
        self,
        detectors: Sequence[Detector],
        limits: Limits | None = None,
        references: ReferenceStore | None = None,
        lateness_ms: int = 60_000,
        idle_partition_s: float = 30.0,
        idle_key_ms: int = 86_400_000,
        max_keys: int = 2_000_000,
        event_ids: EventIds | None = None,
    ) -> None:
        self.detectors = list(detectors)
        self.event_ids = event_ids or EventIds(b"")
        self.limits = limits or Limits()
        self.references = references or ReferenceStore()
        self.keyspace = KeySpace(max_keys)
        self.features = FeatureIndex()
        self.watermark = Watermark(lateness_ms, idle_partition_s)
        self.idle_key_ms = idle_key_ms
        self.entity_types = sorted({et for d in self.detectors for et in d.entity_types})
        self.reference_users = tuple(
            (d.name, d.without_reference) for d in self.detectors if d.without_reference
        )
        self.late_events_total = 0
        self.evicted: dict[str, list[tuple[str, int]]] = {}
        self._last_eviction_ms = INT64_MIN

    def process(
        self,
        messages: Sequence[bytes],
        partition: npt.NDArray[np.int32],
        offset: npt.NDArray[np.int64],
    ) -> DetectorResult:
        t0 = time.perf_counter()
        decoded = decode(messages, self.limits, partition, offset)
        t1 = time.perf_counter()
        # reused event ids (streams/worker/event_ids.py): conflicts become rejects before detection
        fps = fingerprint.of_messages(messages, self.event_ids.fingerprint_key)
        self.event_ids.expire(self.watermark.value)
        decoded, stored = self.event_ids.screen(decoded, messages, fps)
        t2 = time.perf_counter()
        result = self.run(decoded.batch, decoded)
        result.stage_s["decode"] = t1 - t0
        result.stage_s["event_ids"] = t2 - t1
        result.partition, result.offset = partition, offset
        result.fingerprints, result.stored_fingerprints = fps, stored
        return result

    def run(self, batch: EventBatch, decoded: Decoded) -> DetectorResult:
        result = DetectorResult(batch=batch, decoded=decoded)
        t0 = time.perf_counter()
        before = self.watermark.value
        result.late_events = int(np.count_nonzero(batch.ts_ms < before))
        self.late_events_total += result.late_events
        slots = {
            et: self.keyspace[et].lookup(entity_keys(batch, et), batch.ts_ms, batch.partition)
            for et in self.entity_types
        }
        views = route(batch, self.features)
        result.new_references = self.references.update(batch, views)
        t1 = time.perf_counter()
        refs = self.references
        inp = DetectorInput(
            batch, slots, self.keyspace, before, views, refs.frozen(), refs.provisional(),
            refs.building(), self.reference_users,
        )  # fmt: skip
        watermark = self.watermark.observe(batch.partition, batch.ts_ms)
        for det in self.detectors:
            td = time.perf_counter()
            self._collect(result, det, det.update(inp) + det.advance(watermark))
            result.stage_s["detector:" + det.name] = time.perf_counter() - td
        self._evict(watermark)
        t2 = time.perf_counter()
        result.stage_s.update(route=t1 - t0, detectors=t2 - t1)
        return result

    def advance(self, watermark_ms: int) -> DetectorResult:
        """Move event time on without events (end of a file source, idle partitions)."""
        from schemas.batch import Decoded, empty_batch

        batch = empty_batch()
        result = DetectorResult(batch, Decoded(batch, np.zeros(0, np.int64), ()))
        for det in self.detectors:
            self._collect(result, det, det.advance(watermark_ms))
        return result

    def _collect(self, result: DetectorResult, det: Detector, out: Output) -> None:
        result.findings.extend((det, f) for f in out.findings if f.rows.size)
        result.alerts.extend((det, a) for a in out.alerts)
        result.metrics.extend(
            m if m.detector else dataclasses.replace(m, detector=det.name) for m in out.metrics
        )

    def _evict(self, watermark: int) -> None:
        """Idle keys leave the key space once an hour of event time; their saved rows stay in
        the store marked deleted."""
        if watermark == INT64_MIN or watermark - self._last_eviction_ms < 3_600_000:
            return
        self._last_eviction_ms = watermark
        for et in self.entity_types:
            keys = self.keyspace[et]
            slots = keys.evict_idle(watermark, self.idle_key_ms)
            if slots.size == 0:
                continue
            self.evicted.setdefault(et, []).extend(keys.last_evicted)
            for det in self.detectors:
                if et in det.entity_types:
                    det.evict(et, slots)

    def settle(self, max_ts: dict[int, int]) -> None:
        """After a restore from a checkpoint whose positions saved ``max_ts`` (partition ->
        latest event time): the watermark moves back to where it was, and restored keys saved
        without a last-seen time count as seen at their partition's latest event."""
        self.watermark.restore(max_ts)
        for keys in self.keyspace.maps.values():
            keys.settle(self.watermark.max_ts)

    def clocks(self) -> bytes:
        """Event-time bookkeeping outside the detectors, saved with each checkpoint."""
        return orjson.dumps({"last_eviction_ms": self._last_eviction_ms})

    def restore_clocks(self, blob: bytes) -> None:
        self._last_eviction_ms = int(orjson.loads(blob)["last_eviction_ms"])

    def drop_partitions(self, partitions: set[int]) -> None:
        for et in self.entity_types:
            slots = self.keyspace[et].drop_partitions(partitions)
            for det in self.detectors:
                if et in det.entity_types and slots.size:
                    det.evict(et, slots)
        self.watermark.forget(partitions)
