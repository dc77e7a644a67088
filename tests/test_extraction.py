"""extraction.query_pattern: behaviour through the public interface on small simulated worlds
(one attack per generator family is alerted, a benign mix is not), the conformance properties
on a stream with attacks (splitting, snapshot/restore, empty batch), the vectorised Shapiro-Wilk
against scipy, and the naive one-object-per-key reference (``NAIVE_REFERENCE``)."""

from __future__ import annotations

import dataclasses
import functools
from collections import deque
from typing import Any

import numpy as np
import pytest
import sim_fixtures
from conformance import Normal, Runner, normalise, through_store
from scipy import stats
from sim_fixtures import world

from detectors.base import KeySpace, Snapshot
from detectors.extraction import EXPLAIN_MS, QueryPattern
from detectors.extraction_state import BLOCK
from detectors.kernels import LANES, LANES_FIXED, NO_LANES
from detectors.query_sketch import DISTS, RING, shapiro_z
from detectors.reference import Reference
from detectors.routing import FeatureIndex, route
from schemas.batch import EventBatch
from streams.sim_attacks import attack_queries
from streams.sim_callers import START_MS, Traffic, benign, to_batch

NAME = "extraction.query_pattern"


def references() -> dict[tuple[str, str], Reference]:
    return sim_fixtures.references(to_batch)


def batches(tr: Traffic, size: int = 2_000) -> list[EventBatch]:
    return sim_fixtures.batches(tr, to_batch, size)


def run(bs: list[EventBatch], det: QueryPattern | None = None) -> Runner:
    return Runner(det or QueryPattern(), references=references()).run(bs)


def alerted(r: Runner, entity_type: str = "api_key") -> set[str]:
    return {
        a.entity
        for _, out in r.log
        for a in out.alerts
        if a.status == "firing" and a.entity_type == entity_type
    }


def attack_stream(kind: str, model: int, n: int, seed: int = 5) -> tuple[Traffic, str]:
    """``n`` attack queries from one key at 3/s, with 40 benign callers around it."""
    x = attack_queries(kind, world(), model, np.random.default_rng(seed), n)
    return sim_fixtures.among_benign(model, x, seed)


FAMILIES = [
    ("random", 0, 400),
    ("grid", 0, 600),
    ("jacobian", 2, 800),
    ("knockoff", 2, 600),
    ("boundary", 0, 600),
    ("zoo", 2, 600),
]


@pytest.mark.parametrize(("kind", "model", "n"), FAMILIES)
def test_extraction_alerts_an_attack_of_each_family_and_no_benign_caller(
    kind: str, model: int, n: int
) -> None:
    tr, attacker = attack_stream(kind, model, n)
    r = run(batches(tr))
    assert alerted(r) == {attacker}
    assert not alerted(r, "client_ip"), "a key-flagged attacker must not raise its address"
    found = [a for _, out in r.log for a in out.alerts if a.entity == attacker]
    ev = found[0].evidence
    assert found[0].sample_event_ids and ev["signals"] and ev["atlas"]
    assert ev["queries_before"] < n // 2


def test_extraction_slow_attack_mixed_with_benign_queries_is_alerted() -> None:
    w, rng, tr = world(), np.random.default_rng(8), Traffic()
    x = attack_queries("zoo", w, 0, rng, 400)
    ts = np.sort(START_MS + rng.integers(0, 86_400_000, 800))
    mix = np.concatenate([x, w.natural(0, rng, 400)])[rng.permutation(800)]
    tr.add(ts, "key_slow", ["198.51.100.7"], 0, mix)
    assert alerted(run(batches(tr))) == {"key_slow"}


