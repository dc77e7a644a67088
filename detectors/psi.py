"""``drift.psi``: prediction-score drift per model against its version's frozen reference.

Choices, and why:

- **Event-time hopping windows.** Each (model, model_version) keeps one histogram per pane
  (``hop_s`` of event time) on its reference's score bins. A window of ``window_s`` is a sum of
  ``window_s / hop_s`` panes, evaluated by ``advance`` once the watermark passes its end, so the
  result does not depend on how events were cut into batches. Events whose pane already closed
  are late: they are not counted (``late_events_total``) and never reopen a window.
- **Warm-up.** Counting starts at the first pane boundary after the latest event the reference
  builder consumed (``Reference.last_ts_ms``), and only whole windows are evaluated: live traffic
  is never compared with the events that formed the reference, and an event before the reference
  froze (in arrival order) can never count, whichever batch delivered it.
- **PSI** = Σ (c − r)·ln(c / r) over the reference's bins, proportions clipped below at 1e-4 so
  an empty bin is finite. 0.1 is a moderate and 0.25 (the default threshold) a significant shift.
- **Episodes, one per model.** A window with at least ``min_events`` events and PSI ≥
  ``threshold`` opens an episode (an alert at the window's end); the episode resolves after
  ``clear_windows`` consecutive windows below ``0.8 × threshold`` (hysteresis, so a PSI hovering
  around the threshold does not flap). Windows with fewer than ``min_events`` events are
  inconclusive: they neither open nor clear an episode. When a model runs several versions their
  windows are read in (window end, version) order and any of them can open or hold the episode.
- **State** is model-level and small: a few panes per version plus the episodes; ``snapshot``
  saves all of it as JSON when it changed (``None`` otherwise).

>>> import dataclasses
>>> from detectors.base import DetectorInput, KeySpace
>>> from detectors.reference import ReferenceStore
>>> from detectors.routing import ModelView
>>> from schemas.batch import empty_batch
>>> def batch(ts_ms, p_yes):
...     n, obj = len(ts_ms), lambda v: np.full(len(ts_ms), v, dtype=object)
...     b = dataclasses.replace(
...         empty_batch(), event_id=obj("e"), ts_ms=np.asarray(ts_ms, np.int64),
...         model_id=obj("m"), model_version=obj("v1"), status=np.full(n, 200, np.int32),
...         api_key_id=np.arange(n).astype(str).astype(object), output_label=obj(""),
...         output_value=np.full(n, np.nan), score_labels=("no", "yes"),
...         scores=np.column_stack([1 - p_yes, p_yes]))
...     return b, {"m": ModelView("m", np.arange(n), (), (), np.zeros((n, 0)), ("no", "yes"),
...                               b.scores)}
>>> rng = np.random.default_rng(7)
>>> store, psi = ReferenceStore(n_events=1000), PSI()
>>> b, views = batch(np.arange(1000) * 50, rng.beta(2, 5, 1000))  # the first 50 s
>>> [(r.score_type, r.positive_label) for r in store.update(b, views)]
[('probability', 'yes')]
>>> b, views = batch(60_000 + np.arange(1200) * 500, rng.beta(5, 2, 1200))  # then it shifts
>>> psi.update(DetectorInput(b, {}, KeySpace(), 0, views, store.frozen()))
Output(findings=(), alerts=(), metrics=())
>>> out = psi.advance(660_000)  # closes the first window, [60 s, 660 s)
>>> [(m.metric, m.window_start_ms, m.event_count, m.value > 0.25) for m in out.metrics]
[('psi_prediction', 60000, 1200, True)]
>>> [(a.status, a.entity_type, a.entity, a.ts_ms, a.severity) for a in out.alerts]
[('firing', 'model', 'm', 660000, 'high')]
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import orjson

from detectors.base import (
    EMPTY,
    F64,
    I64,
    AlertChange,
    DetectorBase,
    DetectorInput,
    KeySpace,
    Output,
    Severity,
    Snapshot,
    WindowMetric,
)
from detectors.reference import Reference, score_bins
from detectors.registry import register
from schemas.batch import EventBatch

EPSILON = 1e-4  # floor on bin proportions
CLEAR_FACTOR = 0.8  # a window clears an episode below CLEAR_FACTOR * threshold
QUANTILES = (0.1, 0.5, 0.9)
METRIC = "psi_prediction"


def psi(reference_counts: I64, current_counts: I64, epsilon: float = EPSILON) -> float:
    """Population stability index of ``current_counts`` against ``reference_counts``.

    >>> round(psi(np.array([50, 50]), np.array([50, 50])), 6)
    0.0
    >>> round(psi(np.array([50, 50]), np.array([90, 10])), 4)
    0.8789
    """
    r = np.maximum(reference_counts / reference_counts.sum(), epsilon)
    c = np.maximum(current_counts / current_counts.sum(), epsilon)
    return float(np.sum((c - r) * np.log(c / r)))


def bin_quantiles(counts: I64, edges: F64, lo: float, hi: float) -> dict[str, float]:
    """p10/p50/p90 interpolated within bins; the outer bins end at the observed ``lo``/``hi``."""
    if edges.size == 0 or np.isnan(lo) or counts.sum() == 0:
        return {}
    bounds = np.concatenate([[min(lo, edges[0])], edges, [max(hi, edges[-1])]])
    cdf = np.concatenate([[0.0], np.cumsum(counts)]) / counts.sum()
    values = np.interp(QUANTILES, cdf, bounds)
    return {
        f"p{round(q * 100)}": round(float(v), 6) for q, v in zip(QUANTILES, values, strict=True)
    }


@dataclass(slots=True)
class _Track:
    """One (model, version): its reference's bins and its open panes (sorted by pane)."""

    score_type: str
    positive_label: str
    edges: F64
    categories: tuple[str, ...]
    ref_counts: I64
    ref_range: F64  # (min, max) of the reference's scores
    start_h: int  # first pane counted, in hops since the epoch
    pane_ids: I64
    counts: I64  # (panes, bins)
    lo: F64  # per pane, min score (NaN for label-only)
    hi: F64

    @classmethod
    def of(cls, ref: Reference, hop_ms: int) -> _Track:
        return cls(
            ref.score_type,
            ref.positive_label,
            np.asarray(ref.score_edges, np.float64),
            ref.score_categories,
            np.asarray(ref.score_counts, np.int64),
            np.asarray(ref.score_range, np.float64),
            ref.last_ts_ms // hop_ms + 1,
            np.zeros(0, np.int64),
            np.zeros((0, ref.score_counts.size), np.int64),
            np.zeros(0),
            np.zeros(0),
        )

    def same_bins(self, ref: Reference) -> bool:
        return (
            (self.score_type, self.positive_label, self.categories)
            == (ref.score_type, ref.positive_label, ref.score_categories)
            and np.array_equal(self.edges, ref.score_edges)
            and np.array_equal(self.ref_counts, ref.score_counts)
        )

    def add(self, pane: I64, bins: I64, values: F64) -> None:
        ids = np.union1d(self.pane_ids, pane)
        if ids.size != self.pane_ids.size:
            at = np.searchsorted(ids, self.pane_ids)
            counts = np.zeros((ids.size, self.ref_counts.size), np.int64)
            lo, hi = np.full(ids.size, np.nan), np.full(ids.size, np.nan)
            counts[at], lo[at], hi[at] = self.counts, self.lo, self.hi
            self.pane_ids, self.counts, self.lo, self.hi = ids, counts, lo, hi
        at = np.searchsorted(self.pane_ids, pane)
        np.add.at(self.counts, (at, bins), 1)
        np.fmin.at(self.lo, at, values)
        np.fmax.at(self.hi, at, values)

    def to_json(self) -> dict[str, Any]:
        return {
            name: value.tolist() if isinstance(value, np.ndarray) else value
            for name, value in ((f.name, getattr(self, f.name)) for f in fields(self))
        }

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> _Track:
        width = len(state["ref_counts"])
        return cls(
            state["score_type"],
            state["positive_label"],
            np.asarray(state["edges"], np.float64),
            tuple(state["categories"]),
            np.asarray(state["ref_counts"], np.int64),
            np.asarray(state["ref_range"], np.float64),  # JSON null -> NaN
            state["start_h"],
            np.asarray(state["pane_ids"], np.int64),
            np.asarray(state["counts"], np.int64).reshape(-1, width),
            np.asarray(state["lo"], np.float64),
            np.asarray(state["hi"], np.float64),
        )


