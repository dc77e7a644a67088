"""The naive one-object-per-key reference of ``extraction.query_pattern`` for the conformance suite
and its own tests.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from detectors.base import KeySpace
from detectors.extraction.query_pattern.detector import EXPLAIN_MS, QueryPattern
from detectors.extraction.query_pattern.state import BLOCK
from detectors.models.reference import Reference
from detectors.models.routing import FeatureIndex, route
from detectors.query.kernels import LANES, LANES_FIXED, NO_LANES
from detectors.query.sketch import DISTS, RING, shapiro_z
from schemas.batch import EventBatch
from tests.support.conformance import Normal


class NaiveQueryPattern:
    """Deliberately naive: a dict of per-key objects and a loop over events. It shares the
    per-query geometry (projection, hash, per-query flags) with the detector and re-derives
    per key, one event at a time: ring, exact repeats, near-duplicates, streak, distances and
    normality tests, windows, decisions, and which queries an address may count. Findings
    only; episodes are checked through the detector's own tests."""

    def __init__(self, **params: Any) -> None:
        self.det = QueryPattern(**params)  # thresholds and per-query geometry only
        self.keys: dict[tuple[str, str], dict[str, Any]] = {}
        self.findings: set[tuple[str, str, float]] = set()
        self.index = FeatureIndex()
        self.references: dict[tuple[str, str], Reference] = {}

    def update(self, batch: EventBatch) -> None:
        from detectors.base import DetectorInput

        if batch.n == 0:
            return
        inp = DetectorInput(batch, {}, KeySpace(), 0, route(batch, self.index), self.references)
        qs = self.det._queries(inp)
        for i in range(batch.n):
            if not qs.ok[i]:
                continue
            explained = False
            for et, col in (("api_key", batch.api_key_id), ("client_ip", batch.client_ip)):
                name = str(col[i])
                if not name or (et != "api_key" and explained):
                    continue
                key = name if et == "api_key" else f"{int(batch.partition[i])}|{name}"
                covered = self._event(et, key, batch, qs, i)
                explained = explained or (et == "api_key" and covered)

    def _event(self, et: str, key: str, batch: EventBatch, qs: Any, i: int) -> bool:
        d = self.det
        st = self.keys.setdefault((et, key), {
            "ring": deque(maxlen=RING), "dists": deque(maxlen=DISTS), "n_dists": 0, "seq": 0,
            "dseq": 0, "z": np.float32(0.0), "streak": 0, "blocks": {}, "last_flag": None,
            "all": {}, "base": 0, "lat": 0,
        })  # fmt: skip
        q, h = qs.q[i].astype(np.int64), int(qs.h[i])
        d2 = [int(((q - cq.astype(np.int64)) ** 2).sum()) for cq, _ in st["ring"]]
        exact = [dd == 0 and ch == h for dd, (_, ch) in zip(d2, st["ring"], strict=True)]
        repeat = any(exact)
        others = [dd for dd, e in zip(d2, exact, strict=True) if not e]
        dmin = float(np.sqrt(min(others))) if others else float("inf")
        near = not repeat and bool(others) and dmin <= qs.near[i]
        if not repeat and st["seq"] >= RING:
            st["dists"].append(min(255, int(np.rint(2 * dmin))))
            st["n_dists"] += 1
            if st["n_dists"] % 16 == 0 and st["n_dists"] >= DISTS:
                st["z"] = np.float32(shapiro_z(np.array([list(st["dists"])]))[0])
        st["streak"] = st["streak"] + 1 if near else (st["streak"] if repeat else 0)
        if not repeat:
            st["dseq"] += 1
        dseq = max(st["dseq"] - 1, 0)
        is_key = et == "api_key"
        lanes, lat = int(qs.lanes[i]), False
        if not repeat and lanes != NO_LANES:
            same = sum((lanes >> 4 * k) & 15 == (st["base"] >> 4 * k) & 15 for k in range(LANES))
            lat = same >= LANES_FIXED
            cap = 2 * d.lattice * (1 if is_key else 2)
            if lat:
                st["lat"] = min(st["lat"] + 3, cap)
            elif st["lat"] > 0:
                st["lat"] -= 1
            else:
                st["base"] = lanes
        flags = np.zeros(13, np.int64)
        flags[0], flags[3] = near, repeat
        if not repeat:
            flags[1], flags[2], flags[12] = qs.off[i], qs.low[i], lat
            if qs.bucket[i] >= 0:
                flags[4 + qs.bucket[i]] = 1
        blk = dseq // BLOCK
        st["blocks"][blk] = st["blocks"].get(blk, np.zeros(13, np.int64)) + flags
        c = st["blocks"][blk] + st["blocks"].get(blk - 1, np.zeros(13, np.int64))
        st["blocks"] = {b: v for b, v in st["blocks"].items() if b >= blk - 1}
        n_w = (BLOCK if dseq >= BLOCK else 0) + dseq % BLOCK + 1
        seq = st["seq"]  # near-duplicates and repeats: a share of all queries
        ab = seq // BLOCK
        st["all"][ab] = st["all"].get(ab, 0) + int(near)
        c[0] = st["all"][ab] + st["all"].get(ab - 1, 0)
        st["all"] = {b: v for b, v in st["all"].items() if b >= ab - 1}
        n_all = (BLOCK if seq >= BLOCK else 0) + seq % BLOCK + 1
        t_near = (d.thr_near if is_key else d.addr_near)[n_all]
        t_off = (d.thr_off if is_key else d.addr_off)[n_w]
        p = c[4:12] / max(c[4:12].sum(), 1)
        ent = float(-sum(x * np.log2(x) for x in p if x > 0))
        cover = ent >= qs.h_prior[i] + d.coverage_bits and c[4:12].sum() >= BLOCK and is_key
        ratios = [c[0] / t_near, st["streak"] / (d.streak * (1 if is_key else 2)),
                  c[1] / t_off, 0.0, c[2] / d.thr_low[n_w] if cover else 0.0,
                  st["lat"] / (d.lattice * (1 if is_key else 2)) if lat else 0.0]  # fmt: skip
        hit = [r >= 1.0 for r in ratios]
        hit[3] = False
        ts = int(batch.ts_ms[i])
        st["seq"] += 1
        st["ring"].append((qs.q[i], h))
        if any(hit):
            label = "near_duplicate_query" if hit[0] or hit[1] else "extraction_query"
            self.findings.add((str(batch.event_id[i]), label, round(max(ratios), 6)))
            st["last_flag"] = ts if st["last_flag"] is None else max(st["last_flag"], ts)
        return st["last_flag"] is not None and ts <= st["last_flag"] + EXPLAIN_MS

    def advance(self, watermark_ms: int) -> None:
        return None

    def normal(self) -> Normal:
        return Normal(frozenset(self.findings), {}, frozenset())


NAIVE_REFERENCE = NaiveQueryPattern
