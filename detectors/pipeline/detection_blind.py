"""``pipeline.detection_blind``: a model version that has traffic and, past a bound, no
reference, so the detectors that compare against one are off or partly off for it.

A reference freezes once the version's callers have sent enough for a fair split
(:mod:`detectors.models.reference_pool`); a flooding caller among slow ones, or a version with a
trickle of traffic, can keep it building for hours. Until then ``drift.features`` and
``drift.psi`` see nothing and ``extraction.query_pattern`` and ``privacy.query_probing`` run
only their signals that need no distribution: a blind spot that must not be silent. Per
(model, version) without a reference the detector counts the successful events and keeps the
earliest event time; it fires at the first event after which the version has ``after_events``
events, or ``after_s`` of event time since its first event with at least ``min_events``. The
alert (entity the model) names the detectors that are off and why, and how far the reference
is (events of the target, callers, the callers over their share); it resolves at the event
time the reference froze, or when an operator's reference is loaded.

Only the pipeline's detectors that declare ``without_reference`` are named; with none of them
running the detector says nothing. The decision depends on the events in arrival order, except
when a reference freezes in the same batch as the crossing (then nothing fires: there is no
blind spot left to report).

>>> from detectors.base import DetectorInput, KeySpace
>>> from detectors.models.reference_store import ReferenceStore
>>> from detectors.models.routing import FeatureIndex, route
>>> import dataclasses
>>> from schemas.batch import empty_batch
>>> obj = lambda v, n: np.full(n, v, object)
>>> n = 3_000  # one caller floods, one other sends 1 in 100: no fair split yet
>>> b = dataclasses.replace(empty_batch(), ts_ms=np.arange(n, dtype=np.int64) * 1000,
...     event_id=np.array([f"e{i}" for i in range(n)], object), model_id=obj("fraud", n),
...     model_version=obj("", n), status=np.full(n, 200, np.int32),
...     api_key_id=np.where(np.arange(n) % 100, "key_flood", "key_app").astype(object),
...     output_label=obj("", n), output_value=np.full(n, np.nan), num_values=np.zeros((n, 0)),
...     cat_codes=np.zeros((n, 0), np.int32), vector=np.zeros((n, 0)),
...     vector_len=np.zeros(n, np.int32), scores=np.zeros((n, 0)))
>>> store, views = ReferenceStore(), route(b, FeatureIndex())
>>> _ = store.update(b, views)
>>> users = (("drift.psi", "off: prediction PSI is measured against the reference"),)
>>> det = DetectionBlind(after_events=2_500)
>>> out = det.update(DetectorInput(b, {}, KeySpace(), 0, views, store.frozen(),
...     store.provisional(), store.building(), users))
>>> a = out.alerts[0]
>>> a.entity, a.status, a.ts_ms, a.evidence["detectors_off"]["drift.psi"][:3]
('fraud', 'firing', 2499000, 'off')
>>> r = a.evidence["reference"]
>>> r["events"], r["target"], r["callers"], r["capped_callers"], r["allowed_share"]
(1030, 2000, 2, ['key_flood'], 0.5)
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import orjson

from detectors.base import (
    EMPTY,
    I64,
    AlertChange,
    DetectorBase,
    DetectorInput,
    KeySpace,
    Output,
    Snapshot,
)
from detectors.registry import register

NO_TS = -(2**63)


@register("pipeline.detection_blind")
class DetectionBlind(DetectorBase):
    version = "1"
    atlas: ClassVar[tuple[str, ...]] = ()
    owasp: ClassVar[tuple[str, ...]] = ()
    entity_types: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, after_events: int = 4_000, after_s: float = 21_600.0, min_events: int = 100
    ) -> None:
        if after_events < 1 or after_s <= 0 or min_events < 1:
            raise ValueError(
                "pipeline.detection_blind: expected after_events >= 1, after_s > 0, "
                f"min_events >= 1; found {after_events}, {after_s}, {min_events}"
            )
        self.after_events, self.after_s, self.min_events = after_events, after_s, min_events
        self.reset()

    def reset(self) -> None:
        # (model, version) -> [events, first event time, episode start or None]
        self._versions: dict[tuple[str, str], list[Any]] = {}
        self._changed = False

    def evict(self, entity_type: str, slots: I64) -> None:
        """Nothing keyed: one row per building version."""

    def update(self, batch: DetectorInput) -> Output:
        if not batch.reference_users or (batch.events.n == 0 and not self._versions):
            return EMPTY
        alerts: list[AlertChange] = []
        for key in sorted(self._versions):  # froze (or an operator's reference arrived)
            ref = batch.references.get(key)
            if ref is not None:
                state = self._versions.pop(key)
                self._changed = True
                if state[2] is not None:
                    alerts.append(self._resolved(key, state, max(ref.last_ts_ms, state[2])))
        ev = batch.events
        ok = ev.status < 400
        for model, view in sorted(batch.views.items()):
            versions = ev.model_version[view.rows].astype(str)
            for version in np.unique(versions).tolist():
                key = (model, str(version))
                building = batch.building.get(key)
                if building is None:  # froze in this batch, or has a reference
                    continue
                rows = view.rows[(versions == version) & ok[view.rows]]
                if rows.size:
                    alerts.extend(self._count(key, ev.ts_ms[rows], batch, building))
        return Output(alerts=tuple(alerts)) if alerts else EMPTY

    def _count(
        self, key: tuple[str, str], ts: I64, batch: DetectorInput, building: Any
    ) -> list[AlertChange]:
        state = self._versions.setdefault(key, [0, NO_TS, None])
        self._changed = True
        n0, first0, open_ms = state
        n = n0 + np.arange(1, ts.size + 1)
        first = np.minimum.accumulate(np.minimum(ts, first0 if first0 != NO_TS else ts[0]))
        state[0], state[1] = int(n[-1]), int(first[-1])
        if open_ms is not None:
            return []
        crossed = (n >= self.after_events) | (
            (n >= self.min_events) & (ts - first >= self.after_s * 1000)
        )
        hit = np.flatnonzero(crossed)
        if hit.size == 0:
            return []
        at = int(hit[0])
        state[2] = int(ts[at])
        return [self._firing(key, state, int(n[at]), batch, building)]

    def _firing(
        self, key: tuple[str, str], state: list[Any], events: int, batch: DetectorInput,
        building: Any,
    ) -> AlertChange:  # fmt: skip
        model, version = key
        off = {name: why for name, why in batch.reference_users}
        fully = [name for name, why in batch.reference_users if why.startswith("off")]
        partly = [name for name in off if name not in fully]
        shown = f"{model} version {version}" if version else model
        summary = (
            f"{shown} has had {events:,} events and no reference: "
            + "; ".join(
                part
                for part in (
                    f"{', '.join(fully)} off" if fully else "",
                    f"{', '.join(partly)} partly off" if partly else "",
                )
                if part
            )
            + f". Reference {building.reason}. Set one with `inferwatch reference set`."
        )
        return AlertChange(
            entity_type="model",
            entity=model,
            model_id=model,
            tenant="",
            status="firing",
            ts_ms=int(state[2]),
            episode_start_ms=int(state[2]),
            first_seen_ms=int(state[1]),
            last_seen_ms=int(state[2]),
            score=events / self.after_events,
            threshold=float(self.after_events),
            severity="medium",
            title=f"Detection blind on {shown}: no reference yet",
            summary=summary,
            evidence={
                "model_version": version,
                "events_without_reference": events,
                "detectors_off": off,
                "reference": {
                    "events": building.n,
                    "target": building.target,
                    "callers": building.callers,
                    "capped_callers": [name for name, _ in building.capped],
                    "largest_share": round(building.largest_share, 4),
                    "allowed_share": round(building.allowed_share, 4),
                    "reason": building.reason,
                },
                "after_events": self.after_events,
                "after_s": self.after_s,
            },
            event_count=events,
            sample_event_ids=(),
        )

    def _resolved(self, key: tuple[str, str], state: list[Any], at_ms: int) -> AlertChange:
        model, version = key
        shown = f"{model} version {version}" if version else model
        return AlertChange(
            entity_type="model",
            entity=model,
            model_id=model,
            tenant="",
            status="resolved",
            ts_ms=int(state[2]),
            episode_start_ms=int(state[2]),
            first_seen_ms=int(state[1]),
            last_seen_ms=at_ms,
            score=state[0] / self.after_events,
            threshold=float(self.after_events),
            severity="medium",
            title=f"Detection blind on {shown}: no reference yet",
            summary=f"{shown} has a reference now; its detectors run in full.",
            evidence={"model_version": version, "events_without_reference": int(state[0])},
            event_count=int(state[0]),
            sample_event_ids=(),
            resolved_ms=at_ms,
        )

    def snapshot(self, keyspace: KeySpace) -> Snapshot:
        if not self._changed:
            return Snapshot()
        self._changed = False
        rows = [[m, v, *s] for (m, v), s in sorted(self._versions.items())]
        return Snapshot(model=orjson.dumps({"versions": rows}))

    def restore(self, snapshot: Snapshot, keyspace: KeySpace) -> None:
        if snapshot.model is None:
            return
        rows = orjson.loads(snapshot.model)["versions"]
        self._versions = {(m, v): [n, first, start] for m, v, n, first, start in rows}
        self._changed = False
