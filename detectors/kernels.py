"""Compiled per-caller kernels: the sequential part of the query-pattern detectors.

A caller's signals depend on the order of its own queries (each query against the caller's
previous 32, runs of near-duplicates, windows of the last 129-256 queries), so the numpy
version of ``extraction.query_pattern`` had to sort a batch by key, cut it into segments and
rebuild every running quantity with cumulative sums and group indices: ten passes over the
batch and a 32-wide gather per query and entity type, 5-10 us per event. Here one loop over
the batch's rows, in batch order, updates each row's key state in place, which is the
row-at-a-time definition itself: rows of different keys do not interact, and rows of the
same key arrive in order. Compiled with numba (``cache=True``: compiled once per machine, not
per process). Per row: 32 comparisons of 8 int8 coordinates, a few counters, and every 16th
recorded distance a Shapiro-Wilk test of 64 values.

Nothing here allocates per row or calls back into Python; the detector passes its state
columns and gets per-row arrays back, and keeps the episode and evidence logic (a few flagged
rows per batch) in Python.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar, cast

import numba
import numpy as np
import numpy.typing as npt

from detectors.extraction_state import BLOCK, N_SIG
from detectors.population import NONE
from detectors.query_sketch import DISTS, PROJ_DIM, RING, SW_A, SW_MU, SW_SIGMA

_BIG = np.iinfo(np.int32).max

_F = TypeVar("_F", bound=Callable[..., Any])
# compiled on first call and cached on disk beside the module (once per machine)
_njit = cast(Callable[[_F], _F], numba.njit(cache=True, nogil=True))


class CallerParams(NamedTuple):
    """Thresholds of one entity type, indexed by the window's length."""

    thr_near: npt.NDArray[np.int64]
    thr_off: npt.NDArray[np.int64]
    thr_low: npt.NDArray[np.int64]
    streak: float  # streak length that fires
    coverage_bits: float
    prada_alone: bool
    is_key: bool
    explain_ms: int


class CallerRows(NamedTuple):
    """Per processed row (batch order)."""

    flag: npt.NDArray[np.bool_]
    hit: npt.NDArray[np.bool_]  # (m, 5): near, streak, off, prada, boundary
    ratios: npt.NDArray[np.float64]  # (m, 5)
    counts: npt.NDArray[np.int32]  # (m, N_SIG) window counts
    n_w: npt.NDArray[np.int64]  # queries in the non-repeat window
    n_all: npt.NDArray[np.int64]  # queries in the all-query window
    streak: npt.NDArray[np.int64]
    z: npt.NDArray[np.float32]  # latest PRADA z
    ent: npt.NDArray[np.float64]  # class entropy of the window, bits
    seq: npt.NDArray[np.int64]  # the key's queries before this one
    covered: npt.NDArray[np.bool_]  # within an episode of the key (explains the row)


@_njit
def _sum8(v: Any) -> float:
    """numpy's float64 sum of up to 128 values (eight partial sums, then a tree), so compiled
    results equal the vectorised ones bit for bit."""
    n = v.size
    if n < 8:
        acc = 0.0
        for i in range(n):
            acc += v[i]
        return float(acc)
    r0, r1, r2, r3, r4, r5, r6, r7 = v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]
    i = 8
    while i + 8 <= n:
        r0 += v[i]
        r1 += v[i + 1]
        r2 += v[i + 2]
        r3 += v[i + 3]
        r4 += v[i + 4]
        r5 += v[i + 5]
        r6 += v[i + 6]
        r7 += v[i + 7]
        i += 8
    acc = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        acc += v[i]
        i += 1
    return float(acc)


@_njit
def _shapiro(d: Any, a: Any, mu: float, sigma: float) -> float:
    """:func:`detectors.query_sketch.shapiro_z` of one row of ``DISTS`` values."""
    s = np.sort(d.astype(np.float64))
    mean = _sum8(s) / s.size
    c = s - mean
    ss = _sum8(c * c)
    if not ss > 0:
        return np.inf
    num = _sum8(s * a) ** 2
    w = min(num / ss, 1.0)
    return float((np.log(max(1.0 - w, 0.0)) - mu) / sigma)


