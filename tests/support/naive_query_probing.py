"""The naive one-object-per-key reference of ``privacy.query_probing`` for the conformance suite
and its own tests.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from detectors.base import DetectorInput, KeySpace
from detectors.keyed.segments import BLOCK
from detectors.models.reference import Reference
from detectors.models.routing import FeatureIndex, route
from detectors.privacy.query_probing.detector import HOUR_MS, QueryProbing
from detectors.privacy.query_probing.state import RING, changed_features
from schemas.batch import EventBatch
from streams.sim.privacy import label_only_batch
from tests.support import sim_fixtures
from tests.support.conformance import Normal, Runner


def references() -> dict[tuple[str, str], Reference]:
    return sim_fixtures.references(label_only_batch)


def run(bs: list[EventBatch], det: QueryProbing | None = None) -> Runner:
    return Runner(det or QueryProbing(), references=references()).run(bs)


class NaivePrivacyProbing:
    """Deliberately naive: a dict of per-key objects and a loop over events. It shares the
    per-query geometry (projection, hashes, fingerprint, probabilities, radii, manifold test)
    with the detector and re-derives per key, one event at a time: the ring and its links,
    chains and roots, runs and their origins, windows, the hourly volume, the decisions.
    Findings only; episodes are checked through the detector's own tests."""

    def __init__(self, **params: Any) -> None:
        self.det = QueryProbing(**params)  # thresholds and per-query geometry only
        self.keys: dict[str, dict[str, Any]] = {}
        self.findings: set[tuple[str, str, float]] = set()
        self.index = FeatureIndex()
        self.references: dict[tuple[str, str], Reference] = {}

    def update(self, batch: EventBatch) -> None:
        if batch.n == 0:
            return
        inp = DetectorInput(batch, {}, KeySpace(), 0, route(batch, self.index), self.references)
        g = self.det.geometry(inp)
        for i in range(batch.n):
            if g.ok[i] and batch.api_key_id[i]:
                self._event(str(batch.api_key_id[i]), batch, g, i)

    def _event(self, key: str, batch: EventBatch, g: Any, i: int) -> None:
        d = self.det
        st = self.keys.setdefault(key, {
            "ring": deque(maxlen=RING), "seq": 0, "dseq": 0, "last_root": -1,
            "last_pq": np.zeros(8), "run": 0, "run_q": np.zeros(8), "run_p": np.zeros(8),
            "blocks": {}, "hour": None, "hour_n": 0, "before": 0, "first": None,
        })  # fmt: skip
        q, p = g.q[i].astype(np.int64), g.p[i].astype(np.int64)
        best: tuple[float, int] | None = None
        for k, e in enumerate(st["ring"]):  # oldest first
            if e["m"] != g.m[i]:
                continue
            d2 = float(((e["q"] - q) ** 2).sum())
            if d2 > g.radius[i] ** 2:
                continue
            exact = d2 == 0 and e["h"] == g.h[i] and e["fp"] == g.fp[i]
            cand = (0.0 if exact else 1.0 + d2, k)
            best = cand if best is None or cand < best else best
        repeat = best is not None and best[0] == 0.0
        near = best is not None and not repeat
        if best is None:
            root, root_q, root_p = st["seq"], q, p
        else:
            e = st["ring"][best[1]]
            root, root_q, root_p = e["root"], e["rq"], e["rp"]
        pert = (
            near
            and int(changed_features(np.array([g.fp[i]]), np.array([e["fp"]]))[0])
            >= (g.min_changed[i])
        )
        on = pert and bool(g.on_manifold(np.array([i]))[0])
        run = 0
        if pert:
            far = float(((st["last_pq"] - q) ** 2).sum()) > g.join[i] ** 2
            if root != st["last_root"] and (far or st["last_root"] < 0):
                st["run"], st["run_q"], st["run_p"] = 1, root_q, root_p
            else:
                st["run"] += 1
            st["last_root"], st["last_pq"], run = root, q, st["run"]
        if not repeat:
            st["dseq"] += 1
        w = max(st["dseq"] - 1, 0) // BLOCK
        flags = np.array([pert and on and run == d.cluster_size, pert and on and run == 2,
                          pert and on, near], np.int64)  # fmt: skip
        st["blocks"][w] = st["blocks"].get(w, np.zeros(4, np.int64)) + flags
        c = st["blocks"][w] + st["blocks"].get(w - 1, np.zeros(4, np.int64))
        st["blocks"] = {b: v for b, v in st["blocks"].items() if b >= w - 1}
        hour = int(batch.ts_ms[i]) // HOUR_MS
        if st["hour"] is not None:
            hour = max(hour, st["hour"])
        if st["first"] is None:
            st["first"] = hour
        if hour != st["hour"]:
            st["before"] += st["hour_n"]
            st["hour"], st["hour_n"] = hour, 0
        st["hour_n"] += int(g.scored[i])
        rate = st["before"] / max(hour - st["first"], 1)
        thr = max(d.harvest_min, d.harvest_factor * (rate + 1.0))
        harvest = g.scored[i] and c[1] >= d.harvest_records
        ratios = [c[0] / d.clusters, c[1] / d.records, st["hour_n"] / thr if harvest else 0.0,
                  run / d.climb_run if pert and run >= d.climb_run else 0.0]  # fmt: skip
        st["ring"].append({"q": q, "h": g.h[i], "fp": g.fp[i], "m": g.m[i], "root": root,
                           "rq": root_q, "rp": root_p})  # fmt: skip
        st["seq"] += 1
        if max(ratios) >= 1.0:
            label = "inversion_probe" if ratios[3] >= 1.0 else "membership_probe"
            self.findings.add((str(batch.event_id[i]), label, round(max(ratios), 6)))

    def advance(self, watermark_ms: int) -> None:
        return None

    def normal(self) -> Normal:
        return Normal(frozenset(self.findings), {}, frozenset())


NAIVE_REFERENCE = NaivePrivacyProbing
