"""The windowed, calibrated drift engine of one (model, version): hops, windows, tests, episodes.

It is fed bin codes (:meth:`detectors.drift.bins.BinLayout.codes`) in event order, optionally
with event times. A hop closes after ``hop_events`` events, or when the next event is
``hop_ms`` after the hop's first one; a window is the last ``window_hops`` hops, cut shorter so
that it spans at most ``window_ms`` (whichever closes first, docs/architecture.md). Hop counts are
one histogram per hop on the reference's bins, and windows are differences of their running sum:
statistics are never recomputed from events.

At every hop, after a warm-up of one full window, three families of tests run over the columns,
each corrected across columns with Benjamini–Hochberg (:mod:`detectors.drift.stats`):

- ``hop_location``: the last hop's mean normal score against the reference (numeric columns),
  which is what catches a sudden shift within about one hop;
- ``window_location``: the same over the window, which catches gradual and incremental shifts;
- ``window_shape``: two-sample KS on numeric columns, chi-square homogeneity gated on a
  Jensen–Shannon floor on categorical ones (shape and category-mix changes);
- optionally ``cusum``: a two-sided CUSUM per numeric column on the hops' location z
  (:mod:`detectors.drift.sequential`), with allowance ``cusum_k`` and a threshold from Siegmund's
  ARL
  approximation.

The false-alarm budget ``alpha`` is per window length: it is split evenly over the families and
the ``window_hops`` hops of a window (Bonferroni), each family-hop running BH at that level.
Each test has an effect-size floor (the location tests an interval null), so stationary noise,
a reference a little off the truth and slow seasonal wobble below the floor stay quiet.

An episode opens at the first hop with a rejection and resolves after ``clear_hops`` hops in a
row without one; :class:`Change` carries what an alert needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from detectors.drift import stats as ds
from detectors.drift.bins import BinLayout, hop_histograms
from detectors.drift.sequential import Cusum

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
B8 = npt.NDArray[np.bool_]
FAMILIES = ("hop_location", "window_location", "window_shape", "cusum")
SCREEN = 1e-3  # location p-values below this are recomputed by saddlepoint


@dataclass(frozen=True, slots=True)
class Settings:
    hop_events: int = 100
    window_hops: int = 5
    hop_ms: int | None = None
    window_ms: int | None = None
    alpha: float = 1e-5
    location_floor: float = 0.15  # reference sd
    ks_floor: float = 0.05
    js_floor: float = 0.05
    cusum_k: float | None = None  # reference sd; None: no CUSUM family
    min_hop_events: int = 30
    min_window_events: int = 100
    clear_hops: int = 10
    summaries: bool = False  # also a "window" Change at the end of every whole window length

    @property
    def families(self) -> int:
        return 3 if self.cusum_k is None else 4

    @property
    def level(self) -> float:
        """BH level of one family at one hop."""
        return self.alpha / (self.families * self.window_hops)


@dataclass(frozen=True, slots=True)
class Decision:
    """Per hop and column: the families that reject, the smallest p-value, the statistics."""

    full: dict[str, B8]
    p_min: F64
    d_hop: F64
    d_window: F64
    ks: F64
    hop_n: F64


@dataclass(frozen=True, slots=True)
class Change:
    """An episode opened or resolved at a hop."""

    status: str  # "firing" | "resolved" | "window" (a summary, with ``summaries``)
    hop: int  # hops completed before this one, since the engine started
    end_event: int  # events consumed when the hop closed
    first_ts_ms: int  # the window's first event time (-1 without times)
    end_ts_ms: int  # the hop's last event time (-1 without times)
    window: I64  # (columns, bins + 1) the window's counts
    rejected: B8  # (columns,) columns any family rejected
    p_min: F64  # (columns,) smallest p-value over the families
    families: tuple[tuple[str, ...], ...]  # per column, the families that rejected it
    d_hop: F64
    d_window: F64
    ks: F64


class Engine:
    """State of one (model, version); :meth:`feed` returns the episode changes (module doc)."""

    def __init__(self, layout: BinLayout, settings: Settings) -> None:
        self.layout, self.s = layout, settings
        cols, width = len(layout.names), layout.bins + 1
        self.partial = np.zeros((cols, width), np.int64)
        self.partial_n = 0
        self.partial_ts = (-1, -1)
        self.ring = np.zeros((0, cols, width), np.int64)  # last window_hops hops
        self.ring_ts = np.zeros((0, 2), np.int64)
        self.hops = 0
        self.events = 0
        self.episode: dict[str, int] | None = None
        self.numeric = layout.numeric
        self.num_idx = np.flatnonzero(layout.numeric)
        self.cat_idx = np.flatnonzero(layout.categorical)
        self.ks_idx = np.flatnonzero(~layout.categorical & (layout.n_ref > 0))
        ref = layout.counts[self.ks_idx, : layout.bins].astype(np.float64)
        self.ref_cdf = np.cumsum(ref / np.maximum(ref.sum(axis=1, keepdims=True), 1.0), axis=1)
        k = settings.cusum_k
        self.cusum: Cusum | None = None
        if k is not None:
            se = np.sqrt(1.0 / settings.hop_events + 1.0 / np.maximum(layout.n_ref, 1))
            arl = 2.0 * max(int(self.numeric.sum()), 1) / settings.level
            h = ds.cusum_threshold(float(k / se.mean()), arl)
            self.cusum = Cusum(cols, k=k / se, h=np.full(cols, h))

    # hops -------------------------------------------------------------------------------

    def _cuts(self, n: int, ts: I64 | None) -> I64:
        """Row positions (exclusive ends) where hops close within ``n`` new rows: every
        ``hop_events`` rows, unless a hop reaches ``hop_ms`` first."""
        s, have = self.s, self.partial_n
        by_count = np.arange(s.hop_events - have, n + 1, s.hop_events)
        if ts is None or s.hop_ms is None:
            return by_count
        # where a hop opened at each row would close on time (one search for the batch)
        due = np.searchsorted(ts, ts + s.hop_ms, side="left")
        opened = np.concatenate([[0], by_count[by_count < n]])
        due_first = due[opened]
        if have:  # the open hop started at its first event, in an earlier batch
            due_first[0] = np.searchsorted(ts, self.partial_ts[0] + s.hop_ms, side="left")
        if (due_first >= np.append(by_count, n)[: opened.size]).all():
            return by_count  # the usual batch: no hop closes on time
        cuts, start, end = [], 0, s.hop_events - have
        closes = int(due_first[0])
        while True:  # a hop closed on time moves the later ones: follow them one at a time
            if closes < min(end, n):
                cuts.append(closes)
            elif end <= n:
                cuts.append(end)
            else:
                break
            start = cuts[-1]
            if start >= n:
                break
            end, closes = start + s.hop_events, int(due[start])
        return np.asarray(cuts, np.int64)

    def feed(self, codes: U8, ts: I64 | None = None) -> list[Change]:
        """Count ``codes`` (rows, columns) in event order; evaluate every hop that closes."""
        n = codes.shape[0]
        if n == 0:
            return []
        cuts = self._cuts(n, ts)
        bounds = np.concatenate([[0], cuts, [n]])
        hop_of_row = np.repeat(np.arange(bounds.size - 1), np.diff(bounds))
        hists = hop_histograms(codes, hop_of_row, bounds.size - 1, self.layout.bins)
        hists[0] += self.partial
        sizes = np.diff(bounds).astype(np.int64)
        sizes[0] += self.partial_n
        first_ts = np.full(bounds.size - 1, -1, np.int64)
        last_ts = np.full(bounds.size - 1, -1, np.int64)
        if ts is not None:
            first_ts = np.where(sizes > 0, ts[np.minimum(bounds[:-1], n - 1)], -1)
            last_ts = np.where(np.diff(bounds) > 0, ts[np.maximum(bounds[1:] - 1, 0)], -1)
            if self.partial_n:
                first_ts[0] = self.partial_ts[0]
                if bounds[1] == 0:
                    last_ts[0] = self.partial_ts[1]
        closed = cuts.size
        ends = self.events + cuts
        changes = self._evaluate(hists[:closed], first_ts[:closed], last_ts[:closed], ends)
        self.partial = hists[closed]
        self.partial_n = int(sizes[closed])
        self.partial_ts = (int(first_ts[closed]), int(last_ts[closed]))
        if not self.partial_n:
            self.partial_ts = (-1, -1)
        self.events += n
        return changes

    def flush_until(self, ts_ms: int) -> list[Change]:
        """Close the open hop if event time passed its ``hop_ms`` (a quiet model's hop)."""
        s = self.s
        if not self.partial_n or s.hop_ms is None or self.partial_ts[0] + s.hop_ms > ts_ms:
            return []
        hist, ts = self.partial[None].copy(), np.array([self.partial_ts])
        self.partial[:] = 0
        self.partial_n, self.partial_ts = 0, (-1, -1)
        return self._evaluate(hist, ts[:, 0], ts[:, 1], np.array([self.events]))

    # evaluation -------------------------------------------------------------------------

    def _location(self, d: F64, n: F64, cols: I64) -> F64:
        """Location p-values of ``d`` (hops, len(cols)): normal, then saddlepoint wherever the
        normal one is small enough to matter (the normal tail is wrong for skewed scores)."""
        lay, floor = self.layout, self.s.location_floor
        m = lay.n_ref[cols].astype(np.float64)
        p = ds.location_pvalue(d, n, m, floor)
        hit = np.nonzero(p < SCREEN)
        if hit[0].size:
            c = cols[hit[1]]
            probs = lay.counts[c, : lay.bins] / np.maximum(lay.n_ref[c], 1)[:, None]
            p[hit] = ds.saddlepoint_pvalue(
                d[hit],
                n[hit],
                m[hit[1]],
                floor,
                lay.scores[c],
                probs,
                lay.score_mean[c],
                lay.score_sd[c],
            )
        return p

    def decide(self, hops: I64, window: I64) -> Decision:
        """The test families on hops (h, columns, bins + 1) and their windows (same shape),
        without the sequential family: which columns each family rejects at each hop."""
        s, lay = self.s, self.layout
        h = hops.shape[0]
        b, cols, q = lay.bins, len(lay.names), s.level
        hop_n = hops[..., :b].sum(axis=2).astype(np.float64)
        win_n = window[..., :b].sum(axis=2).astype(np.float64)
        m = lay.n_ref.astype(np.float64)
        scale = np.where(lay.score_sd > 0, lay.score_sd, np.inf)
        d_hop = (
            np.einsum("hcb,cb->hc", hops[..., :b], lay.scores) / np.maximum(hop_n, 1.0)
            - lay.score_mean
        ) / scale
        d_win = (
            np.einsum("hcb,cb->hc", window[..., :b], lay.scores) / np.maximum(win_n, 1.0)
            - lay.score_mean
        ) / scale
        num, cat = self.num_idx, self.cat_idx
        full = {name: np.zeros((h, cols), bool) for name in FAMILIES}
        p_all = np.ones((h, cols))
        ks = np.zeros((h, cols))
        win_ok = win_n >= s.min_window_events
        if num.size:
            p_hop = self._location(d_hop[:, num], hop_n[:, num], num)
            p_hop = np.where(hop_n[:, num] >= s.min_hop_events, p_hop, 1.0)
            p_win = self._location(d_win[:, num], win_n[:, num], num)
            p_win = np.where(win_ok[:, num], p_win, 1.0)
            full["hop_location"][:, num] = ds.bh_reject(p_hop, q)
            full["window_location"][:, num] = ds.bh_reject(p_win, q)
            p_all[:, num] = np.minimum(p_hop, p_win)
        p_shape = np.ones((h, cols))
        if self.ks_idx.size:
            k_idx = self.ks_idx
            ks[:, k_idx] = ds.ks_stat_cdf(self.ref_cdf, window[:, k_idx, :b])
            p_ks = ds.ks_pvalue(ks[:, k_idx], win_n[:, k_idx], m[k_idx], s.ks_floor)
            p_shape[:, k_idx] = np.where(win_ok[:, k_idx], p_ks, 1.0)
        if cat.size:
            ref_c, cur_c = lay.counts[cat, :b], window[:, cat, :b]
            chi, dof = ds.chi2_homogeneity(ref_c, cur_c)
            gate = (ds.js_distance(ref_c, cur_c) >= s.js_floor) & win_ok[:, cat]
            p_shape[:, cat] = np.where(gate, ds.chi2_pvalue(chi, dof), 1.0)
        full["window_shape"] = ds.bh_reject(p_shape, q)
        p_all = np.minimum(p_all, p_shape)
        return Decision(full, p_all, d_hop, d_win, ks, hop_n)

    def _evaluate(self, hops: I64, first_ts: I64, last_ts: I64, ends: I64) -> list[Change]:
        h = hops.shape[0]
        if h == 0:
            return []
        s, lay = self.s, self.layout
        allh = np.concatenate([self.ring, hops])
        all_ts = np.concatenate([self.ring_ts, np.column_stack([first_ts, last_ts])])
        old = self.ring.shape[0]
        cum = np.concatenate([np.zeros((1, *allh.shape[1:]), np.int64), allh.cumsum(axis=0)])
        end = np.arange(old + 1, old + h + 1)
        start = np.maximum(end - s.window_hops, 0)
        if s.window_ms is not None and first_ts[0] >= 0:
            t_end = all_ts[end - 1, 1]
            start = np.maximum(start, np.searchsorted(all_ts[:, 0], t_end - s.window_ms, "right"))
            start = np.minimum(start, end - 1)
        window = cum[end] - cum[start]
        dec = self.decide(hops, window)
        full, p_all, d_hop, d_win, ks = dec.full, dec.p_min, dec.d_hop, dec.d_window, dec.ks
        cols = len(lay.names)
        if self.cusum is not None:
            m, hop_n = lay.n_ref.astype(np.float64), dec.hop_n
            se = np.sqrt(1.0 / np.maximum(hop_n, 1.0) + 1.0 / np.maximum(m, 1.0))
            z = np.where(self.numeric & (hop_n >= s.min_hop_events), d_hop / se, 0.0)
            full["cusum"] = self.cusum.update(z) & self.numeric
        any_rej = np.zeros((h, cols), bool)
        for name in FAMILIES:
            any_rej |= full[name]
        fires = any_rej.any(axis=1) & (self.hops + np.arange(h) >= s.window_hops)  # warm-up
        visit = range(h)
        if self.episode is None and not fires.any():  # the usual hop: only summaries to emit
            visit = range((-self.hops - 1) % s.window_hops, h, s.window_hops)
            visit = visit if s.summaries else range(0)
        changes = []
        for i in visit:
            hop = self.hops + i
            if hop < s.window_hops:  # warm-up: the first window is still filling
                continue
            fire = bool(fires[i])
            ep = self.episode
            change = None
            if ep is None and fire:
                self.episode = {"start": hop, "clear": 0}
                change = "firing"
            elif ep is not None:
                ep["clear"] = 0 if fire else ep["clear"] + 1
                if ep["clear"] >= s.clear_hops:
                    self.episode = None
                    change = "resolved"
            if change is None and s.summaries and (hop + 1) % s.window_hops == 0:
                change = "window"
            if change is not None:
                fams = (
                    tuple(tuple(f for f in FAMILIES if full[f][i, j]) for j in range(cols))
                    if change != "window"
                    else ()
                )
                changes.append(
                    Change(
                        change,
                        hop,
                        int(ends[i]),
                        int(all_ts[start[i], 0]),
                        int(last_ts[i]),
                        window[i],
                        any_rej[i],
                        p_all[i],
                        fams,
                        d_hop[i],
                        d_win[i],
                        ks[i],
                    )
                )
        self.hops += h
        self.ring = allh[-s.window_hops :].copy()
        self.ring_ts = all_ts[-s.window_hops :].copy()
        return changes
