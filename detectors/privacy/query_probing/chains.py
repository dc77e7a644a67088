"""Links, chains and runs of ``privacy.query_probing`` (see
:mod:`detectors.privacy.query_probing.detector`):
for rows sorted by key, each query's link to one of its key's previous ``RING`` queries, the
root of its chain, and the runs of perturbations, all keys of a batch at once."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from detectors.base import F64, I64
from detectors.privacy.query_probing.state import RING, Geometry, changed_features


def links(
    cols: dict[str, npt.NDArray[Any]], g: Geometry, r: I64, s: I64, seq: I64, seq0: I64,
    seg0: I64, seg_id: I64, starts: I64,
) -> dict[str, npt.NDArray[Any]]:  # fmt: skip
    """Each row's link to one of its key's previous ``RING`` queries and the root of its chain.

    Pool: the ring entries of the batch's keys, then the batch rows (sorted by key). A query
    ``t`` of a key is ring entry ``t % RING`` when it came before the batch, else its row. The
    distances are dense (m x RING); everything after them runs on the few pairs within the link
    radius."""
    m, nseg = r.size, starts.size
    base = nseg * RING
    own = s[starts]
    q = g.q[r]
    pool_q = np.concatenate([cols["ring_q"][own].reshape(base, -1), q])
    t = seq[:, None] - RING + np.arange(RING)[None, :]
    rel = t - seq0[:, None]
    idx = np.where(rel < 0, seg_id[:, None] * RING + (t & (RING - 1)), base + seg0[:, None] + rel)
    idx[t < 0] = 0
    pool_f = pool_q.astype(np.float32)
    d2 = np.zeros((m, RING), np.float32)
    for c in range(pool_f.shape[1]):  # one coordinate at a time: no (m, RING, 8) temporary
        dk = pool_f[:, c][idx] - pool_f[base:, c : c + 1]
        d2 += dk * dk
    d2[t < 0] = np.inf
    # d2 is a whole number (int8 coordinates), exact in float32; the squared radius is not:
    # rounded to float32 it can reach the whole number just beyond it and link a query outside
    # the radius. Within means d2 <= radius ** 2, i.e. d2 <= its floor.
    r2 = np.floor(g.radius[r] ** 2).astype(np.float32)
    fi = np.flatnonzero(d2 <= r2[:, None])
    row, k = fi // RING, fi % RING
    pidx = idx.ravel()[fi]
    pool_m = np.concatenate([cols["ring_m"][own].reshape(-1), g.m[r]])
    same = pool_m[pidx] == g.m[r][row]
    row, k, pidx, dd = row[same], k[same], pidx[same], d2.ravel()[fi[same]]
    pool_h = np.concatenate([cols["ring_h"][own].reshape(-1), g.h[r]])
    pool_fp = np.concatenate([cols["ring_fp"][own].reshape(-1), g.fp[r]])
    exact = (dd == 0) & (pool_h[pidx] == g.h[r][row]) & (pool_fp[pidx] == g.fp[r][row])
    # the oldest exact match, else the nearest other query (the oldest among equals)
    key = np.where(exact, 0.0, 1.0 + dd.astype(np.float64)) * (2 * RING) + k
    best = np.full(m, np.inf)
    np.minimum.at(best, row, key)
    linked = np.isfinite(best)
    repeat = linked & (best < 2 * RING)
    near = linked & ~repeat
    bk = np.where(linked, best, 0).astype(np.int64) % (2 * RING)
    parent = idx[np.arange(m), bk]
    changed = np.zeros(m, np.int64)
    changed[near] = changed_features(g.fp[r][near], pool_fp[parent[near]])
    par = np.arange(base + m)
    li = np.flatnonzero(linked)
    par[base + li] = parent[li]
    while li.size:  # pointer jumping: every row's chain to a ring entry or an unlinked row
        nxt = par[par]
        if np.array_equal(nxt, par):
            break
        par = nxt
    term = par[base:]
    pool_root = np.concatenate([cols["ring_root"][own].reshape(-1), seq])
    pool_rq = np.concatenate([cols["ring_rq"][own].reshape(base, -1), q])
    pool_rp = np.concatenate([cols["ring_rp"][own].reshape(base, -1), g.p[r]])
    return {"repeat": repeat, "near": near, "changed": changed, "root": pool_root[term],
            "root_q": pool_rq[term], "root_p": pool_rp[term], "q": q}  # fmt: skip


def runs(
    cols: dict[str, npt.NDArray[Any]], s: I64, seg_id: I64, pert: npt.NDArray[np.bool_],
    root: I64, root_q: npt.NDArray[np.int8], root_p: npt.NDArray[np.uint8], q: npt.NDArray[np.int8],
    join2: F64,
) -> dict[str, npt.NDArray[Any]]:  # fmt: skip
    """Per perturbation: perturbations in its run, whether it starts a run, and the run's
    origin (projection and probabilities of the root it started at). A run ends when a
    perturbation has another root than the previous perturbation and lies farther than the
    join radius from it: a new record, not a walk whose chain broke and resumed nearby."""
    m = pert.size
    run = np.zeros(m, np.int64)
    switch = np.zeros(m, bool)
    oq, op = root_q.copy(), root_p.copy()
    p = np.flatnonzero(pert)
    if p.size == 0:
        return {"run": run, "switch": switch, "origin_q": oq, "origin_p": op}
    sp = s[p]
    ps = seg_id[p]
    first = np.ones(p.size, bool)
    first[1:] = ps[1:] != ps[:-1]
    prev_root = np.where(first, cols["last_root"][sp], np.roll(root[p], 1))
    prev_q = np.where(first[:, None], cols["last_pq"][sp], np.roll(q[p], 1, axis=0))
    d = prev_q.astype(np.int32) - q[p].astype(np.int32)
    far = (d * d).sum(axis=1) > join2[p]
    sw = (root[p] != prev_root) & (far | (cols["last_root"][sp] < 0) & first)
    c = np.arange(p.size)
    seg_start = np.maximum.accumulate(np.where(first, c, 0))
    last_sw = np.maximum.accumulate(np.where(sw, c, -1))
    inside = last_sw >= seg_start
    run[p] = np.where(inside, c - last_sw + 1, cols["run"][sp] + c - seg_start + 1)
    src = p[np.maximum(last_sw, 0)]
    oq[p] = np.where(inside[:, None], root_q[src], cols["run_q"][sp])
    op[p] = np.where(inside[:, None], root_p[src], cols["run_p"][sp])
    switch[p] = sw
    return {"run": run, "switch": switch, "origin_q": oq, "origin_p": op}
