"""``extraction.query_pattern``: model extraction (AML.T0024.002) and black-box evasion probing
(AML.T0043) seen in the sequence of one caller's queries.

No single request of these attacks is suspicious; the sequence is. Every query of a model with
a reference (numeric features, vectors, category codes) is mapped by :mod:`detectors.
query_sketch` to normal scores calibrated on that reference, an 8-byte quantised projection and
an exact hash, and compared with the caller's own last 32 queries. Per caller (api key; client
IP per partition, DESIGN.md section 2) the detector keeps integer counts over a window of the
caller's last 129-256 queries (two blocks of 128), so a batch cut anywhere gives the same result:

- **near-duplicate probing** (AML.T0043): a query that is not a byte-identical repeat but lies
  within the model's near radius (a quarter of the 1st percentile of a natural query's distance
  to its nearest of 32 natural queries) of one of the caller's last 32. Boundary walks (Brendel
  2018) and finite-difference gradient estimation (ZOO, Chen 2017) are thousands of these.
  Fires when they are at least 40% of the window's queries (repeats included) and at least 32,
  or 48 in a row. Retries, re-scored records and test fixtures are exact repeats: counted and
  reported, never flagged.
- **off-manifold queries** (AML.T0024.002): farther from the model's reference data than 99%
  of held-out reference rows are (null rate 1%). Random and grid queries (Tramèr 2016),
  Jacobian augmentation (Papernot 2017) and natural data from another distribution (Knockoff)
  land there. Fires at 30% of the window's distinct queries and at least 24 (and a binomial
  tail below 1e-9). Repeats do not move this window: a retry loop cannot multiply one record.
- **boundary-seeking coverage** (api keys): the share of low-margin answers (below the
  reference's 5% quantile of top-1 minus top-2, in probability or logit units; label-only
  models have none) at least half the window AND the entropy of the answered classes at least
  0.5 bits above the model's prior, over at least 128 queries. Alone, neither is evidence:
  many honest callers see one class or borderline cases; together they are what adaptive
  sampling produces. (An address mixes models, so its class mix means nothing.)
- **PRADA** (Juuti 2019), reported: the caller's last 64 minimum distances (each new,
  non-repeat query to its nearest of the previous 32, uint8) tested for normality every 16th
  distance with a vectorised Shapiro-Wilk (Royston's coefficients and normalisation, as in
  scipy); its threshold is the model's null for natural query streams (99th percentile + 1.5,
  at least 4). On our benign population it flagged heavy honest callers on its own, so it only
  pages with ``prada_alone=True``; ``prada_z`` is always in the evidence.

Volume, repeats, class entropy and the queries before the crossing are reported in the evidence;
volume alone is ``abuse.rate_spike``'s job. A client IP needs twice the evidence of a key and
does not count the queries of a key flagged in the last 24 h, so a NAT address of hundreds of
honest callers with one attacker behind it raises the attacker's key, not the address; it does
alert when an attacker spreads over keys that each stay under the thresholds. Sessions are not
tracked: a session is a slice of one key's traffic, and its state would grow with churn.

State per key: a 32-query ring (8 B projection + 4 B hash each, 384 B), 64 uint8 distances,
two windows of int16 counts, counters and the open episode: 596 bytes a row. An open
episode's entity, model, sample event ids and evidence are saved beside the key's row as a
per-key blob (``Snapshot.extras``), so they move with the key's partition in a rebalance and
survive a restart. Nothing is model-level: the per-model part (normal-score maps, projection,
256 anchors, calibrated thresholds) is derived from each reference and not saved. One finding
per flagged query; one alert per caller episode, which closes an hour of event time after its
last flagged query.

A boundary walk (tiny steps around one record) is alerted as evasion probing after 32 queries;
natural records from another key raise nothing:

>>> import dataclasses
>>> from detectors.base import DetectorInput, KeySpace, entity_keys
>>> from detectors.reference_store import ReferenceStore
>>> from detectors.routing import FeatureIndex, route
>>> from schemas.batch import empty_batch
>>> def batch(keys, x, t0):
...     n, obj = len(keys), lambda v: np.full(len(keys), v, object)
...     p = 1 / (1 + np.exp(-x[:, 0]))
...     return dataclasses.replace(empty_batch(),
...         event_id=np.array([f"e{t0 + i}" for i in range(n)], object),
...         ts_ms=t0 + 1000 * np.arange(n, dtype=np.int64), model_id=obj("m"),
...         model_version=obj("1"), tenant=obj("t"), api_key_id=np.asarray(keys, object),
...         client_ip=obj(""), session_id=obj(""), status=np.full(n, 200, np.int32),
...         vector=np.zeros((n, 0)), vector_len=np.zeros(n, np.int32),
...         cat_codes=np.zeros((n, 0), np.int32), num_names=("a", "b", "c", "d"),
...         num_values=x, score_labels=("no", "yes"), scores=np.c_[1 - p, p],
...         output_label=obj(""), output_value=np.full(n, np.nan),
...         partition=np.zeros(n, np.int32))
>>> rng, index, refs = np.random.default_rng(0), FeatureIndex(), ReferenceStore()
>>> warm = batch([f"k{i % 50}" for i in range(2_000)], rng.normal(size=(2_000, 4)), 0)
>>> _ = refs.update(warm, route(warm, index))  # the model's reference: 2,000 natural queries
>>> det, ks = QueryPattern(), KeySpace()
>>> def run(b):
...     slots = {et: ks[et].lookup(entity_keys(b, et), b.ts_ms, b.partition)
...              for et in det.entity_types}
...     return det.update(DetectorInput(b, slots, ks, 0, route(b, index), refs.frozen()))
>>> run(batch(["key_app01"] * 300, rng.normal(size=(300, 4)), 5_000_000)).alerts
()
>>> walk = rng.normal(size=4) + np.cumsum(rng.normal(0, 1e-3, (300, 4)), axis=0)
>>> a = run(batch(["key_probe01"] * 300, walk, 10_000_000)).alerts[0]
>>> a.entity, a.evidence["atlas"], a.evidence["signals"], a.evidence["queries_before"]
('key_probe01', ['AML.T0043'], ['near_duplicates', 'near_duplicate_streak'], 32)
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from detectors.base import (
    EMPTY,
    F64,
    I64,
    AlertChange,
    DetectorBase,
    DetectorInput,
    Findings,
    Output,
    json_evidence,
)
from detectors.extraction_state import (
    BLOCK,
    NONE,
    Episodes,
    Table,
    entropy_bits,
    group_index,
    segmented_cummax,
    segments,
    window_counts,
)
from detectors.query_sketch import (
    DISTS,
    PROJ_DIM,
    RING,
    ModelSketch,
    Queries,
    batch_queries,
    binomial_thresholds,
    build_sketch,
    shapiro_z,
)
from detectors.reference import Reference
from detectors.registry import register

_BIG = np.iinfo(np.int32).max
ADDRESS_FACTOR = 2
EXPLAIN_MS = 86_400_000  # an address does not count a flagged key's queries for a day


def _nearest(
    cols: dict[str, npt.NDArray[Any]],
    s: I64,
    seq0: I64,
    seq: I64,
    seg0: I64,
    seg_id: I64,
    starts: I64,
    q: npt.NDArray[np.int8],
    h: npt.NDArray[np.uint32],
) -> tuple[F64, npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Each query (rows sorted by key) against its key's previous ``RING`` queries: the
    distance to the nearest that is not an exact repeat, whether one is an exact repeat, and
    whether any non-repeat exists. The stored ring holds queries ``seq0 - RING .. seq0 - 1``
    (query ``t`` at ``t % RING``); later ones are the key's earlier rows of this batch.

    One gather per row from a pool of the batch's keys' rings and the batch's queries: an
    8-byte projection is read as one int64, so exact repeats are integer compares, and squared
    distances are ``|a|^2 + |b|^2 - 2 a.b`` in float32, exact for int8 coordinates."""
    m, nseg = s.size, starts.size
    pool_q = np.concatenate(
        [cols["ring_q"][s[starts]].reshape(nseg * RING, PROJ_DIM), np.ascontiguousarray(q)]
    )
    pool_h = np.concatenate([cols["ring_h"][s[starts]].reshape(-1), h])
    t = seq[:, None] - RING + np.arange(RING)[None, :]  # predecessors' sequence numbers
    ok = t >= 0
    before = seq0[:, None]
    idx = np.where(
        t < before, seg_id[:, None] * RING + t % RING, nseg * RING + seg0[:, None] + t - before
    )
    idx[~ok] = 0
    words = pool_q.view(np.int64)[:, 0]
    got = words[idx]
    exact = ok & (got == words[nseg * RING :][:, None]) & (pool_h[idx] == h[:, None])
    other = ok & ~exact
    pool_f = pool_q.astype(np.float32)
    norms = np.einsum("ij,ij->i", pool_f, pool_f)
    qf = pool_f[nseg * RING :]
    dot = np.einsum(
        "ijk,ik->ij", got.view(np.int8).reshape(m, RING, PROJ_DIM).astype(np.float32), qf
    )
    d2 = norms[idx] + norms[nseg * RING :][:, None] - 2.0 * dot
    best = np.where(other, d2, np.float32(_BIG)).min(axis=1).astype(np.float64)
    return np.sqrt(best), exact.any(axis=1), other.any(axis=1)


