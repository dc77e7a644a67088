"""Event-time panes of ``drift.psi``: per (model, version), one histogram per pane (``hop_s`` of
event time) on its reference's channel bins; the windows summed from them, and their metric
rows (see :mod:`detectors.drift.psi.detector`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from detectors.base import F64, I64, WindowMetric
from detectors.models.channels import Channels
from detectors.models.reference import Reference

METRIC = "psi_prediction"


def metric_feature(channel: str, version: str) -> str:
    """The ``feature`` of a metric row (module doc of :mod:`detectors.drift.psi.detector`).

    >>> metric_feature("score:high", "7.1.0"), metric_feature("score", "")
    ('score:high@7.1.0', 'score')
    """
    return f"{channel}@{version}" if version else channel


@dataclass(slots=True)
class Track:
    """One (model, version): its reference's channels and bins, and its open panes."""

    layout: Channels
    ref_counts: I64  # (channels, bins)
    ref_range: F64  # (channels, 2): min and max of the reference's values
    start_h: int  # first pane counted, in hops since the epoch
    pane_ids: I64  # sorted
    counts: I64  # (panes, channels, bins)
    lo: F64  # (panes, channels): min value (NaN for the label channel)
    hi: F64

    @classmethod
    def of(cls, ref: Reference, hop_ms: int) -> Track:
        n, width = ref.channel_counts.shape
        return cls(
            ref.layout,
            np.asarray(ref.channel_counts, np.int64),
            np.asarray(ref.channel_range, np.float64),
            ref.last_ts_ms // hop_ms + 1,
            np.zeros(0, np.int64),
            np.zeros((0, n, width), np.int64),
            np.zeros((0, n)),
            np.zeros((0, n)),
        )

    def same_bins(self, ref: Reference) -> bool:
        return self.layout.same(ref.layout) and np.array_equal(self.ref_counts, ref.channel_counts)

    def add(self, pane: I64, bins: I64, values: F64) -> None:
        """Count ``bins`` (events, channels; -1 for none) into their panes."""
        _, n, width = self.counts.shape
        ids = np.union1d(self.pane_ids, pane)
        if ids.size != self.pane_ids.size:
            at = np.searchsorted(ids, self.pane_ids)
            counts = np.zeros((ids.size, n, width), np.int64)
            lo, hi = np.full((ids.size, n), np.nan), np.full((ids.size, n), np.nan)
            counts[at], lo[at], hi[at] = self.counts, self.lo, self.hi
            self.pane_ids, self.counts, self.lo, self.hi = ids, counts, lo, hi
        event, channel = np.nonzero(bins >= 0)
        at = np.searchsorted(self.pane_ids, pane)[event]
        flat = (at * n + channel) * width + bins[event, channel]
        self.counts += np.bincount(flat, minlength=self.counts.size).reshape(self.counts.shape)
        np.fmin.at(self.lo, (at, channel), values[event, channel])
        np.fmax.at(self.hi, (at, channel), values[event, channel])

    def to_json(self) -> dict[str, Any]:
        layout = self.layout
        return {
            "score_type": layout.score_type,
            "names": layout.names,
            "columns": layout.columns,
            "categories": layout.categories,
            "class_order": layout.class_order,
            "edges": layout.edges.tolist(),  # +inf padding becomes null
            "ref_counts": self.ref_counts.tolist(),
            "ref_range": self.ref_range.tolist(),
            "start_h": self.start_h,
            "pane_ids": self.pane_ids.tolist(),
            "counts": self.counts.tolist(),
            "lo": self.lo.tolist(),
            "hi": self.hi.tolist(),
        }

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> Track:
        ref_counts = np.asarray(state["ref_counts"], np.int64)
        n, width = ref_counts.shape
        edges = np.asarray(state["edges"], np.float64).reshape(n, -1)  # JSON null -> NaN
        layout = Channels(
            state["score_type"],
            tuple(state["names"]),
            tuple(state["columns"]),
            tuple(state["categories"]),
            tuple(state["class_order"]),
            np.where(np.isnan(edges), np.inf, edges),  # edges are never NaN, padding is +inf
        )
        return cls(
            layout,
            ref_counts,
            np.asarray(state["ref_range"], np.float64).reshape(n, 2),
            state["start_h"],
            np.asarray(state["pane_ids"], np.int64),
            np.asarray(state["counts"], np.int64).reshape(-1, n, width),
            np.asarray(state["lo"], np.float64).reshape(-1, n),
            np.asarray(state["hi"], np.float64).reshape(-1, n),
        )


def window_counts(track: Track, w: int, prev: int | None, closed: int) -> tuple[I64, I64, I64, I64]:
    """Windows of ``w`` panes ending in (prev, closed] hops that hold at least one event: their
    ends in hops, each one's first and past-the-last pane position in ``track``, and their counts
    (windows, channels, bins)."""
    ends = np.unique(track.pane_ids[:, None] + np.arange(1, w + 1))
    ends = ends[(ends <= closed) & (ends - w >= track.start_h)]
    if prev is not None:
        ends = ends[ends > prev]
    zero = np.zeros((1, *track.counts.shape[1:]), np.int64)
    cum = np.concatenate([zero, track.counts.cumsum(axis=0)])
    first = np.searchsorted(track.pane_ids, ends - w)
    last = np.searchsorted(track.pane_ids, ends)
    current = cum[last] - cum[first]  # (windows, channels, bins)
    return ends, first, last, current


@dataclass(frozen=True, slots=True)
class Window:
    """One evaluated window of one (model, version): PSI and events per channel."""

    model_id: str
    version: str
    start_ms: int
    end_ms: int
    channels: tuple[str, ...]
    psi: F64  # per channel, NaN for a channel without events
    events: I64  # per channel
    top: int  # the channel that decides (detectors.drift.psi.detector module doc)
    evidence: dict[str, Any]

    @property
    def value(self) -> float:
        return float(self.psi[self.top])

    @property
    def count(self) -> int:
        return int(self.events[self.top])

    def metrics(self) -> list[WindowMetric]:
        return [
            WindowMetric(
                self.model_id,
                METRIC,
                self.start_ms,
                self.end_ms,
                float(self.psi[j]),
                metric_feature(name, self.version),
                int(self.events[j]),
            )
            for j, name in enumerate(self.channels)
            if self.events[j] > 0
        ]
