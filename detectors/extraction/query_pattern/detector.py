"""``extraction.query_pattern``: model extraction (AML.T0024.002) and black-box evasion probing
(AML.T0043) seen in the sequence of one caller's queries.

No single request of these attacks is suspicious; the sequence is. Every query of a model with
a reference (numeric features, vectors, category codes) is mapped by :mod:`detectors.
query_sketch` to normal scores calibrated on that reference, an 8-byte quantised projection and
an exact hash, and compared with the caller's own last 32 queries. Per caller (api key; client
IP per partition, docs/architecture.md) the detector keeps integer counts over a window of the
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
- **lattice probing** (AML.T0024.002): grid queries (Tramèr 2016) sweep a few features over
  evenly spaced values while every other feature stays at one base record; most of them are
  on the manifold, so the off-manifold share misses a slow grid mixed with natural queries.
  Each query's raw values are hashed into 8 lanes of 4 bits (feature ``j`` in lane ``j % 8``),
  and a key keeps one base lane hash and a score: +3 for a fresh query that keeps at least 5
  of the base's 8 lanes (at most three changed values: every point of a lattice over three
  features of the base does), -1 for one that does not, and a new base when a query misses
  at score 0. Fires at 96, e.g. 48 lattice points mixed 1:1 with natural queries; capped at
  twice that, so a finished lattice is forgotten and the next one found. Two unrelated natural
  queries share 5 lanes with probability 3e-5 to 1.5e-4 (the fraud model's counts and flags
  repeat). On the benign population (dev seed 1) the highest score is a what-if explorer's 27
  (one record and its 10 edits of one or two fields); re-queried records reach 15 (each edit
  is of a pool record, the next one off it); fixtures and retries are exact repeats and do
  not move the score. An honest caller who edits one record 50 times is, by behaviour, a
  lattice, and is flagged. Models with fewer than 8 features have no lattice signal.
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

The per-query geometry and the per-caller pass are compiled loops (:mod:`detectors.query.kernels`):
a
caller's signals depend on the order of its own queries, which a loop over the batch follows
directly. State per key: a 32-query ring (8 B projection + 4 B hash each, 384 B), 64 uint8
distances, two windows of int16 counts, counters, the lattice base and score (6 B) and the open
episode: 606 bytes a row. An open
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
>>> from detectors.models.reference_store import ReferenceStore
>>> from detectors.models.routing import FeatureIndex, route
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
    KeySpace,
    Output,
    Snapshot,
    json_evidence,
)
from detectors.episodes import EpisodeTable, KeyEpisodes
from detectors.extraction.query_pattern.state import (
    BLOCK,
    COLUMNS,
    LATTICE,
    CallerParams,
    caller_rows,
    describe,
)
from detectors.models.reference import Reference
from detectors.query.kernels import LANES, LANES_FIXED
from detectors.query.sketch import (
    ModelSketch,
    Queries,
    batch_queries,
    binomial_thresholds,
    build_sketch,
)

ADDRESS_FACTOR = 2
EXPLAIN_MS = 86_400_000  # an address does not count a flagged key's queries for a day


class QueryPattern(DetectorBase):
    name: ClassVar[str] = "extraction.query_pattern"
    atlas: ClassVar[tuple[str, ...]] = ("AML.T0024.002", "AML.T0043")
    owasp: ClassVar[tuple[str, ...]] = ("ML05", "ML01", "LLM10")
    # not sessions: a session is a slice of one key's traffic in our sources, and its state
    # would grow with session churn rather than with callers
    entity_types: ClassVar[tuple[str, ...]] = ("api_key", "client_ip")
    without_reference: ClassVar[str] = (
        "partly off: off-manifold queries, boundary coverage and PRADA need the reference; "
        "near-duplicate probing, lattice probing and exact repeats run on the rows so far "
        "once 256 are in"
    )

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
        lattice: int = 96,
    ) -> None:
        if not (0 < near_share <= 1 and 0 < off_share <= 1 and 0 < low_share <= 1):
            raise ValueError("extraction.query_pattern: shares must be in (0, 1]")
        if min(near_min, streak, off_min, close_after_s) < 1 or not 0 < alpha < 1:
            raise ValueError(
                "extraction.query_pattern: expected near_min, streak, off_min, close_after_s "
                f">= 1 and 0 < alpha < 1; found {near_min}, {streak}, {off_min}, "
                f"{close_after_s}, {alpha}"
            )
        if not 1 <= lattice <= 8_000:
            raise ValueError(
                f"extraction.query_pattern: expected 1 <= lattice <= 8000; found {lattice}"
            )
        self.near_share, self.near_min, self.streak = near_share, near_min, streak
        self.off_share, self.off_min, self.low_share = off_share, off_min, low_share
        self.coverage_bits, self.alpha, self.close_after_s = coverage_bits, alpha, close_after_s
        self.close_ms = close_after_s * 1000
        self.prada_alone, self.lattice = prada_alone, lattice
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
        self.params = {
            "api_key": CallerParams(
                self.thr_near, self.thr_off, self.thr_low, streak, coverage_bits, prada_alone,
                True, EXPLAIN_MS, lattice,
            ),
            "client_ip": CallerParams(
                self.addr_near, self.addr_off, self.thr_low, f * streak, coverage_bits,
                prada_alone, False, EXPLAIN_MS, f * lattice,
            ),
        }  # fmt: skip
        self._sketches: dict[tuple[str, str], tuple[Reference, ModelSketch | None]] = {}
        self.episodes = KeyEpisodes(self.name, self.close_ms, describe)
        self.reset()

    def reset(self) -> None:
        self.tables = {et: EpisodeTable(COLUMNS) for et in self.entity_types}

    # -- episodes and state: the shared keyed-episode machinery ------------------------------

    def advance(self, watermark_ms: int) -> Output:
        """Close the episodes whose last flagged query is ``close_after_s`` behind."""
        return self.episodes.advance(self.tables, watermark_ms)

    def evict(self, entity_type: str, slots: I64) -> None:
        self.episodes.evict(self.tables[entity_type], slots)

    def snapshot(self, keyspace: KeySpace) -> Snapshot:
        """Changed keyed rows and the extras of open episodes as per-key blobs. Nothing is
        model-level: the per-model geometry is derived from the references."""
        return self.episodes.snapshot(self.tables, keyspace)

    def restore(self, snapshot: Snapshot, keyspace: KeySpace) -> None:
        self.episodes.restore(self.tables, snapshot, keyspace)

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
        table: EpisodeTable,
        batch: DetectorInput,
        qs: Queries,
        rows: I64,
        alerts: list[AlertChange],
    ) -> tuple[I64, F64, list[dict[str, Any]], I64]:
        """Flagged rows with score and evidence, and the rows inside an episode of their key
        (flagged, or within a day of the key's last flagged query)."""
        slots = batch.slots[et][rows]
        got = caller_rows(
            table.cols.cols, table.cols.dirty, slots, rows, qs, batch.events.ts_ms[rows],
            self.params[et],
        )  # fmt: skip
        covered = rows[got.covered]
        idx = np.flatnonzero(got.flag)
        if idx.size == 0:
            return np.zeros(0, np.int64), np.zeros(0), [], covered
        idx = idx[np.argsort(slots[idx], kind="stable")]  # episodes take each key's rows together
        score = got.ratios[idx].max(axis=1)
        p = self.params[et]
        evidence = [
            self._evidence(got.hit[i], got.counts[i], int(got.n_w[i]), int(got.streak[i]),
                           float(got.z[i]), float(got.ent[i]), qs, int(rows[i]), int(got.seq[i]),
                           int(p.thr_near[got.n_all[i]]), int(p.thr_off[got.n_w[i]]),
                           int(got.n_all[i]), int(got.lat[i]), p.lattice)
            for i in idx.tolist()
        ]  # fmt: skip
        self.episodes.extend(et, table, batch, rows[idx], slots[idx], score, evidence, alerts)
        return rows[idx], score, evidence, covered

    def _evidence(
        self, hit: npt.NDArray[np.bool_], c: npt.NDArray[np.int32], n_w: int,
        streak: int, z: float, ent: float, qs: Queries, row: int, seq: int, t_near: int,
        t_off: int, n_all: int, lat: int, t_lat: int,
    ) -> dict[str, Any]:  # fmt: skip
        names = ("near_duplicates", "near_duplicate_streak", "off_manifold", "prada", "boundary",
                 "lattice")  # fmt: skip
        signals = [n for n, h in zip(names, hit.tolist(), strict=True) if h]
        evasion = bool(hit[0] or hit[1])
        atlas = (["AML.T0043"] if evasion else []) + (
            ["AML.T0024.002"] if hit[2] or hit[3] or hit[4] or hit[5] else []
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
            "lattice_queries": int(c[LATTICE]),
            "lattice_score": lat,
            "lattice_threshold": t_lat,
            "lattice_lanes_fixed": f">= {LANES_FIXED} of {LANES}",
            "queries_seen": seq + 1,
        }