@_njit
def _caller_pass(
    slots: Any, qw: Any, q: Any, h: Any, off: Any, low: Any, bucket: Any, near_r: Any,
    prada_thr: Any, h_prior: Any, ts: Any,
    seq_c: Any, dseq_c: Any, ring_w: Any, ring_q: Any, ring_h: Any, dists: Any, n_dists: Any,
    prada_z: Any, streak_c: Any, blk_c: Any, cur_c: Any, prev_c: Any, blk_all: Any,
    cur_all: Any, prev_all: Any, last_flag: Any, dirty: Any,
    thr_near: Any, thr_off: Any, thr_low: Any, streak_fire: float, coverage_bits: float,
    prada_alone: bool, is_key: bool, explain_ms: int, sw_a: Any, sw_mu: float, sw_sigma: float,
    o_flag: Any, o_hit: Any, o_ratios: Any, o_counts: Any, o_nw: Any, o_nall: Any,
    o_streak: Any, o_z: Any, o_ent: Any, o_seq: Any, o_covered: Any,
) -> None:  # fmt: skip
    flags = np.zeros(N_SIG, np.int16)
    p = np.zeros(N_SIG - 4)
    for i in range(slots.size):
        s = slots[i]
        t = seq_c[s]
        # -- the query against the key's last RING queries
        best = _BIG
        repeat = False
        other = False
        for j in range(min(t, RING)):
            if ring_w[s, j] == qw[i] and ring_h[s, j] == h[i]:
                repeat = True
                continue
            other = True
            d2 = 0
            for k in range(PROJ_DIM):
                e = int(ring_q[s, j, k]) - int(q[i, k])
                d2 += e * e
            best = min(best, d2)
        dmin = np.sqrt(np.float64(best))
        near = (not repeat) and other and dmin <= near_r[i]
        fresh = not repeat
        # -- PRADA: record the minimum distance, test every 16th
        if fresh and t >= RING:
            nd = n_dists[s]
            dists[s, nd % DISTS] = min(np.rint(2.0 * dmin), 255.0)
            nd += 1
            n_dists[s] = nd
            if nd % 16 == 0 and nd >= DISTS:
                prada_z[s] = np.float32(_shapiro(dists[s], sw_a, sw_mu, sw_sigma))
        z = prada_z[s]
        # -- streak: a repeat neither adds nor resets
        if near:
            streak_c[s] += 1
        elif not repeat:
            streak_c[s] = 0
        streak = streak_c[s]
        # -- window of non-repeat queries (repeats are counted, do not move it)
        if fresh:
            dseq_c[s] += 1
        dseq = max(dseq_c[s] - 1, 0)
        flags[:] = 0
        flags[0] = near
        flags[3] = repeat
        if fresh:
            flags[1] = off[i]
            flags[2] = low[i]
            if bucket[i] >= 0:
                flags[4 + bucket[i]] = 1
        b = dseq // BLOCK
        if b != blk_c[s]:
            if b == blk_c[s] + 1:
                prev_c[s, :] = cur_c[s, :]
            else:
                prev_c[s, :] = 0
            cur_c[s, :] = 0
            blk_c[s] = b
        cur_c[s, :] += flags
        for k in range(N_SIG):
            o_counts[i, k] = np.int32(cur_c[s, k]) + np.int32(prev_c[s, k])
        n_w = (BLOCK if dseq >= BLOCK else 0) + dseq % BLOCK + 1
        # -- near-duplicates and repeats over all queries, repeats included
        ab = t // BLOCK
        if ab != blk_all[s]:
            if ab == blk_all[s] + 1:
                prev_all[s, :] = cur_all[s, :]
            else:
                prev_all[s, :] = 0
            cur_all[s, :] = 0
            blk_all[s] = ab
        cur_all[s, 0] += 1 if near else 0
        cur_all[s, 1] += 1 if repeat else 0
        o_counts[i, 0] = np.int32(cur_all[s, 0]) + np.int32(prev_all[s, 0])
        o_counts[i, 3] = np.int32(cur_all[s, 1]) + np.int32(prev_all[s, 1])
        n_all = (BLOCK if t >= BLOCK else 0) + t % BLOCK + 1
        # -- class coverage
        classified = 0
        for k in range(4, N_SIG):
            classified += o_counts[i, k]
        p[:] = 0.0
        for k in range(4, N_SIG):
            c = o_counts[i, k]
            if c > 0:
                pk = c / classified
                p[k - 4] = pk * np.log2(pk)
        ent = -_sum8(p)
        cover = is_key and ent >= h_prior[i] + coverage_bits and classified >= BLOCK
        # -- decision
        prada_on = np.float64(z) >= prada_thr[i]
        o_ratios[i, 0] = o_counts[i, 0] / thr_near[n_all]
        o_ratios[i, 1] = streak / streak_fire
        o_ratios[i, 2] = o_counts[i, 1] / thr_off[n_w]
        o_ratios[i, 3] = z / prada_thr[i] if prada_on and prada_alone else 0.0
        o_ratios[i, 4] = o_counts[i, 2] / thr_low[n_w] if cover else 0.0
        flag = False
        for k in range(5):
            o_hit[i, k] = o_ratios[i, k] >= 1.0
        o_hit[i, 3] = prada_on and prada_alone
        for k in range(5):
            flag = flag or o_hit[i, k]
        # -- ring and counters
        ring_w[s, t % RING] = qw[i]
        ring_h[s, t % RING] = h[i]
        seq_c[s] = t + 1
        dirty[s] = True
        if flag and ts[i] > last_flag[s]:
            last_flag[s] = ts[i]
        lf = last_flag[s]
        o_flag[i], o_nw[i], o_nall[i], o_streak[i] = flag, n_w, n_all, streak
        o_z[i], o_ent[i], o_seq[i] = z, ent, t
        o_covered[i] = lf != NONE and ts[i] <= lf + explain_ms


