"""``drift.features``: calibrated windowed drift of every input feature, prediction channel and
the confidence of each model version, against that version's reference.

What it does. For each (model, model_version) with a frozen reference it watches every column
of :mod:`detectors.drift.features.columns` in windows of ``window_events`` events (or ``window_s``,
whichever closes first), evaluated every ``hop_events`` (or ``hop_s``), and raises one alert per
model version and episode that ranks the drifted columns with their reference and current
quantiles.

Why this way:

- **Histograms per hop, not windows per event.** The reference fixes each column's bins (its
  quantiles, :mod:`detectors.drift.bins`); a hop is one ``(columns, bins)`` count array and a
  window the sum of its last hops, so every statistic (KS, PSI, Jensen–Shannon, Wasserstein,
  chi-square, the location shift) of every column comes from a few small arrays, whatever the
  window length. Binning a whole matrix is one lookup-table gather, which is what keeps 100
  features at 1.1–2.1 µs per event on 2 shared cores (``load-tests/bench_drift.py``).
- **Calibrated, not ad hoc.** A threshold per statistic is hopeless across hundreds of features:
  each test has an asymptotic two-sample null, Benjamini–Hochberg corrects across columns, and
  the budget ``alpha`` (1e-5 per window length per model version) is split over the test
  families and the hops of a window (:mod:`detectors.drift.features.windows`). Effect-size floors
  (0.15 reference sd of location, 0.05 of KS or JS) make the null "no change that matters", so a
  reference slightly off the truth or a seasonal wobble does not accumulate into alerts.
- **Fast and slow drift.** A sudden shift shows in the last hop long before it moves a 500-event
  window, so the last hop is tested on its own; gradual and incremental drift is caught by the
  window tests. An optional per-column CUSUM (``cusum_k``) adds sequential accumulation.
- **Event order.** Windows counted in events are cut in (``ts``, ``event_id``) order among the
  events the watermark has passed (docs/architecture.md): events wait as bin codes (one byte per
  column) until then; events behind the released watermark are late, counted and dropped.
- **Warm-up.** A version's counting starts after the last event its reference consumed, and no
  alert fires before its first full window.

A model whose ``amount`` feature shifts by one sd:

>>> import numpy as np
>>> from detectors.drift.bins import build_layout
>>> rng = np.random.default_rng(3)
>>> names = tuple(f"f{j}" for j in range(20))
>>> layout = build_layout(names, (False,) * 20, rng.normal(size=(2000, 20)))
>>> track = FeatureDrift().track_for_matrix("m", layout)
>>> x = rng.normal(size=(3000, 20)); x[1234:, 7] += 1.0
>>> changes = track.feed(track.layout.codes(x))
>>> [(c.status, c.end_event, [names[j] for j in np.flatnonzero(c.rejected)]) for c in changes]
[('firing', 1300, ['f7'])]
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from detectors.base import (
    EMPTY,
    I64,
    AlertChange,
    DetectorBase,
    DetectorInput,
    KeySpace,
    Output,
    Snapshot,
    WindowMetric,
)
from detectors.drift.bins import BinLayout
from detectors.drift.features.alerts import alert, window_metrics
from detectors.drift.features.columns import layout_of, values_of
from detectors.drift.features.state import decode_state, encode_state
from detectors.drift.features.windows import Change, Engine, Settings
from detectors.models.reference import Reference

U8 = npt.NDArray[np.uint8]
TOP = 10  # drifted columns ranked in an alert


@dataclass
class Track:
    """One (model, version): its engine, and events waiting for the watermark."""

    model_id: str
    version: str
    start_ms: int  # events at or before this time built the reference
    engine: Engine
    codes: U8
    ts: I64
    ids: npt.NDArray[np.object_]  # event ids, to break ties in event time
    released_ms: int = -(2**63)
    episode: dict[str, Any] = field(default_factory=dict)  # the open alert episode

    @property
    def layout(self) -> BinLayout:
        return self.engine.layout


class FeatureDrift(DetectorBase):
    """Windowed drift of features, predictions and confidence per model version (module doc)."""

    name = "drift.features"
    version = "1"
    entity_types = ()
    without_reference: ClassVar[str] = (
        "off: feature, prediction and confidence drift are measured against the reference"
    )

    def __init__(
        self,
        window_events: int = 500,
        hop_events: int = 100,
        window_s: int | None = 3600,
        hop_s: int | None = 720,
        alpha: float = 1e-5,
        bins: int = 20,
        location_floor: float = 0.15,
        ks_floor: float = 0.05,
        js_floor: float = 0.05,
        cusum_k: float | None = None,
        min_hop_events: int = 30,
        min_window_events: int = 100,
        clear_hops: int = 10,
    ) -> None:
        if hop_events < 1 or window_events % hop_events or window_events < hop_events:
            raise ValueError(
                "window_events must be a positive multiple of hop_events; found "
                f"{window_events} and {hop_events}"
            )
        if (window_s is None) != (hop_s is None) or (hop_s is not None and hop_s <= 0):
            raise ValueError(
                f"give both window_s and hop_s > 0, or neither; found {window_s}, {hop_s}"
            )
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), found {alpha}")
        self.window_events, self.hop_events = window_events, hop_events
        self.window_s, self.hop_s = window_s, hop_s
        self.alpha, self.bins = alpha, bins
        self.location_floor, self.ks_floor, self.js_floor = location_floor, ks_floor, js_floor
        self.cusum_k = cusum_k
        self.min_hop_events, self.min_window_events = min_hop_events, min_window_events
        self.clear_hops = clear_hops
        self.reset()

    def settings(self) -> Settings:
        return Settings(
            hop_events=self.hop_events,
            window_hops=self.window_events // self.hop_events,
            hop_ms=None if self.hop_s is None else self.hop_s * 1000,
            window_ms=None if self.window_s is None else self.window_s * 1000,
            alpha=self.alpha,
            location_floor=self.location_floor,
            ks_floor=self.ks_floor,
            js_floor=self.js_floor,
            cusum_k=self.cusum_k,
            min_hop_events=self.min_hop_events,
            min_window_events=self.min_window_events,
            clear_hops=self.clear_hops,
            summaries=True,
        )

    def reset(self) -> None:
        self.late_events_total = 0
        self._tracks: dict[tuple[str, str], Track] = {}
        self._fingerprints: dict[tuple[str, str], str] = {}
        self._refs: dict[tuple[str, str], Reference] = {}
        self._changed = True

    def track_for_matrix(self, model_id: str, layout: BinLayout, version: str = "") -> Engine:
        """An engine fed directly with bin codes in event order (benchmarks, evaluations); it
        returns episode changes only."""
        return Engine(layout, dataclasses.replace(self.settings(), summaries=False))

    def evict(self, entity_type: str, slots: I64) -> None:
        """Nothing keyed: the state is per model version."""

    # pipeline ---------------------------------------------------------------------------

    def update(self, batch: DetectorInput) -> Output:
        """Bin the batch's accepted events of every version with a reference; they wait for
        the watermark in ``advance``."""
        ev = batch.events
        if ev.n == 0 or not batch.references:
            return EMPTY
        for model in sorted(batch.views):
            view = batch.views[model]
            ok = ev.status[view.rows] < 400
            ts_all = ev.ts_ms[view.rows]
            for version, at_all in _by_version(ev.model_version[view.rows]):
                ref = batch.references.get((model, version))
                if ref is None:
                    continue
                track = self._track(model, version, ref)
                if not track.layout.names:  # nothing to watch (an LLM without scores)
                    continue
                ts = ts_all[at_all]
                new = ok[at_all] & (ts > track.start_ms)
                if not new.any():
                    continue
                late = new & (ts < track.released_ms)
                self.late_events_total += int(late.sum())
                keep = new & ~late
                at: I64 | slice = at_all[keep]
                if keep.size == view.rows.size and keep.all():  # every row: nothing to gather
                    at = slice(None)
                codes = track.layout.codes(values_of(ref, track.layout, ev, view, at))
                track.codes = np.concatenate([track.codes, codes])
                track.ts = np.concatenate([track.ts, ts_all[at]])
                track.ids = np.concatenate([track.ids, ev.event_id[view.rows[at]]])
                self._changed = True
        return EMPTY

    def _track(self, model: str, version: str, ref: Reference) -> Track:
        key = (model, version)
        if self._refs.get(key) is ref:
            return self._tracks[key]
        self._refs[key] = ref
        fingerprint = _fingerprint(ref)
        track = self._tracks.get(key)
        if track is None or self._fingerprints.get(key) != fingerprint:
            layout = layout_of(ref, self.bins)
            cols = len(layout.names)
            track = Track(
                model,
                version,
                int(ref.last_ts_ms),
                Engine(layout, self.settings()),
                np.zeros((0, cols), np.uint8),
                np.zeros(0, np.int64),
                np.zeros(0, object),
            )
            self._tracks[key] = track
            self._fingerprints[key] = fingerprint
            self._changed = True
        return track

    def advance(self, watermark_ms: int) -> Output:
        """Feed every waiting event the watermark passed, in (ts, event_id) order."""
        alerts: list[AlertChange] = []
        metrics: list[WindowMetric] = []
        for key in sorted(self._tracks):
            track = self._tracks[key]
            if watermark_ms <= track.released_ms:
                continue
            track.released_ms = watermark_ms
            self._changed = True
            passed = track.ts < watermark_ms
            changes: list[Change] = []
            if passed.any():
                # ``take`` copies whole rows, several times faster than ``codes[rows]``
                order = event_order(track.ts, track.ids, np.flatnonzero(passed))
                changes += track.engine.feed(np.take(track.codes, order, 0), track.ts[order])
                rest = np.flatnonzero(~passed)
                track.codes, track.ts = np.take(track.codes, rest, 0), track.ts[rest]
                track.ids = track.ids[rest]
            changes += track.engine.flush_until(watermark_ms)
            summaries = [c for c in changes if c.status == "window"]
            metrics += window_metrics(track, summaries, self.name)
            settings = self.settings()
            alerts += [alert(track, c, settings) for c in changes if c.status != "window"]
        return Output(alerts=tuple(alerts), metrics=tuple(metrics))

    # state ------------------------------------------------------------------------------

    def snapshot(self, keyspace: KeySpace) -> Snapshot:
        if not self._changed:
            return Snapshot()
        self._changed = False
        return Snapshot(
            model=encode_state(self.late_events_total, self._tracks, self._fingerprints)
        )

    def restore(self, snapshot: Snapshot, keyspace: KeySpace) -> None:
        if snapshot.model is None:
            return
        self.late_events_total, tracks, prints = decode_state(snapshot.model, self.settings())
        self._tracks = {k: Track(*t) for k, t in tracks.items()}
        self._fingerprints = prints
        self._refs = {}
        self._changed = False


def _by_version(versions: npt.NDArray[np.object_]) -> list[tuple[str, I64]]:
    """Positions of each model version; one comparison pass when the batch has one version."""
    if versions.size and bool((versions == versions[0]).all()):
        return [(str(versions[0]), np.arange(versions.size))]
    names, inverse = np.unique(versions.astype(str), return_inverse=True)
    return [(str(v), np.flatnonzero(inverse == i)) for i, v in enumerate(names.tolist())]


def event_order(ts: I64, ids: npt.NDArray[np.object_], rows: I64) -> I64:
    """``rows`` in (ts, event_id) order. Sorting strings is the costly part, so only rows that
    share an event time with another are compared by id.

    >>> event_order(np.array([5, 3, 5, 1]), np.array(["b", "z", "a", "q"], object), np.arange(4))
    array([3, 1, 2, 0])
    """
    order = rows[np.argsort(ts[rows], kind="stable")]
    t = ts[order]
    tied = np.zeros(t.size, bool)
    same = t[1:] == t[:-1]
    tied[1:] |= same
    tied[:-1] |= same
    if tied.any():
        at = np.flatnonzero(tied)
        sub = order[at]
        order[at] = sub[np.lexsort((ids[sub].astype(str), ts[sub]))]
    return order


def _fingerprint(ref: Reference) -> str:
    """Cheap identity of a reference: a replaced reference (same version) rebuilds the track."""
    digest = hashlib.sha1(np.ascontiguousarray(ref.sample_features).tobytes())
    digest.update(np.ascontiguousarray(ref.sample_channels).tobytes())
    return f"{ref.n_events}:{ref.events_seen}:{ref.last_ts_ms}:{digest.hexdigest()}"
