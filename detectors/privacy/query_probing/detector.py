"""``privacy.query_probing``: membership-inference (AML.T0024.000, OWASP ML04) and model-inversion
(AML.T0024.001, OWASP ML03) probing seen in the sequence of one api key's queries.

Design. Each query of a model with a reference is reduced
(:mod:`detectors.privacy.query_probing.state`) to an
int8 projection of its robust scores (part 1's projection, :mod:`detectors.query.sketch`), part
1's exact hash, a feature fingerprint and its answer's class probabilities, and compared with
the key's last ``RING`` (8) queries of the same model. An exact repeat **links** to the query
it repeats; any other query links to the nearest one within the model's link radius (half the
0.1% quantile of a natural query's distance to the nearest of 8 natural ones: steps far smaller
than between honest queries) and is then **near**. Links form chains, and every query carries
the **root** its chain started at (pointer jumping over the batch). A near query whose
fingerprint says that at least ``min(4, max(2, d // 3))`` of its ``d`` features moved is a
**perturbation**: noise on every feature, not a what-if edit of one or two fields or a
re-scored record. Consecutive perturbations of a key form a **run** until one has another root
and lies beyond the join radius (closer than 99% of pairs of natural queries) from the previous
one: a new record, rather than a walk whose chain broke and went on nearby. Per key:

- **perturbation clusters** (membership: Shokri 2017's candidate records, Choquette-Choo 2021's
  label-only noise robustness): runs reaching 8 perturbations, counted when that perturbation
  lies on the model's manifold (part 1's off-manifold distance, computed for perturbations
  only). Fires at 3 within the key's last 129-256 non-repeat queries (part 1's windows).
- **perturbed records** (confidence-based membership with augmentations): runs reaching 2, on
  the manifold; fires at 12 in the window. A what-if explorer of our population edits at most
  11 records, and its edits move one or two fields, so they are not perturbations.
- **confidence harvesting**: full score vectors in the key's current event-time hour at least
  ``max(256, 8 x (1 + its average hourly count before that hour))``, with at least 4 perturbed
  records in the window: volume alone is a batch-scoring job.
- **hill-climbing** (inversion: Fredrikson 2015; a BREP-MI-like walk on label-only answers,
  Kahla 2022): a run of 48 perturbations. Reported as ``hill_climbing`` when some class's
  probability rose 0.05 above the run's origin, the walk travelled 4 link radii, or the model
  answers labels only, else as ``stalled_search`` (a search around one point); both are
  AML.T0024.001: no honest caller of our population makes a run of even 20.

Exact repeats (retries, re-scored records, fixtures) link chains but are never perturbations and
do not move the window; they are counted in the evidence. Thresholds were fixed on development
seed 1 of ``load-tests/eval_privacy.py`` before its evaluation seeds were run.

Entities: api keys only. A chain needs one caller's consecutive queries: on a client IP (a NAT
of hundreds of callers, kept per partition) the ring of 8 fills with other callers' queries and
the chains break, so address state would cost as much as key state and see little. An attacker
who rotates keys every few queries is not seen here; that needs a re-keyed fingerprint stream
(docs/architecture.md). A finding for every flagged query; one alert per key episode (closed
``close_after_s`` after its last flagged query), through the keyed-episode machinery of
:mod:`detectors.episodes`, with its own title and summary.

State per key, fixed width: a ring of 8 queries (projection, exact hash, fingerprint, model,
root, root projection, root probabilities: 44 B each, 352 B), the run and its origin, window
counts, the harvesting hour and the open episode: 536 bytes.

A prober asking about records and their perturbations is alerted; its honest neighbour is not:

>>> from detectors.base import DetectorInput, KeySpace
>>> from detectors.models.reference_store import ReferenceStore
>>> from detectors.models.routing import FeatureIndex, route
>>> from streams.sim.callers import START_MS, Traffic, World
>>> from streams.sim.privacy import attack_queries, label_only_batch
>>> w, rng, tr = World(), np.random.default_rng(0), Traffic()
>>> honest = w.natural(2, rng, 3_000)
>>> tr.add(START_MS + np.arange(3_000) * 10, "key_honest", ["10.0.0.1"], 2, honest)
>>> probes = attack_queries("shadow", w, 2, rng)[:150]
>>> tr.add(START_MS + 40_000 + np.arange(150) * 300, "key_prober", ["10.0.0.2"], 2, probes)
>>> cols = tr.merged()
>>> b = label_only_batch(cols, w, 0, cols["ts"].size)
>>> store, ks, views = ReferenceStore(max_caller_share=1.0), KeySpace(), route(b, FeatureIndex())
>>> _ = store.update(b, views)
>>> slots = {"api_key": ks["api_key"].lookup(b.api_key_id, b.ts_ms, b.partition)}
>>> out = QueryProbing().update(DetectorInput(b, slots, ks, 0, views, store.frozen()))
>>> [(a.entity, a.evidence["atlas"], a.evidence["signals"]) for a in out.alerts]
[('key_prober', ['AML.T0024.000'], ['perturbation_clusters'])]
"""