def caller_pass(
    cols: dict[str, npt.NDArray[Any]],
    dirty: npt.NDArray[np.bool_],
    slots: npt.NDArray[np.int64],
    rows: npt.NDArray[np.int64],
    qs: Any,
    ts: npt.NDArray[np.int64],
    params: CallerParams,
) -> CallerRows:
    """Every row (batch order; ``slots`` its key's slot) against its key's state, which is
    updated in place; ``qs`` is the batch's :class:`detectors.query_sketch.Queries`."""
    m, cap = rows.size, cols["seq"].size
    q = np.ascontiguousarray(qs.q[rows])
    out = CallerRows(
        np.zeros(m, bool), np.zeros((m, 5), bool), np.zeros((m, 5)), np.zeros((m, N_SIG), np.int32),
        np.zeros(m, np.int64), np.zeros(m, np.int64), np.zeros(m, np.int64),
        np.zeros(m, np.float32), np.zeros(m), np.zeros(m, np.int64), np.zeros(m, bool),
    )  # fmt: skip
    _caller_pass(
        slots, q.view(np.int64)[:, 0], q, qs.h[rows], qs.off[rows], qs.low[rows],
        qs.bucket[rows], qs.near[rows], qs.prada[rows], qs.h_prior[rows], ts,
        cols["seq"], cols["dseq"], cols["ring_q"].view(np.int64).reshape(cap, RING),
        cols["ring_q"], cols["ring_h"], cols["dists"], cols["n_dists"], cols["prada_z"],
        cols["streak"], cols["blk"], cols["cur"], cols["prev"], cols["blk_all"],
        cols["cur_all"], cols["prev_all"], cols["last_flag"], dirty,
        params.thr_near, params.thr_off, params.thr_low, float(params.streak),
        float(params.coverage_bits), params.prada_alone, params.is_key, params.explain_ms,
        SW_A, SW_MU, SW_SIGMA, *out,
    )  # fmt: skip
    return out
