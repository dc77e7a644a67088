"""``drift.psi``: prediction drift per model and channel against its version's frozen reference.

Choices, and why:

- **Channels, not one score.** A multi-class model's maximum probability hides which class
  moved: when the share of one class grows at the expense of another, the maximum can stay
  where it was. So each prediction channel of the reference (``score`` for a 2-class,
  regression or single-column model, ``score:<class>`` per class and ``label`` for the
  predicted label of multi-class models, ``label`` for label-only ones;
  :mod:`detectors.models.channels`) gets its own PSI. Counts are one ``(channels, bins)`` array per
  pane, so every channel of every window is computed at once.
- **Event-time hopping windows.** Each (model, model_version) keeps one histogram per pane
  (``hop_s`` of event time) on its reference's bins. A window of ``window_s`` is a sum of
  ``window_s / hop_s`` panes, evaluated by ``advance`` once the watermark passes its end, so the
  result does not depend on how events were cut into batches. Events whose pane already closed
  are late: they are not counted (``late_events_total``) and never reopen a window.
- **Warm-up.** Counting starts at the first pane boundary after the latest event the reference
  builder consumed (``Reference.last_ts_ms``), and only whole windows are evaluated: live traffic
  is never compared with the events that formed the reference, and an event before the reference
  froze (in arrival order) can never count, whichever batch delivered it.
- **PSI** = Σ (c − r)·ln(c / r) over a channel's bins, proportions clipped below at 1e-4 so an
  empty bin is finite. 0.1 is a moderate and 0.25 (the default threshold) a significant shift.
- **Metric rows.** Every window emits one ``psi_prediction`` row per channel that has events in
  it. ``feature`` is the channel's name, followed by ``@<model_version>`` when the events carry
  a version (``score:high@7.1.0``; ``score`` for an unversioned 2-class model). So two versions
  of a model in one window never write the same row (``window_metrics`` keys rows by model,
  detector, metric, feature and window), and a series keeps its name whatever else ran.
- **Episodes, one per model.** A window's decision value is its largest channel PSI among the
  channels with at least ``min_events`` events. A value ≥ ``threshold`` opens an episode (an
  alert at the window's end, whose evidence names that channel, ranks the others and compares
  that channel's proportions and quantiles with the reference); the episode resolves after
  ``clear_windows`` consecutive windows below ``0.8 × threshold`` (hysteresis, so a PSI hovering
  around the threshold does not flap). Windows in which no channel has ``min_events`` events are
  inconclusive: they neither open nor clear an episode. When a model runs several versions their
  windows are read in (window end, version) order and any of them can open or hold the episode.
- **State** is model-level and small: a few panes per version, each at most 33 channels by the
  reference's bins (:data:`detectors.models.channels.MAX_CLASS_CHANNELS`), plus the episodes;
  ``snapshot`` saves all of it as JSON when it changed (``None`` otherwise).

A 3-class model whose class mix shifts towards "high":

>>> import dataclasses
>>> from detectors.base import DetectorInput, KeySpace
>>> from detectors.models.reference_store import ReferenceStore
>>> from detectors.models.routing import ModelView
>>> from schemas.batch import empty_batch
>>> labels = ("low", "mid", "high")
>>> def batch(ts_ms, mean):
...     n, obj = len(ts_ms), lambda v: np.full(len(ts_ms), v, dtype=object)
...     scores = rng.dirichlet(3 * np.asarray(mean), n)
...     b = dataclasses.replace(
...         empty_batch(), event_id=obj("e"), ts_ms=np.asarray(ts_ms, np.int64),
...         model_id=obj("m"), model_version=obj("v1"), status=np.full(n, 200, np.int32),
...         api_key_id=np.arange(n).astype(str).astype(object), output_label=obj(""),
...         output_value=np.full(n, np.nan), score_labels=labels, scores=scores)
...     return b, {"m": ModelView("m", np.arange(n), (), (), np.zeros((n, 0)), labels, scores)}
>>> rng = np.random.default_rng(7)
>>> store, psi = ReferenceStore(n_events=1000), PSI()
>>> b, views = batch(np.arange(1000) * 50, (0.5, 0.32, 0.18))  # the first 50 s
>>> [(r.score_type, r.channels) for r in store.update(b, views)]
[('probability', ('score:low', 'score:mid', 'score:high', 'label'))]
>>> b, views = batch(60_000 + np.arange(1200) * 500, (0.35, 0.24, 0.41))  # then it shifts
>>> psi.update(DetectorInput(b, {}, KeySpace(), 0, views, store.frozen()))
Output(findings=(), alerts=(), metrics=())
>>> out = psi.advance(660_000)  # closes the first window, [60 s, 660 s)
>>> [(m.feature, m.window_start_ms, m.event_count, m.value > 0.25) for m in out.metrics]
... # doctest: +NORMALIZE_WHITESPACE
[('score:low@v1', 60000, 1200, True), ('score:mid@v1', 60000, 1200, False),
 ('score:high@v1', 60000, 1200, True), ('label@v1', 60000, 1200, True)]
>>> [(a.status, a.entity, a.ts_ms, a.severity, a.evidence["channel"]) for a in out.alerts]
[('firing', 'm', 660000, 'high', 'score:high')]
"""