@dataclass(frozen=True, slots=True)
class _Window:
    model_id: str
    version: str
    start_ms: int
    end_ms: int
    value: float
    events: int
    evidence: dict[str, Any]


@register("drift.psi")
class PSI(DetectorBase):
    """Prediction-score PSI per model over event-time windows (module doc)."""

    version = "1"
    atlas = ()
    owasp = ()
    entity_types = ()

    def __init__(
        self,
        window_s: int = 600,
        hop_s: int = 60,
        threshold: float = 0.25,
        min_events: int = 200,
        clear_windows: int = 3,
    ) -> None:
        if hop_s <= 0 or window_s <= 0 or window_s % hop_s:
            raise ValueError(
                f"window_s must be a positive multiple of hop_s; found {window_s} and {hop_s}"
            )
        if threshold <= 0 or min_events < 1 or clear_windows < 1:
            raise ValueError(
                "expected threshold > 0, min_events >= 1, clear_windows >= 1; found "
                f"{threshold}, {min_events}, {clear_windows}"
            )
        self.window_s = window_s
        self.hop_s = hop_s
        self.threshold = threshold
        self.min_events = min_events
        self.clear_windows = clear_windows
        self.reset()

    def reset(self) -> None:
        self.late_events_total = 0
        self._closed_h: int | None = None  # panes before this one are closed
        self._tracks: dict[tuple[str, str], _Track] = {}
        self._episodes: dict[str, dict[str, Any]] = {}
        self._changed = True

    @property
    def _hop_ms(self) -> int:
        return self.hop_s * 1000

    @property
    def _panes(self) -> int:
        return self.window_s // self.hop_s

    def evict(self, entity_type: str, slots: I64) -> None:
        """Nothing keyed to evict: the state is per model."""

    def update(self, batch: DetectorInput) -> Output:
        """Count each event's score bin into its pane; windows close only in ``advance``."""
        ev = batch.events
        if ev.n == 0 or not batch.references:
            return EMPTY
        ok = ev.status < 400
        models, m_code = np.unique(ev.model_id.astype(str), return_inverse=True)
        versions, v_code = np.unique(ev.model_version.astype(str), return_inverse=True)
        group = m_code * versions.size + v_code
        for g in np.unique(group[ok]).tolist():
            key = (str(models[g // versions.size]), str(versions[g % versions.size]))
            ref = batch.references.get(key)
            if ref is None or ref.score_counts.size == 0 or ref.score_counts.sum() == 0:
                continue
            track = self._tracks.get(key)
            if track is None or not track.same_bins(ref):
                track = self._tracks[key] = _Track.of(ref, self._hop_ms)
                self._changed = True
            self._count(track, ev, np.flatnonzero((group == g) & ok))
        return EMPTY

    def _count(self, track: _Track, ev: EventBatch, rows: I64) -> None:
        bins, values = score_bins(
            track.score_type, track.positive_label, track.edges, track.categories, ev, rows
        )
        pane = ev.ts_ms[rows] // self._hop_ms
        keep = (bins >= 0) & (pane >= track.start_h)
        if self._closed_h is not None:
            late = keep & (pane < self._closed_h)
            self.late_events_total += int(late.sum())
            self._changed |= bool(late.any())
            keep &= ~late
        if keep.any():
            track.add(pane[keep], bins[keep], values[keep])
            self._changed = True

    def advance(self, watermark_ms: int) -> Output:
        """Evaluate every window whose end the watermark passed; drop panes no window needs."""
        closed = watermark_ms // self._hop_ms
        prev = self._closed_h
        if prev is not None and closed <= prev:
            return EMPTY
        self._closed_h = closed
        self._changed = True
        windows: list[_Window] = []
        for key in sorted(self._tracks):
            track = self._tracks[key]
            windows.extend(self._windows(key, track, prev, closed))
            keep = track.pane_ids >= closed + 1 - self._panes
            track.pane_ids, track.counts = track.pane_ids[keep], track.counts[keep]
            track.lo, track.hi = track.lo[keep], track.hi[keep]
        windows.sort(key=lambda w: (w.model_id, w.end_ms, w.version))
        metrics = tuple(
            WindowMetric(w.model_id, METRIC, w.start_ms, w.end_ms, w.value, "", w.events)
            for w in windows
        )
        alerts = [a for w in windows if (a := self._episode(w)) is not None]
        return Output(alerts=tuple(alerts), metrics=metrics)

    def _windows(
        self, key: tuple[str, str], track: _Track, prev: int | None, closed: int
    ) -> list[_Window]:
        """Windows ending in (prev, closed] hops that hold at least one event."""
        if track.pane_ids.size == 0:
            return []
        w = self._panes
        ends = np.unique(track.pane_ids[:, None] + np.arange(1, w + 1))
        ends = ends[(ends <= closed) & (ends - w >= track.start_h)]
        if prev is not None:
            ends = ends[ends > prev]
        cum = np.vstack([np.zeros((1, track.ref_counts.size), np.int64), track.counts.cumsum(0)])
        out: list[_Window] = []
        for end in ends.tolist():
            a, z = np.searchsorted(track.pane_ids, [end - w, end])
            current = cum[z] - cum[a]
            lo, hi = float(np.fmin.reduce(track.lo[a:z])), float(np.fmax.reduce(track.hi[a:z]))
            value = psi(track.ref_counts, current)
            out.append(
                _Window(
                    key[0],
                    key[1],
                    (end - w) * self._hop_ms,
                    end * self._hop_ms,
                    value,
                    int(current.sum()),
                    self._evidence(track, current, value, lo, hi),
                )
            )
        return out

    def _evidence(
        self, track: _Track, current: I64, value: float, lo: float, hi: float
    ) -> dict[str, Any]:
        ref_p = track.ref_counts / track.ref_counts.sum()
        cur_p = current / current.sum()
        if track.categories or track.score_type == "label_only":
            bins: list[Any] = [*track.categories, "(unseen)"]
        else:
            bins = [round(float(e), 6) for e in track.edges]
        return {
            "psi": round(value, 6),
            "threshold": self.threshold,
            "score_type": track.score_type,
            "bins": bins,  # label-only: one label per bin; else interior edges, (a, b] bins
            "reference_proportions": [round(float(p), 6) for p in ref_p],
            "current_proportions": [round(float(p), 6) for p in cur_p],
            "reference_events": int(track.ref_counts.sum()),
            "reference_quantiles": bin_quantiles(
                track.ref_counts, track.edges, *track.ref_range.tolist()
            ),
            "current_quantiles": bin_quantiles(current, track.edges, lo, hi),
            "quantile_method": "interpolated within the PSI bins",
        }

    def _episode(self, w: _Window) -> AlertChange | None:
        """Open, hold or resolve the model's episode with one conclusive window."""
        if w.events < self.min_events:
            return None
        ep = self._episodes.get(w.model_id)
        if w.value >= self.threshold:
            if ep is not None:
                ep["clear"] = 0
                return None
            severity: Severity = "high" if w.value >= 2 * self.threshold else "medium"
            ep = {"start_ms": w.end_ms, "first_ms": w.start_ms, "clear": 0, "severity": severity}
            self._episodes[w.model_id] = ep
            return self._alert(w, ep, "firing")
        if ep is None:
            return None
        ep["clear"] = ep["clear"] + 1 if w.value < CLEAR_FACTOR * self.threshold else 0
        if ep["clear"] < self.clear_windows:
            return None
        del self._episodes[w.model_id]
        return self._alert(w, ep, "resolved")

    def _alert(self, w: _Window, ep: dict[str, Any], status: str) -> AlertChange:
        version = f" version {w.version}" if w.version else ""
        if status == "firing":
            summary = (
                f"Prediction-score PSI {w.value:.3f} >= {self.threshold} for {w.model_id}"
                f"{version} over {w.events} events in [{w.start_ms}, {w.end_ms}) ms"
            )
            evidence = w.evidence
        else:
            summary = (
                f"Prediction-score PSI of {w.model_id} below {CLEAR_FACTOR * self.threshold:.3f}"
                f" for {self.clear_windows} consecutive windows (last: {w.value:.3f})"
            )
            evidence = {**w.evidence, "clear_below": CLEAR_FACTOR * self.threshold}
        return AlertChange(
            entity_type="model",
            entity=w.model_id,
            model_id=w.model_id,
            tenant="",
            status="firing" if status == "firing" else "resolved",
            ts_ms=w.end_ms,
            episode_start_ms=ep["start_ms"],
            first_seen_ms=ep["first_ms"],
            last_seen_ms=w.end_ms,
            score=w.value,
            threshold=self.threshold,
            severity=ep["severity"],
            title=f"Prediction drift on {w.model_id}",
            summary=summary,
            evidence={**evidence, "model_version": w.version, "window_end_ms": w.end_ms},
            event_count=w.events,
            sample_event_ids=(),
        )

    def snapshot(self, keyspace: KeySpace) -> Snapshot:
        """The whole state as JSON when it changed since the last snapshot, else ``None``."""
        if not self._changed:
            return Snapshot()
        self._changed = False
        state = {
            "late_events_total": self.late_events_total,
            "closed_h": self._closed_h,
            "tracks": [[*key, t.to_json()] for key, t in sorted(self._tracks.items())],
            "episodes": self._episodes,
        }
        return Snapshot(model=orjson.dumps(state, option=orjson.OPT_SORT_KEYS))

    def restore(self, snapshot: Snapshot, keyspace: KeySpace) -> None:
        if snapshot.model is None:
            return
        state = orjson.loads(snapshot.model)
        self.late_events_total = state["late_events_total"]
        self._closed_h = state["closed_h"]
        self._tracks = {(m, v): _Track.from_json(t) for m, v, t in state["tracks"]}
        self._episodes = state["episodes"]
        self._changed = False