def test_extraction_slow_grid_mixed_with_benign_queries_is_alerted_as_a_lattice() -> None:
    """A lattice over three features of one record, mixed 1:1 with natural queries of the same
    key, among 40 benign callers, a what-if explorer (11 records, 10 edits of one or two fields
    each) and a regression-fixture caller (300 records, one in ten at the range's edges, four
    runs): only the grid's key is alerted, on its lattice."""
    w, rng = world(), np.random.default_rng(12)
    grid = attack_queries("grid", w, 0, rng, 300)
    mix = np.concatenate([grid, w.natural(0, rng, 300)])[rng.permutation(600)]
    tr, attacker = sim_fixtures.among_benign(0, mix, 12)
    base = w.natural(0, rng, 11)
    edits = np.repeat(base, 10, axis=0)
    cols = rng.integers(0, 16, (110, 2))
    edits[np.arange(110)[:, None], cols] *= 1.0 + np.tile(np.arange(10), 11)[:, None] * 0.1
    tr.add(START_MS + np.arange(110) * 20_000, "key_whatif01", ["192.0.2.4"], 0, edits)
    fx = w.natural(0, rng, 300)
    edge = rng.random(300) < 0.1
    fx[edge] = np.where(rng.random((int(edge.sum()), 16)) < 0.5, w.lo[0], w.hi[0])
    for run_ms in (0, 600_000, 1_200_000, 1_800_000):
        tr.add(START_MS + run_ms + np.arange(300) * 200, "key_fixture01", ["10.1.2.3"], 0, fx)
    r = run(batches(tr))
    assert alerted(r) == {attacker}
    ev = next(a for _, out in r.log for a in out.alerts if a.entity == attacker).evidence
    assert "lattice" in ev["signals"] and ev["atlas"] == ["AML.T0024.002"]
    assert ev["lattice_score"] >= ev["lattice_threshold"] and ev["lattice_queries"] > 0
    assert ev["queries_before"] < 150  # of the key's 600: the grid's first 60-odd queries


def test_extraction_runs_its_scale_signals_before_the_reference_exists() -> None:
    """No reference yet, only the rows so far: a boundary walk is alerted on its
    near-duplicates; random queries (off-manifold only) and benign callers are not."""
    tr, walker = attack_stream("boundary", 0, 600)
    randoms, _ = attack_stream("random", 0, 400, seed=6)
    randoms.key = [np.array(["key_random01"] * a.size, object) for a in randoms.key]
    for name in ("ts", "key", "ip", "session", "model", "x", "tag"):
        getattr(tr, name).extend(getattr(randoms, name))
    early = sim_fixtures.provisional(to_batch)
    assert {k for k, ref in early.items() if not ref.complete} == set(early) and early
    r = Runner(QueryPattern(), provisional=early).run(batches(tr))
    assert alerted(r) == {walker}
    ev = next(a for _, out in r.log for a in out.alerts if a.entity == walker).evidence
    assert set(ev["signals"]) <= {"near_duplicates", "near_duplicate_streak", "lattice"}
    assert Runner(QueryPattern()).run(batches(tr)).log and not alerted(
        Runner(QueryPattern()).run(batches(tr))
    )  # without the rows so far nothing runs at all: the test above is not vacuous


def test_extraction_benign_mix_raises_nothing() -> None:
    """Retry loops, re-queried records, what-if edits, fixtures, NAT addresses, batch jobs.
    (Seed 3 of this size holds a retry caller whose records sit at the edge of the model's
    data, and its key is flagged off-manifold: the limit the evaluation reports.)"""
    tr, _, _ = benign(world(), seed=4, callers=400)
    bs = batches(tr, 5_000)
    r = run(bs)
    assert not [a for _, out in r.log for a in out.alerts]
    early = Runner(QueryPattern(), provisional=sim_fixtures.provisional(to_batch)).run(bs)
    assert not [a for _, out in early.log for a in out.alerts]  # before the reference, too


@functools.cache
def mixed() -> tuple[EventBatch, ...]:
    tr, _ = attack_stream("boundary", 0, 500, seed=9)
    extra, _ = attack_stream("random", 2, 300, seed=10)
    grid, _ = attack_stream("grid", 2, 200, seed=11)
    grid.key = [
        np.array([k.replace("key_", "key_g") for k in a.tolist()], object) for a in grid.key
    ]
    for more in (extra, grid):
        for name in ("ts", "key", "ip", "session", "model", "x", "tag"):
            getattr(tr, name).extend(getattr(more, name))
    return tuple(batches(tr, 700))


def test_extraction_splitting_batches_gives_the_same_result() -> None:
    whole = normalise(run(list(mixed())).log, NAME)
    assert whole.alerts and whole.findings
    rng = np.random.default_rng(1)
    halves: list[EventBatch] = []
    for b in mixed():
        at = int(rng.integers(0, b.n + 1))
        halves += [b.take(np.arange(at)), b.take(np.arange(at, b.n))]
    assert normalise(run(halves).log, NAME) == whole