from __future__ import annotations

import zlib
from functools import partial
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from detectors.base import (
    EMPTY,
    F64,
    I64,
    NONE,
    AlertChange,
    DetectorBase,
    DetectorInput,
    Findings,
    KeySpace,
    Output,
    Snapshot,
    json_evidence,
)
from detectors.episodes import Episode, EpisodeTable, KeyEpisodes
from detectors.keyed.segments import BLOCK, group_index, segmented_cummax, segments, window_counts
from detectors.models.reference import Reference
from detectors.privacy.query_probing.chains import links, runs
from detectors.privacy.query_probing.state import (
    COLUMNS,
    FLAGS,
    RING,
    Calibration,
    Geometry,
    Scaler,
    batch_geometry,
    radii,
)
from detectors.query.sketch import build_sketch

HOUR_MS = 3_600_000
MEMBERSHIP = "AML.T0024.000"
INVERSION = "AML.T0024.001"


class QueryProbing(DetectorBase):
    name: ClassVar[str] = "privacy.query_probing"
    atlas: ClassVar[tuple[str, ...]] = (MEMBERSHIP, INVERSION)
    owasp: ClassVar[tuple[str, ...]] = ("ML04", "ML03")
    entity_types: ClassVar[tuple[str, ...]] = ("api_key",)
    without_reference: ClassVar[str] = (
        "partly off: perturbation clusters, perturbed records and confidence harvesting need "
        "the reference (on the manifold); hill-climbing runs on the rows so far once 256 are in"
    )

    def __init__(
        self,
        cluster_size: int = 8,
        clusters: int = 3,
        records: int = 12,
        climb_run: int = 48,
        climb_gain: float = 0.05,
        climb_radii: float = 4.0,
        harvest_min: int = 256,
        harvest_factor: float = 8.0,
        harvest_records: int = 4,
        close_after_s: int = 3600,
    ) -> None:
        ints = (cluster_size, clusters, records, climb_run, harvest_min, harvest_records)
        if min(ints) < 1 or cluster_size < 3 or close_after_s < 1 or harvest_factor <= 0:
            raise ValueError(
                "privacy.query_probing: expected counts >= 1, cluster_size >= 3, "
                f"close_after_s >= 1 and harvest_factor > 0; found {ints}, {close_after_s}, "
                f"{harvest_factor}"
            )
        self.cluster_size, self.clusters, self.records = cluster_size, clusters, records
        self.climb_run, self.climb_gain, self.climb_radii = climb_run, climb_gain, climb_radii
        self.harvest_min, self.harvest_factor = harvest_min, harvest_factor
        self.harvest_records, self.close_after_s = harvest_records, close_after_s
        self.close_ms = close_after_s * 1000
        self._cal: dict[tuple[str, str], tuple[Reference, Calibration | None]] = {}
        self.episodes = KeyEpisodes(self.name, self.close_ms, partial(describe, cluster_size))
        self.reset()

    def reset(self) -> None:
        self.tables = {"api_key": EpisodeTable(COLUMNS)}

    # -- episodes and state: the shared keyed-episode machinery ------------------------------

    def advance(self, watermark_ms: int) -> Output:
        """Close the episodes whose last flagged query is ``close_after_s`` behind."""
        return self.episodes.advance(self.tables, watermark_ms)

    def evict(self, entity_type: str, slots: I64) -> None:
        self.episodes.evict(self.tables[entity_type], slots)

    def snapshot(self, keyspace: KeySpace) -> Snapshot:
        """Changed keyed rows and the extras of open episodes as per-key blobs."""
        return self.episodes.snapshot(self.tables, keyspace)

    def restore(self, snapshot: Snapshot, keyspace: KeySpace) -> None:
        self.episodes.restore(self.tables, snapshot, keyspace)

    def _calibration(self, key: tuple[str, str], ref: Reference) -> Calibration | None:
        got = self._cal.get(key)
        if got is None or got[0] is not ref:
            sk = build_sketch(ref)
            cal = None
            if sk is not None:
                d = len(sk.feature_names)
                tag = zlib.crc32(f"{key[0]}\x00{key[1]}".encode())
                sc = Scaler.of(sk, ref)
                cal = Calibration(sk, sc, *radii(sc, ref), min(4, max(2, d // 3)), tag)
            got = self._cal[key] = (ref, cal)
        return got[1]

    def geometry(self, batch: DetectorInput) -> Geometry:
        return batch_geometry(batch, self._calibration)

    # -- update ------------------------------------------------------------------------------

    def update(self, batch: DetectorInput) -> Output:
        ev = batch.events
        if ev.n == 0:
            return EMPTY
        g = self.geometry(batch)
        rows = np.flatnonzero(g.ok & (ev.api_key_id != "")).astype(np.int64)
        if rows.size == 0:
            return EMPTY
        table = self.tables["api_key"]
        table.cols.ensure(batch.keyspace["api_key"].capacity)
        alerts: list[AlertChange] = []
        flagged, score, evidence = self._update_keys(table, batch, g, rows, alerts)
        alerts.sort(key=lambda a: (a.ts_ms, a.entity_type, a.entity, a.status == "resolved"))
        findings: tuple[Findings, ...] = ()
        if flagged.size:
            label = np.array([e["label"] for e in evidence], dtype=object)
            findings = (Findings(flagged, label, score, json_evidence(evidence)),)
        return Output(findings=findings, alerts=tuple(alerts))

    def _update_keys(
        self, table: EpisodeTable, batch: DetectorInput, g: Geometry, rows: I64,
        alerts: list[AlertChange],
    ) -> tuple[I64, F64, list[dict[str, Any]]]:  # fmt: skip
        cols = table.cols.cols
        slots = batch.slots["api_key"][rows]
        order = np.argsort(slots, kind="stable")
        r, s = rows[order], slots[order]
        m = r.size
        seg0, seg_id, starts = segments(s)
        seq0 = cols["seq"][s]
        seq = seq0 + np.arange(m) - seg0
        ln = links(cols, g, r, s, seq, seq0, seg0, seg_id, starts)
        repeat, near, root = ln["repeat"], ln["near"], ln["root"]
        pert = near & (ln["changed"] >= g.min_changed[r])
        rs = runs(cols, s, seg_id, pert, root, ln["root_q"], ln["root_p"], ln["q"], g.join[r] ** 2)
        run, switch = rs["run"], rs["switch"]
        on = np.zeros(m, bool)
        pi = np.flatnonzero(pert)
        on[pi] = g.on_manifold(r[pi])
        flags = np.zeros((m, len(FLAGS)), np.int16)
        flags[:, 0] = pert & on & (run == self.cluster_size)
        flags[:, 1] = pert & on & (run == 2)
        flags[:, 2] = pert & on
        flags[:, 3] = near
        fresh = ~repeat
        cum = np.cumsum(fresh)
        dseq_raw = cols["dseq"][s] + cum - np.where(seg0 > 0, cum[np.maximum(seg0 - 1, 0)], 0) - 1
        dseq = np.maximum(dseq_raw, 0)
        counts, gb, total, prev = window_counts(
            flags, dseq, seg_id, cols["blk"][s], cols["cur"][s], cols["prev"][s]
        )
        n_w = np.where(dseq >= BLOCK, BLOCK, 0) + dseq % BLOCK + 1
        hv = self._harvest(cols, batch, g, r, s, seg0, seg_id)
        diff = ln["q"].astype(np.int32) - rs["origin_q"].astype(np.int32)
        disp = np.sqrt((diff * diff).sum(axis=1)) / g.radius[r]
        # the class that climbed most since the run's origin (a walk towards a rare class
        # leaves the common one on top while the rare one's probability rises)
        gain = (g.p[r].astype(np.int16) - rs["origin_p"]).max(axis=1) / 255
        climbed = g.label_only[r] | (gain >= self.climb_gain) | (disp >= self.climb_radii)
        long = pert & (run >= self.climb_run)
        vol_ok = g.scored[r] & (counts[:, 1] >= self.harvest_records)
        ratios = np.stack(
            [
                counts[:, 0] / self.clusters,
                counts[:, 1] / self.records,
                np.where(vol_ok, hv["count"] / hv["threshold"], 0.0),
                np.where(long, run / self.climb_run, 0.0),
            ],
            axis=1,
        )
        hit = ratios >= 1.0
        flag = hit.any(axis=1)
        # new state: the last row of each key
        last = np.append(starts[1:], m) - 1
        ls = s[last]
        keep = seq >= seq[last][seg_id] - RING + 1
        ks, kp = s[keep], seq[keep] % RING
        for name, val in (("ring_q", ln["q"]), ("ring_h", g.h[r]), ("ring_fp", g.fp[r]),
                          ("ring_m", g.m[r]), ("ring_root", root), ("ring_rq", ln["root_q"]),
                          ("ring_rp", ln["root_p"])):  # fmt: skip
            cols[name][ks, kp] = val[keep]
        cols["seq"][ls] = seq[last] + 1
        cols["dseq"][ls] = dseq_raw[last] + 1
        rep_cum = np.cumsum(repeat)
        cols["repeats"][ls] += rep_cum[last] - np.where(starts > 0, rep_cum[starts - 1], 0)
        pert_cum = np.cumsum(pert)
        any_pert = pert_cum[last] - np.where(starts > 0, pert_cum[starts - 1], 0) > 0
        lastp = np.maximum.accumulate(np.where(pert, np.arange(m), -1))[last]
        cols["run"][ls[any_pert]] = run[lastp[any_pert]]
        cols["last_root"][ls[any_pert]] = root[lastp[any_pert]]
        cols["last_pq"][ls[any_pert]] = ln["q"][lastp[any_pert]]
        cols["run_q"][ls[any_pert]] = rs["origin_q"][lastp[any_pert]]
        cols["run_p"][ls[any_pert]] = rs["origin_p"][lastp[any_pert]]
        gl = group_index(dseq, seg_id)[last]
        cols["blk"][ls], cols["cur"][ls], cols["prev"][ls] = gb[gl], total[gl], prev[gl]
        for name in ("hour", "hour_n", "before_n", "first_hour"):
            cols[name][ls] = hv[name][last]
        table.cols.mark(ls)
        idx = np.flatnonzero(flag)
        if idx.size == 0:
            return np.zeros(0, np.int64), np.zeros(0), []
        score = ratios[idx].max(axis=1)
        repeats0 = cols["repeats"][s] - (rep_cum[last][seg_id] - rep_cum)  # repeats up to the row
        evidence = [
            self._evidence(hit[i], counts[i], int(n_w[i]), int(run[i]), float(disp[i]),
                           float(gain[i]) if not g.label_only[r[i]] else None,
                           hv, i, int(repeats0[i]), int(seq[i]), bool(switch[i]),
                           bool(climbed[i]))
            for i in idx.tolist()
        ]  # fmt: skip
        self.episodes.extend("api_key", table, batch, r[idx], s[idx], score, evidence, alerts)
        return r[idx], score, evidence

    def _harvest(
        self, cols: dict[str, npt.NDArray[Any]], batch: DetectorInput, g: Geometry, r: I64,
        s: I64, seg0: I64, seg_id: I64,
    ) -> dict[str, npt.NDArray[Any]]:  # fmt: skip
        """Full-score answers per key and event-time hour, against the key's own average
        hourly count before that hour."""
        m = r.size
        hour0, n0, before0 = cols["hour"][s], cols["hour_n"][s], cols["before_n"][s]
        raw = np.maximum(batch.events.ts_ms[r] // HOUR_MS, np.where(hour0 == NONE, 0, hour0))
        hr = segmented_cummax(raw, seg_id)  # late events count in the key's latest hour
        sc = g.scored[r].astype(np.int64)
        cs = np.cumsum(sc)
        incl = cs - np.where(seg0 > 0, cs[np.maximum(seg0 - 1, 0)], 0)  # key's rows so far
        brk = np.ones(m, bool)
        brk[1:] = (seg_id[1:] != seg_id[:-1]) | (hr[1:] != hr[:-1])
        gstart = np.maximum.accumulate(np.where(brk, np.arange(m), 0))
        earlier = incl[gstart] - sc[gstart]  # this key's rows in the batch before this hour
        same = hr == hour0
        count = incl - earlier + np.where(same, n0, 0)
        before = before0 + np.where(same, 0, np.where(hour0 == NONE, 0, n0) + earlier)
        first = np.where(cols["first_hour"][s] == NONE, hr[seg0], cols["first_hour"][s])
        rate = before / np.maximum(hr - first, 1)
        thr = np.maximum(self.harvest_min, self.harvest_factor * (rate + 1.0))
        return {"count": count, "threshold": thr, "rate": rate, "hour": hr, "hour_n": count,
                "before_n": before, "first_hour": first}  # fmt: skip

    def _evidence(
        self, hit: npt.NDArray[np.bool_], c: npt.NDArray[np.int32], n_w: int, run: int,
        disp: float, gain: float | None, hv: dict[str, npt.NDArray[Any]], i: int, repeats: int,
        seq: int, switch: bool, climbed: bool,
    ) -> dict[str, Any]:  # fmt: skip
        names = ("perturbation_clusters", "perturbed_records", "confidence_harvesting",
                 "hill_climbing" if climbed else "stalled_search")  # fmt: skip
        signals = [n for n, h in zip(names, hit.tolist(), strict=True) if h]
        inversion = bool(hit[3])
        membership = bool(hit[0] or hit[1] or hit[2])
        return {
            "label": "inversion_probe" if inversion else "membership_probe",
            "kind": "inversion" if inversion else "membership",
            "signals": signals,
            "atlas": ([INVERSION] if inversion else []) + ([MEMBERSHIP] if membership else []),
            "owasp": (["ML03"] if inversion else []) + (["ML04"] if membership else []),
            "window": n_w,
            "perturbation_clusters": int(c[0]),
            "clusters_threshold": self.clusters,
            "cluster_size": self.cluster_size,
            "perturbed_records": int(c[1]),
            "records_threshold": self.records,
            "perturbations_on_manifold": int(c[2]),
            "near_queries": int(c[3]),
            "run": run,
            "run_threshold": self.climb_run,
            "displacement_radii": round(disp, 2),
            "confidence_gain": round(gain, 3) if gain is not None else None,
            "hour_full_scores": int(hv["count"][i]),
            "hour_threshold": round(float(hv["threshold"][i]), 1),
            "history_per_hour": round(float(hv["rate"][i]), 2),
            "exact_repeats": repeats,
            "new_root": switch,
            "queries_seen": seq + 1,
        }


def describe(cluster_size: int, et: str, ep: Episode, count: int) -> tuple[str, str]:
    """The title and summary of a privacy-probing alert (api keys only)."""
    ev = ep.evidence
    inversion = ev.get("kind") == "inversion"
    what = "model-inversion probing" if inversion else "membership-inference probing"
    shown = ep.entity if len(ep.entity) <= 12 else ep.entity[:8] + "…"
    summary = (
        f"api key {ep.entity} on {ep.model_id}: {', '.join(ev.get('signals', []))} after "
        f"{ev.get('queries_before', '?')} queries ({ev.get('perturbation_clusters', 0)} "
        f"clusters of {cluster_size}+ perturbations, {ev.get('perturbed_records', 0)} "
        f"perturbed records, longest run {ev.get('run', 0)} steps, "
        f"{ev.get('exact_repeats', 0)} exact repeats); {count} flagged queries."
    )
    return f"Privacy probing: {what} by api key {shown}", summary
