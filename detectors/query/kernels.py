"""Compiled kernels of ``extraction.query_pattern``: its per-caller pass and its per-query
geometry (normal scores, projection, anchor search; see each function for why).

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

Nothing here allocates per row or calls back into Python, and nothing is written but the
``out`` arrays and, in :func:`caller_pass`, the state columns the detector passes in; the
episode and evidence logic (a few flagged rows per batch) stays in Python.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba
import numpy as np

from detectors.base import NONE

_BIG = np.iinfo(np.int32).max

_F = TypeVar("_F", bound=Callable[..., Any])
# compiled on first call and cached on disk beside the module (once per machine)
_njit = cast(Callable[[_F], _F], numba.njit(cache=True, nogil=True))


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
    """:func:`detectors.query.sketch.shapiro_z` of one row of ``DISTS`` values."""
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
def _enter_block(blk: Any, cur: Any, prev: Any, s: int, b: int) -> None:
    """Key ``s``'s window moves to block ``b``: the current block becomes the previous one
    (or the previous one is empty when a block was skipped)."""
    if b != blk[s]:
        if b == blk[s] + 1:
            prev[s, :] = cur[s, :]
        else:
            prev[s, :] = 0
        cur[s, :] = 0
        blk[s] = b


# lattice probing: a query's raw values hashed into LANES lanes of 4 bits (feature j in lane
# j % LANES); it keeps the key's base record when at least LANES_FIXED lanes are equal
LANES = 8
LANES_FIXED = 5
LATTICE_GAIN = 3  # score per query on the base; a query off it takes 1
NO_LANES = np.uint32(0xFFFFFFFF)  # fewer features than lanes: no lattice signal


@_njit
def lanes_fixed(a: Any, b: Any) -> int:
    """Lanes (4 bits each) equal in two lane hashes."""
    x = np.uint64(a) ^ np.uint64(b)
    same = 0
    for k in range(LANES):
        if (x >> np.uint64(4 * k)) & np.uint64(15) == np.uint64(0):
            same += 1
    return same


@_njit
def lane_hashes(bits: Any, out: Any) -> None:
    """``out[i]``: row ``i`` of ``bits`` (raw float64 values as uint64, NaN and -0.0
    normalised) hashed into ``LANES`` lanes of 4 bits, feature ``j`` into lane ``j % LANES``:
    two queries that differ in ``k`` features differ in at most ``k`` lanes, and two unrelated
    ones agree on a lane with probability 1/16."""
    n, d = bits.shape
    acc = np.zeros(LANES, np.uint64)
    for i in range(n):
        acc[:] = 0
        for j in range(d):
            b = bits[i, j]
            m = (b ^ (b >> np.uint64(29))) * (
                np.uint64(j + 1) * np.uint64(0x9E3779B97F4A7C15) | np.uint64(1)
            )
            acc[j % LANES] ^= m
        h = np.uint64(0)
        for k in range(LANES):
            v = acc[k] ^ np.uint64(k)
            v = (v ^ (v >> np.uint64(31))) * np.uint64(0xBF58476D1CE4E5B9)
            v = v ^ (v >> np.uint64(32))
            h |= (v >> np.uint64(60)) << np.uint64(4 * k)
        out[i] = h if h != np.uint64(NO_LANES) else h - np.uint64(1)


@_njit
def caller_pass(
    slots: Any, qw: Any, q: Any, h: Any, off: Any, low: Any, bucket: Any, near_r: Any,
    prada_thr: Any, h_prior: Any, ts: Any,
    seq_c: Any, dseq_c: Any, ring_w: Any, ring_q: Any, ring_h: Any, dists: Any, n_dists: Any,
    prada_z: Any, streak_c: Any, blk_c: Any, cur_c: Any, prev_c: Any, blk_all: Any,
    cur_all: Any, prev_all: Any, last_flag: Any, dirty: Any,
    thr_near: Any, thr_off: Any, thr_low: Any, streak_fire: float, coverage_bits: float,
    prada_alone: bool, is_key: bool, explain_ms: int, block: int, sw_a: Any, sw_mu: float,
    sw_sigma: float,
    o_flag: Any, o_hit: Any, o_ratios: Any, o_counts: Any, o_nw: Any, o_nall: Any,
    o_streak: Any, o_z: Any, o_ent: Any, o_seq: Any, o_covered: Any,
    lanes: Any, lat_base: Any, lat_score: Any, lattice_fire: int, o_lat: Any,
) -> None:  # fmt: skip
    ring, proj, n_dist, n_sig = ring_w.shape[1], q.shape[1], dists.shape[1], cur_c.shape[1]
    n_cls = n_sig - 5  # near, off, low, repeat, the class buckets, lattice last
    lat_cap = 2 * lattice_fire
    flags = np.zeros(n_sig, np.int16)
    p = np.zeros(n_cls)
    for i in range(slots.size):
        s = slots[i]
        t = seq_c[s]
        # -- the query against the key's last ring queries
        best = _BIG
        repeat = False
        other = False
        for j in range(min(t, ring)):
            if ring_w[s, j] == qw[i] and ring_h[s, j] == h[i]:
                repeat = True
                continue
            other = True
            d2 = 0
            for k in range(proj):
                e = int(ring_q[s, j, k]) - int(q[i, k])
                d2 += e * e
            best = min(best, d2)
        dmin = np.sqrt(np.float64(best))
        near = (not repeat) and other and dmin <= near_r[i]
        fresh = not repeat
        # -- PRADA: record the minimum distance, test every 16th
        if fresh and t >= ring:
            nd = n_dists[s]
            dists[s, nd % n_dist] = min(np.rint(2.0 * dmin), 255.0)
            nd += 1
            n_dists[s] = nd
            if nd % 16 == 0 and nd >= n_dist:
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
        # -- lattice: fresh queries that keep the key's base record on all but a few lanes
        lat = False
        if fresh and lanes[i] != NO_LANES:
            lat = lanes_fixed(lanes[i], lat_base[s]) >= LANES_FIXED
            if lat:
                lat_score[s] = min(lat_score[s] + LATTICE_GAIN, lat_cap)
            elif lat_score[s] > 0:
                lat_score[s] -= 1
            else:
                lat_base[s] = lanes[i]
        flags[:] = 0
        flags[0] = near
        flags[3] = repeat
        if fresh:
            flags[1] = off[i]
            flags[2] = low[i]
            if bucket[i] >= 0:
                flags[4 + bucket[i]] = 1
            flags[n_sig - 1] = lat
        _enter_block(blk_c, cur_c, prev_c, s, dseq // block)
        cur_c[s, :] += flags
        for k in range(n_sig):
            o_counts[i, k] = np.int32(cur_c[s, k]) + np.int32(prev_c[s, k])
        n_w = (block if dseq >= block else 0) + dseq % block + 1
        # -- near-duplicates and repeats over all queries, repeats included
        _enter_block(blk_all, cur_all, prev_all, s, t // block)
        cur_all[s, 0] += 1 if near else 0
        cur_all[s, 1] += 1 if repeat else 0
        o_counts[i, 0] = np.int32(cur_all[s, 0]) + np.int32(prev_all[s, 0])
        o_counts[i, 3] = np.int32(cur_all[s, 1]) + np.int32(prev_all[s, 1])
        n_all = (block if t >= block else 0) + t % block + 1
        # -- class coverage
        classified = 0
        for k in range(4, 4 + n_cls):
            classified += o_counts[i, k]
        p[:] = 0.0
        for k in range(4, 4 + n_cls):
            c = o_counts[i, k]
            if c > 0:
                pk = c / classified
                p[k - 4] = pk * np.log2(pk)
        ent = -_sum8(p)
        cover = is_key and ent >= h_prior[i] + coverage_bits and classified >= block
        # -- decision
        prada_on = np.float64(z) >= prada_thr[i]
        o_ratios[i, 0] = o_counts[i, 0] / thr_near[n_all]
        o_ratios[i, 1] = streak / streak_fire
        o_ratios[i, 2] = o_counts[i, 1] / thr_off[n_w]
        o_ratios[i, 3] = z / prada_thr[i] if prada_on and prada_alone else 0.0
        o_ratios[i, 4] = o_counts[i, 2] / thr_low[n_w] if cover else 0.0
        o_ratios[i, 5] = lat_score[s] / lattice_fire if lat else 0.0
        flag = False
        for k in range(6):
            o_hit[i, k] = o_ratios[i, k] >= 1.0
        o_hit[i, 3] = prada_on and prada_alone
        for k in range(6):
            flag = flag or o_hit[i, k]
        # -- ring and counters
        ring_w[s, t % ring] = qw[i]
        ring_h[s, t % ring] = h[i]
        seq_c[s] = t + 1
        dirty[s] = True
        if flag and ts[i] > last_flag[s]:
            last_flag[s] = ts[i]
        lf = last_flag[s]
        o_flag[i], o_nw[i], o_nall[i], o_streak[i] = flag, n_w, n_all, streak
        o_z[i], o_ent[i], o_seq[i], o_lat[i] = z, ent, t, lat_score[s]
        o_covered[i] = lf != NONE and ts[i] <= lf + explain_ms


@_njit
def normal_scores(x: Any, knots: Any, knot_z: Any, start: Any, size: Any, out: Any) -> None:
    """``np.interp`` of every column ``j`` of ``x`` on its knots, with numpy's arithmetic
    (bit-identical results) and NaN scored 0, into ``out``. Feature ``j``'s ``size[j]`` knots
    start at ``knots[start[j]]``, padded with +inf to a power of two (``start[j + 1]``), so the
    search is the same fixed halving steps for every value: a loop without data-dependent
    branches over the whole column, five times faster than one binary search per value."""
    n, d = x.shape
    lo = np.empty(n, np.int64)
    col = np.empty(n)
    for j in range(d):
        xp, fp = knots[start[j] : start[j + 1]], knot_z[start[j] : start[j + 1]]
        last = size[j] - 1
        col[:] = x[:, j]
        lo[:] = 0
        half = xp.size >> 1
        while half >= 1:  # lo: the last knot <= the value (0 below the first)
            for i in range(n):
                lo[i] += half * (xp[lo[i] + half] <= col[i])
            half >>= 1
        for i in range(n):
            v = col[i]
            if v != v:
                out[i, j] = 0.0
            elif v <= xp[0]:
                out[i, j] = fp[0]
            elif v >= xp[last]:
                out[i, j] = fp[last]
            else:
                k = lo[i]
                if xp[k] == v:
                    out[i, j] = fp[k]
                    continue
                slope = (fp[k + 1] - fp[k]) / (xp[k + 1] - xp[k])
                r = slope * (v - xp[k]) + fp[k]
                if r != r:
                    r = slope * (v - xp[k + 1]) + fp[k + 1]
                    if r != r and fp[k] == fp[k + 1]:
                        r = fp[k]
                out[i, j] = r


@_njit
def beyond(z: Any, anchors: Any, radius2: float, out: Any) -> None:
    """``out[i]``: every anchor is farther than ``sqrt(radius2)`` from row ``i`` of ``z``.
    Stops at the first anchor inside (a natural query finds one early) and abandons an anchor
    once its partial sum passes the radius (a far query is rejected in a few coordinates)."""
    n, d = z.shape
    for i in range(n):
        far = True
        for a in range(anchors.shape[0]):
            d2 = 0.0
            for k in range(d):
                e = z[i, k] - anchors[a, k]
                d2 += e * e
                if d2 > radius2:
                    break
            if d2 <= radius2:
                far = False
                break
        out[i] = far


@_njit
def project(z: Any, projection: Any, scale: float, out: Any) -> None:
    """``out = clip(rint(z @ projection * scale), -127, 127)`` as int8, one row at a time:
    a (rows x features) by (features x 8) product is too thin for BLAS, whose threads only
    spin on the other core."""
    n, d = z.shape
    for i in range(n):
        for c in range(projection.shape[1]):
            acc = 0.0
            for k in range(d):
                acc += z[i, k] * projection[k, c]
            out[i, c] = min(max(np.rint(acc * scale), -127.0), 127.0)