def test_extraction_snapshot_restore_round_trips() -> None:
    bs = list(mixed())
    a = Runner(QueryPattern(), references=references())
    snaps, indexes, max_ts = [], [], []
    for b in bs:
        a.feed(b)
        snaps.append(through_store(a.det.snapshot(a.keyspace)))
        indexes.append(a.index.snapshot())
        max_ts.append(a.max_ts)
    for j in (1, len(bs) // 2, len(bs) - 1):
        b2 = Runner(
            QueryPattern(), keyspace=KeySpace(), references=references(), max_ts=max_ts[j - 1]
        )
        b2.index.restore(indexes[j - 1])
        for snap in snaps[:j]:
            b2.det.restore(snap, b2.keyspace)
        b2.run(bs[j:])
        assert normalise(b2.log, NAME) == normalise(a.log[j:], NAME), f"restored at {j}"


def test_extraction_open_episode_moves_with_its_key() -> None:
    """Only the attacker's own saved rows (its keyed row and its episode blob, as a worker
    assigned the key's partition loads them) continue its open episode: same alerts, with their
    samples and evidence, and nothing is saved as model-level state."""
    bs, attacker = list(mixed()), "key_attacker01"
    a = Runner(QueryPattern(), references=references())
    snaps = []
    for b in bs:
        a.feed(b)
        snaps.append(through_store(a.det.snapshot(a.keyspace)))
        assert snaps[-1].model is None
        slot = a.keyspace["api_key"].slot_of(attacker)
        if slot is not None and slot in a.det.tables["api_key"].episodes:
            break
    else:
        pytest.fail("the attacker never opened an episode")
    j = len(snaps) - 1
    assert any(et == "api_key" and k == attacker and blob for s in snaps
               for et, k, _, blob in s.extras)  # fmt: skip
    b2 = Runner(QueryPattern(), keyspace=KeySpace(), references=references(), max_ts=a.max_ts)
    for snap in snaps:
        mine = [r for r in snap.keyed if r.entity_type == "api_key"]
        keyed = tuple(
            dataclasses.replace(r, keys=tuple(np.array(r.keys, object)[sel].tolist()),
                                partition=r.partition[sel], data=r.data[sel])
            for r in mine
            for sel in [np.array([k == attacker for k in r.keys], bool)]
        )  # fmt: skip
        extras = tuple(x for x in snap.extras if x[:2] == ("api_key", attacker))
        b2.det.restore(Snapshot(keyed=keyed, extras=extras), b2.keyspace)
    rest = [b.take(np.flatnonzero(b.api_key_id == attacker)) for b in bs[j + 1 :]]
    a.run(bs[j + 1 :])
    b2.run(rest)

    def own(log: list[tuple[EventBatch, Any]]) -> dict[Any, Any]:
        alerts = normalise(log, NAME).alerts
        return {k: v for k, v in alerts.items() if k[2:4] == ("api_key", attacker)}

    want = own(a.log[j + 1 :])
    assert want and own(b2.log) == want
    assert all(v[5] for v in want.values()), "sample event ids come back with the episode"


def test_extraction_answers_without_scores_are_judged_without_a_crash() -> None:
    """A batch whose answers carry none of the reference's score labels (label-only answers
    from a model whose reference had scores): the labels read as missing, the geometry counts."""
    tr, key = attack_stream("boundary", 0, 400)
    bare = [dataclasses.replace(b, score_labels=(), scores=np.zeros((b.n, 0))) for b in batches(tr)]
    assert key in alerted(run(bare))


def test_extraction_empty_batch_is_a_no_op() -> None:
    r = run(list(mixed())[:3])
    empty = mixed()[0].take(np.zeros(0, np.int64))
    out = r.det.update(r.inputs(empty))
    assert not out.findings and not out.alerts


def test_extraction_shapiro_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(size=DISTS), rng.exponential(size=DISTS), rng.uniform(size=DISTS)])
    want = [stats.norm.isf(stats.shapiro(row).pvalue) for row in x]
    assert np.allclose(shapiro_z(x), want, atol=1e-4)


def test_extraction_state_is_bounded_per_key() -> None:
    det = QueryPattern()
    assert det.tables["api_key"].cols.dtype.itemsize <= 1024


# --- the naive reference: one plain object per key, one event at a time ----------------------


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


def test_extraction_findings_match_the_naive_reference() -> None:
    rng = np.random.default_rng(2)
    cut: list[EventBatch] = []
    for b in mixed():
        at = int(rng.integers(0, b.n + 1))
        cut += [b.take(np.arange(at)), b.take(np.arange(at, b.n))]
    naive = NaiveQueryPattern()
    naive.references = references()
    for b in cut:
        naive.update(b)
    got = normalise(run(cut).log, NAME)
    assert got.findings and got.findings == naive.normal().findings