@register("extraction.query_pattern")
class QueryPattern(Episodes, DetectorBase):
    atlas: ClassVar[tuple[str, ...]] = ("AML.T0024.002", "AML.T0043")
    owasp: ClassVar[tuple[str, ...]] = ("ML05", "ML01", "LLM10")
    # not sessions: a session is a slice of one key's traffic in our sources, and its state
    # would grow with session churn rather than with callers
    entity_types: ClassVar[tuple[str, ...]] = ("api_key", "client_ip")

    def __init__(
        self,
        near_share: float = 0.4,
        near_min: int = 32,
        streak: int = 48,
        off_share: float = 0.3,
        off_min: int = 24,
        low_share: float = 0.5,
        coverage_bits: float = 0.5,
        alpha: float = 1e-9,
        close_after_s: int = 3600,
        prada_alone: bool = False,
    ) -> None:
        if not (0 < near_share <= 1 and 0 < off_share <= 1 and 0 < low_share <= 1):
            raise ValueError("extraction.query_pattern: shares must be in (0, 1]")
        if min(near_min, streak, off_min, close_after_s) < 1 or not 0 < alpha < 1:
            raise ValueError(
                "extraction.query_pattern: expected near_min, streak, off_min, close_after_s "
                f">= 1 and 0 < alpha < 1; found {near_min}, {streak}, {off_min}, "
                f"{close_after_s}, {alpha}"
            )
        self.near_share, self.near_min, self.streak = near_share, near_min, streak
        self.off_share, self.off_min, self.low_share = off_share, off_min, low_share
        self.coverage_bits, self.alpha, self.close_after_s = coverage_bits, alpha, close_after_s
        self.close_ms = close_after_s * 1000
        self.prada_alone = prada_alone
        top = 2 * BLOCK
        self.thr_near = binomial_thresholds(top, 0.002, alpha, near_share, near_min)
        self.thr_off = binomial_thresholds(top, 0.01, alpha, off_share, off_min)
        self.thr_low = binomial_thresholds(top, 0.05, alpha, low_share, BLOCK // 2)
        # an address pools callers: it needs twice the evidence of a key, so a
        # caller using its own key is always flagged on the key first
        f = ADDRESS_FACTOR
        self.addr_near = binomial_thresholds(
            top, 0.002, alpha, min(1.0, f * near_share), f * near_min
        )
        self.addr_off = binomial_thresholds(top, 0.01, alpha, min(1.0, f * off_share), f * off_min)
        self._sketches: dict[tuple[str, str], tuple[Reference, ModelSketch | None]] = {}
        self.reset()

    def reset(self) -> None:
        self.tables = {et: Table() for et in self.entity_types}

    # -- per-query geometry ------------------------------------------------------------------

    def _queries(self, batch: DetectorInput) -> Queries:
        return batch_queries(batch, self._sketch)

    def _sketch(self, key: tuple[str, str], ref: Reference) -> ModelSketch | None:
        got = self._sketches.get(key)
        if got is None or got[0] is not ref:
            got = self._sketches[key] = (ref, build_sketch(ref))
        return got[1]

    # -- update ------------------------------------------------------------------------------

    def update(self, batch: DetectorInput) -> Output:
        ev = batch.events
        if ev.n == 0:
            return EMPTY
        qs = self._queries(batch)
        if not qs.ok.any():
            return EMPTY
        explained = np.zeros(ev.n, bool)  # rows an api key's own signals account for
        found: list[tuple[I64, F64, list[dict[str, Any]]]] = []
        alerts: list[AlertChange] = []
        for et in self.entity_types:
            col = ev.api_key_id if et == "api_key" else ev.client_ip
            rows = np.flatnonzero(qs.ok & (col != "") & ~explained).astype(np.int64)
            if rows.size == 0:
                continue
            table = self.tables[et]
            table.cols.ensure(batch.keyspace[et].capacity)
            flagged, score, evidence, covered = self._update_type(
                et, table, batch, qs, rows, alerts
            )
            if et == "api_key":
                explained[covered] = True
            found.append((flagged, score, evidence))
        alerts.sort(key=lambda a: (a.ts_ms, a.entity_type, a.entity, a.status == "resolved"))
        return Output(findings=self._findings(found), alerts=tuple(alerts))

    @staticmethod
    def _findings(found: list[tuple[I64, F64, list[dict[str, Any]]]]) -> tuple[Findings, ...]:
        if not found or all(f[0].size == 0 for f in found):
            return ()
        rows = np.concatenate([f[0] for f in found])
        score = np.concatenate([f[1] for f in found])
        evidence = [e for f in found for e in f[2]]
        label = np.array([e["label"] for e in evidence], dtype=object)
        return (Findings(rows, label, score, json_evidence(evidence)),)

    def _update_type(
        self,
        et: str,
        table: Table,
        batch: DetectorInput,
        qs: Queries,
        rows: I64,
        alerts: list[AlertChange],
    ) -> tuple[I64, F64, list[dict[str, Any]], I64]:
        """Flagged rows with score and evidence, and the rows inside an episode of their key
        (flagged, or within ``close_after_s`` of the key's last flagged query)."""
        cols = table.cols.cols
        slots = batch.slots[et][rows]
        order = np.argsort(slots, kind="stable")
        r, s = rows[order], slots[order]
        m = r.size
        seg0, seg_id, starts = segments(s)
        seq0 = cols["seq"][s]
        last_flag0 = cols["last_flag"][s].copy()
        seq = seq0 + np.arange(m) - seg0
        dmin, repeat, has_other = _nearest(
            cols, s, seq0, seq, seg0, seg_id, starts, qs.q[r], qs.h[r]
        )
        near = ~repeat & has_other & (dmin <= qs.near[r])
        record = ~repeat & (seq >= RING)
        dq = np.minimum(np.rint(2 * dmin), 255).astype(np.uint8)
        z_cur, n_rec = self._prada(cols, s, seg0, seg_id, starts, record, dq)
        prada_on = z_cur >= qs.prada[r]
        streak = self._streak(cols["streak"][s], seg0, near, repeat)
        # exact repeats say nothing new about the input space: they do not move the window
        fresh = ~repeat
        cum = np.cumsum(fresh)
        dseq_raw = cols["dseq"][s] + cum - np.where(seg0 > 0, cum[np.maximum(seg0 - 1, 0)], 0) - 1
        dseq = np.maximum(dseq_raw, 0)
        flags = np.zeros((m, 12), np.int16)
        flags[:, 0], flags[:, 1], flags[:, 2] = near, qs.off[r] & fresh, qs.low[r] & fresh
        flags[:, 3] = repeat
        b = np.where(fresh, qs.bucket[r], -1)
        flags[np.flatnonzero(b >= 0), 4 + b[b >= 0]] = 1
        counts, gb, total, prev = window_counts(
            flags, dseq, seg_id, cols["blk"][s], cols["cur"][s], cols["prev"][s]
        )
        n_w = np.where(dseq >= BLOCK, BLOCK, 0) + dseq % BLOCK + 1
        both = np.stack([near, repeat], axis=1).astype(np.int16)
        c_all, gb_all, total_all, prev_all = window_counts(
            both, seq, seg_id, cols["blk_all"][s], cols["cur_all"][s], cols["prev_all"][s]
        )
        counts[:, 0], counts[:, 3] = c_all[:, 0], c_all[:, 1]
        n_all = np.where(seq >= BLOCK, BLOCK, 0) + seq % BLOCK + 1
        ent = entropy_bits(counts[:, 4:])
        classified = counts[:, 4:].sum(axis=1)
        cover = (ent >= qs.h_prior[r] + self.coverage_bits) & (classified >= BLOCK)
        key = et == "api_key"
        thr_near = (self.thr_near if key else self.addr_near)[n_all]
        thr_off = (self.thr_off if key else self.addr_off)[n_w]
        ratios = np.stack(
            [
                counts[:, 0] / thr_near,
                streak / (self.streak * (1 if key else ADDRESS_FACTOR)),
                counts[:, 1] / thr_off,
                np.where(prada_on & self.prada_alone, z_cur / qs.prada[r], 0.0),
                np.where(cover & (et == "api_key"), counts[:, 2] / self.thr_low[n_w], 0.0),
            ],
            axis=1,
        )
        hit = ratios >= 1.0
        hit[:, 3] = prada_on & self.prada_alone
        flag = hit.any(axis=1)
        # new state: the last row of each key
        last = np.append(starts[1:], m) - 1
        ls = s[last]
        keep = seq >= seq[last][seg_id] - RING + 1
        cols["ring_q"][s[keep], seq[keep] % RING] = qs.q[r[keep]]
        cols["ring_h"][s[keep], seq[keep] % RING] = qs.h[r[keep]]
        cols["seq"][ls] = seq[last] + 1
        cols["streak"][ls] = streak[last]
        cols["prada_z"][ls] = z_cur[last]
        cols["dseq"][ls] = dseq_raw[last] + 1
        g_all = group_index(seq, seg_id)[last]
        cols["blk_all"][ls] = gb_all[g_all]
        cols["cur_all"][ls] = total_all[g_all]
        cols["prev_all"][ls] = prev_all[g_all]
        group_of_last = group_index(dseq, seg_id)[last]
        cols["blk"][ls] = gb[group_of_last]
        cols["cur"][ls] = total[group_of_last]
        cols["prev"][ls] = prev[group_of_last]
        cols["n_dists"][ls] = n_rec
        table.cols.mark(ls)
        ts = batch.events.ts_ms[r]
        run = np.where(flag, ts, NONE)
        head = seg0 == np.arange(m)
        run[head] = np.maximum(run[head], last_flag0[head])
        last_flag = segmented_cummax(run, seg_id)
        cols["last_flag"][ls] = last_flag[last]
        covered = r[(last_flag != NONE) & (ts <= last_flag + EXPLAIN_MS)]
        idx = np.flatnonzero(flag)
        if idx.size == 0:
            return np.zeros(0, np.int64), np.zeros(0), [], covered
        score = ratios[idx].max(axis=1)
        evidence = [
            self._evidence(i, hit[i], counts[i], int(n_w[i]), int(streak[i]), float(z_cur[i]),
                           float(ent[i]), qs, int(r[i]), int(seq[i]), int(thr_near[i]),
                           int(thr_off[i]), int(n_all[i]))
            for i in idx.tolist()
        ]  # fmt: skip
        self._episodes(et, table, batch, r[idx], s[idx], score, evidence, alerts)
        return r[idx], score, evidence, covered

    def _evidence(
        self, i: int, hit: npt.NDArray[np.bool_], c: npt.NDArray[np.int32], n_w: int,
        streak: int, z: float, ent: float, qs: Queries, row: int, seq: int, t_near: int,
        t_off: int, n_all: int,
    ) -> dict[str, Any]:  # fmt: skip
        names = ("near_duplicates", "near_duplicate_streak", "off_manifold", "prada", "boundary")
        signals = [n for n, h in zip(names, hit.tolist(), strict=True) if h]
        evasion = bool(hit[0] or hit[1])
        atlas = (["AML.T0043"] if evasion else []) + (
            ["AML.T0024.002"] if hit[2] or hit[3] or hit[4] else []
        )
        label = "near_duplicate_query" if evasion else "extraction_query"
        return {
            "label": label,
            "kind": "evasion" if evasion else "extraction",
            "signals": signals,
            "atlas": atlas,
            "window": n_w,
            "window_all": n_all,
            "near_duplicates": int(c[0]),
            "near_threshold": t_near,
            "streak": streak,
            "off_manifold": int(c[1]),
            "off_threshold": t_off,
            "low_margin": int(c[2]),
            "low_threshold": int(self.thr_low[n_w]),
            "repeats": int(c[3]),
            "class_entropy_bits": round(ent, 3),
            "prior_entropy_bits": round(float(qs.h_prior[row]), 3),
            "prada_z": round(z, 3) if np.isfinite(z) else 99.0,
            "prada_threshold": round(float(qs.prada[row]), 3),
            "queries_seen": seq + 1,
        }

    def _prada(
        self,
        cols: dict[str, npt.NDArray[Any]],
        s: I64,
        seg0: I64,
        seg_id: I64,
        starts: I64,
        record: npt.NDArray[np.bool_],
        dq: npt.NDArray[np.uint8],
    ) -> tuple[npt.NDArray[np.float32], I64]:
        """Record minimum distances, test every 16th; the latest z per row, records per key."""
        m = s.size
        n0 = cols["n_dists"][s]
        rec_cum = np.cumsum(record)
        before_seg = np.where(seg0 > 0, rec_cum[np.maximum(seg0 - 1, 0)], 0)
        rec_no = n0 + rec_cum - before_seg - 1  # this row's record number if recorded
        test = record & ((rec_no + 1) % 16 == 0) & (rec_no + 1 >= DISTS)
        rec_idx = np.flatnonzero(record)
        first_rec = np.searchsorted(seg_id[rec_idx], np.arange(starts.size))
        ti = np.flatnonzero(test)
        z_at = np.zeros(m, np.float32)
        if ti.size:
            u = rec_no[ti][:, None] - DISTS + 1 + np.arange(DISTS)[None, :]
            stored = u < n0[ti][:, None]
            k = np.clip(first_rec[seg_id[ti]][:, None] + u - n0[ti][:, None], 0, rec_idx.size - 1)
            vals = np.where(stored, cols["dists"][s[ti][:, None], u % DISTS], dq[rec_idx[k]])
            z_at[ti] = shapiro_z(vals).astype(np.float32)
        lastz = np.maximum.accumulate(np.where(test, np.arange(m), -1))
        z_cur = np.where(lastz >= seg0, z_at[np.maximum(lastz, 0)], cols["prada_z"][s])
        n_end = n0 + rec_cum - before_seg
        keep = record & (rec_no >= n_end[np.append(starts[1:], m)[seg_id] - 1] - DISTS)
        cols["dists"][s[keep], rec_no[keep] % DISTS] = dq[keep]
        last = np.append(starts[1:], m) - 1
        return z_cur.astype(np.float32), n_end[last]

    @staticmethod
    def _streak(
        streak0: npt.NDArray[np.int32], seg0: I64, near: npt.NDArray[np.bool_],
        repeat: npt.NDArray[np.bool_],
    ) -> I64:  # fmt: skip
        """Consecutive near-duplicates per key; an exact repeat neither adds nor resets."""
        m = near.size
        cum = np.cumsum(near)
        reset = ~near & ~repeat
        last_reset = np.maximum.accumulate(np.where(reset, np.arange(m), -1))
        before = np.where(seg0 > 0, cum[np.maximum(seg0 - 1, 0)], 0)
        inside = last_reset >= seg0
        out: I64 = np.where(
            inside, cum - cum[np.maximum(last_reset, 0)], streak0 + cum - before
        ).astype(np.int64)
        return out