from __future__ import annotations

from typing import Any, ClassVar

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
)
from detectors.drift.psi.panes import Track, Window, window_counts
from detectors.drift.stats import PSI_EPSILON as EPSILON
from detectors.drift.stats import psi_rows
from detectors.models.channels import LABEL_CHANNEL, bin_quantiles
from schemas.batch import EventBatch

CLEAR_FACTOR = 0.8  # a window clears an episode below CLEAR_FACTOR * threshold
TOP_CHANNELS = 5  # channels ranked in an alert's evidence


def psi(reference_counts: I64, current_counts: I64, epsilon: float = EPSILON) -> float:
    """Population stability index of one histogram against another.

    >>> round(psi(np.array([50, 50]), np.array([50, 50])), 6)
    0.0
    >>> round(psi(np.array([50, 50]), np.array([90, 10])), 4)
    0.8789
    """
    return float(psi_rows(reference_counts[None], current_counts[None], epsilon)[0])


class PSI(DetectorBase):
    """Prediction PSI per model and channel over event-time windows (module doc)."""

    name = "drift.psi"
    version = "2"
    atlas = ()
    owasp = ()
    entity_types = ()
    without_reference: ClassVar[str] = "off: prediction PSI is measured against the reference"

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
        self._tracks: dict[tuple[str, str], Track] = {}
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
        """Count each event's channel bins into its pane; windows close only in ``advance``."""
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
            if ref is None or not ref.channels:
                continue
            track = self._tracks.get(key)
            if track is None or not track.same_bins(ref):
                track = self._tracks[key] = Track.of(ref, self._hop_ms)
                self._changed = True
            self._count(track, ev, np.flatnonzero((group == g) & ok))
        return EMPTY

    def _count(self, track: Track, ev: EventBatch, rows: I64) -> None:
        bins, values = track.layout.of(ev, rows)
        pane = ev.ts_ms[rows] // self._hop_ms
        keep = (bins >= 0).any(axis=1) & (pane >= track.start_h)
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
        windows: list[Window] = []
        for key in sorted(self._tracks):
            track = self._tracks[key]
            windows.extend(self._windows(key, track, prev, closed))
            keep = track.pane_ids >= closed + 1 - self._panes
            track.pane_ids, track.counts = track.pane_ids[keep], track.counts[keep]
            track.lo, track.hi = track.lo[keep], track.hi[keep]
        windows.sort(key=lambda w: (w.model_id, w.end_ms, w.version))
        metrics = tuple(m for w in windows for m in w.metrics())
        alerts = [a for w in windows if (a := self._episode(w)) is not None]
        return Output(alerts=tuple(alerts), metrics=metrics)

    def _windows(
        self, key: tuple[str, str], track: Track, prev: int | None, closed: int
    ) -> list[Window]:
        """Windows ending in (prev, closed] hops that hold at least one event, all channels of
        all of them at once."""
        if track.pane_ids.size == 0:
            return []
        w = self._panes
        ends, first, last, current = window_counts(track, w, prev, closed)
        values = psi_rows(track.ref_counts, current)
        events = current.sum(axis=2)
        out: list[Window] = []
        for i, end in enumerate(ends.tolist()):
            top = self._top(values[i], events[i])
            a, z = first[i], last[i]
            lo = float(np.fmin.reduce(track.lo[a:z, top]))
            hi = float(np.fmax.reduce(track.hi[a:z, top]))
            out.append(
                Window(
                    key[0],
                    key[1],
                    (end - w) * self._hop_ms,
                    end * self._hop_ms,
                    track.layout.names,
                    values[i],
                    events[i],
                    top,
                    self._evidence(track, current[i], values[i], events[i], top, (lo, hi)),
                )
            )
        return out

    def _top(self, values: F64, events: I64) -> int:
        """The deciding channel: the largest PSI among channels with ``min_events`` events, or
        among those with any when none has (an inconclusive window)."""
        pool = events >= self.min_events
        if not pool.any():
            pool = events > 0
        return int(np.argmax(np.where(pool, values, -np.inf)))

    def _evidence(
        self,
        track: Track,
        current: I64,
        values: F64,
        events: I64,
        top: int,
        lo_hi: tuple[float, float],
    ) -> dict[str, Any]:
        layout = track.layout
        width = int(layout.widths()[top])
        ref, cur = track.ref_counts[top, :width], current[top, :width]
        edges = layout.edges[top, : width - 1]
        if layout.names[top] == LABEL_CHANNEL:
            bins: list[Any] = [*layout.categories, "(other)"]
            ref_q: dict[str, float] = {}
            cur_q: dict[str, float] = {}
        else:
            bins = [round(float(e), 6) for e in edges]
            ref_q = bin_quantiles(ref, edges, *track.ref_range[top].tolist())
            cur_q = bin_quantiles(cur, edges, *lo_hi)
        ranked = sorted(np.flatnonzero(events > 0).tolist(), key=lambda j: (-values[j], j))
        return {
            "psi": round(float(values[top]), 6),
            "threshold": self.threshold,
            "score_type": layout.score_type,
            "channel": layout.names[top],
            "top_channels": [
                {
                    "channel": layout.names[j],
                    "psi": round(float(values[j]), 6),
                    "events": int(events[j]),
                }
                for j in ranked[:TOP_CHANNELS]
            ],
            "bins": bins,  # label channel: one label per bin; else interior edges, (a, b] bins
            "reference_proportions": [round(float(p), 6) for p in ref / ref.sum()],
            "current_proportions": [round(float(p), 6) for p in cur / cur.sum()],
            "reference_events": int(ref.sum()),
            "reference_quantiles": ref_q,
            "current_quantiles": cur_q,
            "quantile_method": "interpolated within the PSI bins",
        }

    def _episode(self, w: Window) -> AlertChange | None:
        """Open, hold or resolve the model's episode with one conclusive window."""
        if w.count < self.min_events:
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

    def _alert(self, w: Window, ep: dict[str, Any], status: str) -> AlertChange:
        version = f" version {w.version}" if w.version else ""
        channel = w.channels[w.top]
        if status == "firing":
            summary = (
                f"Prediction PSI {w.value:.3f} on {channel} >= {self.threshold} for "
                f"{w.model_id}{version} over {w.count} events in [{w.start_ms}, {w.end_ms}) ms"
            )
            evidence = w.evidence
        else:
            summary = (
                f"Largest prediction PSI of {w.model_id} below "
                f"{CLEAR_FACTOR * self.threshold:.3f} for {self.clear_windows} consecutive "
                f"windows (last: {w.value:.3f} on {channel})"
            )
            evidence = {**w.evidence, "clear_below": CLEAR_FACTOR * self.threshold}
        return AlertChange(
            entity_type="model",
            entity=w.model_id,
            model_id=w.model_id,
            tenant="",
            status="firing" if status == "firing" else "resolved",
            ts_ms=ep["start_ms"],  # the end of the first window over the threshold
            resolved_ms=None if status == "firing" else w.end_ms,
            episode_start_ms=ep["start_ms"],
            first_seen_ms=ep["first_ms"],
            last_seen_ms=w.end_ms,
            score=w.value,
            threshold=self.threshold,
            severity=ep["severity"],
            title=f"Prediction drift on {w.model_id}",
            summary=summary,
            evidence={**evidence, "model_version": w.version, "window_end_ms": w.end_ms},
            event_count=w.count,
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
        # a track saved before channels (no "names") is dropped: the next batch rebuilds it from
        # its reference, losing at most one window of counts
        self._tracks = {(m, v): Track.from_json(t) for m, v, t in state["tracks"] if "names" in t}
        self._episodes = state["episodes"]
        self._changed = False
