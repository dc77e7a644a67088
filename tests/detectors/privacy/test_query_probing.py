"""privacy.query_probing: each attack kind of ``streams.sim.privacy`` alerted with its ATLAS id,
honest re-queries, retries and a benign mix not; batch splitting, snapshot/restore, hostile
input; and a hypothesis property test against a deliberately naive one-object-per-key
reference (``NAIVE_REFERENCE``, also used by the shared conformance suite)."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detectors.base import KeySpace
from detectors.models.reference import Reference
from detectors.models.routing import FeatureIndex, route
from detectors.privacy.query_probing.detector import QueryProbing
from schemas.batch import EventBatch
from streams.sim.callers import START_MS, Traffic, benign
from streams.sim.privacy import ATLAS, attack_queries, inversion_queries, label_only_batch
from tests.support import conformance as cf
from tests.support import sim_fixtures
from tests.support.conformance import Runner, normalise, through_store
from tests.support.naive_query_probing import NaivePrivacyProbing, references, run
from tests.support.sim_fixtures import world

NAME = "privacy.query_probing"


def batches(tr: Traffic, size: int = 2_000) -> list[EventBatch]:
    return sim_fixtures.batches(tr, label_only_batch, size)


def firing(r: Runner) -> list[Any]:
    return [a for _, out in r.log for a in out.alerts if a.status == "firing"]


def attack_stream(kind: str, model: int, n: int, seed: int = 5) -> tuple[Traffic, str]:
    """The first ``n`` queries of an attack from one key at 3/s, 40 benign callers around it."""
    a_rng = np.random.default_rng(seed)
    if kind.startswith("inversion"):  # the first n queries of the walk, without the rest
        x = inversion_queries(world(), model, a_rng, n, kind == "inversion_seed")
    else:
        x = attack_queries(kind, world(), model, a_rng)[:n]
    return sim_fixtures.among_benign(model, x, seed)


KINDS = [
    ("shadow", 0, 250),
    ("label_only", 1, 250),
    ("confidence", 2, 250),
    ("inversion_noise", 0, 200),
    ("inversion_noise", 1, 200),
    ("inversion_seed", 2, 200),
]


@pytest.mark.parametrize(("kind", "model", "n"), KINDS)
def test_privacy_probing_alerts_each_attack_kind_with_its_atlas_id(
    kind: str, model: int, n: int
) -> None:
    tr, attacker = attack_stream(kind, model, n)
    found = firing(run(batches(tr)))
    assert {a.entity for a in found} == {attacker}
    first = found[0]
    assert first.evidence["atlas"] == [ATLAS[kind]], first.evidence
    assert first.sample_event_ids and first.evidence["signals"]
    assert first.title.startswith("Privacy probing: ")
    assert first.evidence["queries_before"] < n // 2


def test_privacy_probing_slow_attack_mixed_with_benign_queries_is_alerted() -> None:
    w, rng, tr = world(), np.random.default_rng(8), Traffic()
    x = attack_queries("shadow", w, 2, rng)[:300]
    order = rng.permutation(600)
    mix = np.concatenate([x, w.natural(2, rng, 300)])
    # the attack keeps its order; the benign queries fall between its queries at random
    slots = np.sort(order[:300])
    rows = np.empty((600, mix.shape[1]))
    rows[slots] = x
    rows[np.setdiff1d(np.arange(600), slots)] = mix[300:]
    ts = np.sort(START_MS + rng.integers(0, 86_400_000, 600))
    tr.add(ts, "key_slow", ["198.51.100.7"], 2, rows)
    assert {a.entity for a in firing(run(batches(tr)))} == {"key_slow"}


def test_privacy_probing_runs_hill_climbing_before_the_reference_exists() -> None:
    """No reference yet, only the rows so far: an inversion walk is alerted (its run of
    perturbations needs a scale), membership probing (clusters on the manifold) is not."""
    walk, climber = attack_stream("inversion_noise", 0, 200)
    members, _ = attack_stream("shadow", 0, 250, seed=6)
    members.key = [np.array(["key_member01"] * a.size, object) for a in members.key]
    for name in ("ts", "key", "ip", "session", "model", "x", "tag"):
        getattr(walk, name).extend(getattr(members, name))
    early = sim_fixtures.provisional(label_only_batch)
    found = firing(Runner(QueryProbing(), provisional=early).run(batches(walk)))
    assert {a.entity for a in found} == {climber}
    assert found[0].evidence["atlas"] == ["AML.T0024.001"]
    with_reference = {a.entity for a in firing(run(batches(walk)))}
    assert with_reference == {climber, "key_member01"}  # what the reference adds


def test_privacy_probing_benign_mix_raises_nothing() -> None:
    """Retry loops, re-queried records, what-if edits, fixtures, batch jobs, NAT addresses."""
    tr, _, _ = benign(world(), seed=4, callers=400)
    bs = batches(tr, 5_000)
    r = run(bs)
    assert not [a for _, out in r.log for a in out.alerts]
    assert not [f for _, out in r.log for f in out.findings if f.rows.size]
    early = Runner(QueryProbing(), provisional=sim_fixtures.provisional(label_only_batch)).run(bs)
    assert not [a for _, out in early.log for a in out.alerts]  # before the reference, too


def test_privacy_probing_retries_and_edited_requeries_are_not_flagged() -> None:
    """One key retrying the same 3 records 300 times, one re-querying a pool of 5 records with
    one field edited now and then, one stepping one field of a record in a what-if loop."""
    w, rng, tr = world(), np.random.default_rng(3), Traffic()
    rec = w.natural(0, rng, 3)
    tr.add(START_MS + np.arange(300) * 500, "key_retry", ["10.1.1.1"], 0, rec[np.arange(300) % 3])
    pool = w.natural(2, rng, 5)
    x = pool[rng.integers(0, 5, 400)].copy()
    edit = rng.random(400) < 0.3
    x[edit, rng.integers(0, 32, int(edit.sum()))] *= 1.05
    tr.add(START_MS + np.arange(400) * 700, "key_requery", ["10.1.1.2"], 2, x)
    base = w.natural(0, rng, 1)
    steps = np.repeat(base, 200, axis=0)
    steps[:, 0] *= 1 + 0.001 * np.arange(200)  # one field, step by step
    tr.add(START_MS + np.arange(200) * 900, "key_whatif", ["10.1.1.3"], 0, steps)
    r = run(batches(tr, 300))
    assert not [f for _, out in r.log for f in out.findings if f.rows.size]
    assert not firing(r)


@functools.cache
def mixed() -> tuple[EventBatch, ...]:
    tr, _ = attack_stream("shadow", 2, 300, seed=9)
    extra, _ = attack_stream("inversion_noise", 0, 200, seed=10)
    for name in ("ts", "key", "ip", "session", "model", "x", "tag"):
        getattr(tr, name).extend(getattr(extra, name))
    return tuple(batches(tr, 500))


def test_privacy_probing_splitting_batches_gives_the_same_result() -> None:
    whole = normalise(run(list(mixed())).log, NAME)
    assert whole.alerts and whole.findings
    rng = np.random.default_rng(1)
    halves: list[EventBatch] = []
    for b in mixed():
        halves += cf.split(b, int(rng.integers(0, b.n + 1)))
    cf.assert_same(normalise(run(halves).log, NAME), whole)


def test_privacy_probing_snapshot_restore_round_trips() -> None:
    bs = list(mixed())
    a = Runner(QueryProbing(), references=references())
    snaps, indexes, max_ts = [], [], []
    for b in bs:
        a.feed(b)
        snaps.append(through_store(a.det.snapshot(a.keyspace)))
        indexes.append(a.index.snapshot())
        max_ts.append(a.max_ts)
    for j in (1, len(bs) // 2, len(bs) - 1):
        b2 = Runner(
            QueryProbing(), keyspace=KeySpace(), references=references(), max_ts=max_ts[j - 1]
        )
        b2.index.restore(indexes[j - 1])
        for snap in snaps[:j]:
            b2.det.restore(snap, b2.keyspace)
        b2.run(bs[j:])
        cf.assert_same(normalise(b2.log, NAME), normalise(a.log[j:], NAME), f"restored at {j}")


def test_privacy_probing_survives_hostile_values() -> None:
    """NaN and infinite features, missing or partial scores, label-only answers, huge values,
    a key on two models: no crash, and findings only for rows of the batch."""
    bs = list(mixed())[:3]
    rng = np.random.default_rng(0)
    out = []
    for b in bs:
        num, vec, sc = b.num_values.copy(), b.vector.copy(), b.scores.copy()
        num[rng.random(num.shape) < 0.05] = np.nan
        vec[rng.random(vec.shape) < 0.02] = np.inf
        num[rng.random(num.shape) < 0.01] = 1e308
        sc[rng.random(sc.shape) < 0.3] = np.nan
        sc[rng.random(sc.shape) < 0.01] = -np.inf
        key = b.api_key_id.copy()
        key[::7] = "key_attacker01"  # one key on two models
        out.append(dataclasses.replace(b, num_values=num, vector=vec, scores=sc, api_key_id=key))
    r = run(out)
    for b, o in r.log:
        for f in o.findings:
            assert f.rows.size == 0 or (f.rows.min() >= 0 and f.rows.max() < b.n)
    r.det.update(r.inputs(bs[0].take(np.zeros(0, np.int64))))


def test_privacy_probing_state_is_bounded_per_key() -> None:
    assert QueryProbing().tables["api_key"].cols.dtype.itemsize <= 600


# --- the naive reference: one plain object per key, one event at a time ----------------------


# small thresholds, so that the short hypothesis streams reach every signal
SMALL = {"cluster_size": 3, "clusters": 2, "records": 2, "climb_run": 6, "harvest_min": 4,
         "harvest_factor": 1.5, "harvest_records": 1}  # fmt: skip


@functools.cache
def small_references() -> dict[tuple[str, str], Reference]:
    return cf.references()


CALIBRATIONS: dict[Any, Any] = {}


@st.composite
def probe_streams(draw: st.DrawFn) -> tuple[list[EventBatch], int]:
    """Keys that ask natural points, repeat earlier queries exactly, perturb or step away from
    earlier ones (all features or one), across models, hours apart or not, cut anywhere."""
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(1, 120))
    ops = draw(st.lists(st.sampled_from("nrppwe1"), min_size=n, max_size=n))
    rng = np.random.default_rng(seed)
    keys = rng.choice(["ka", "kb", "kc"], n)
    x = np.zeros((n, 4))
    last: dict[str, np.ndarray] = {}
    for i, (op, k) in enumerate(zip(ops, keys.tolist(), strict=True)):
        prev = last.get(k)
        if op == "n" or prev is None:
            x[i] = rng.normal(0, 1, 4)
        elif op == "r":
            x[i] = prev
        elif op == "p":
            x[i] = prev + rng.normal(0, 0.01, 4)
        elif op == "w":
            x[i] = prev + 0.02
        elif op == "1":
            x[i] = prev
            x[i, 0] += 0.01
        else:
            x[i, :2] = np.nan
        last[k] = x[i]
    gaps = rng.choice([0, 1_000, 3_600_000], n, p=[0.5, 0.4, 0.1])
    ts = cf.T0_MS + np.cumsum(gaps) - rng.integers(0, 2, n) * 500
    p1 = 1 / (1 + np.exp(-x[:, 0]))
    scores = np.stack([1 - p1, p1], axis=1)
    scores[rng.random(n) < 0.1] = np.nan
    model = rng.choice(["m0", "m1"], n, p=[0.8, 0.2])
    whole = cf.make_batch(ts.tolist(), keys.tolist(), model_id=model.tolist(), features=x,
                          scores=scores)  # fmt: skip
    cuts = sorted(set(draw(st.lists(st.integers(0, n), max_size=5))) | {0, n})
    return [whole.take(np.arange(a, b)) for a, b in itertools.pairwise(cuts)], seed


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(probe_streams())
def test_privacy_probing_matches_the_naive_reference(spec: tuple[list[EventBatch], int]) -> None:
    bs, _ = spec
    r = Runner(QueryProbing(**SMALL), references=small_references())
    naive = NaivePrivacyProbing(**SMALL)
    naive.references = small_references()
    # the per-model calibration depends only on the references: build it once for all examples
    r.det._cal = naive.det._cal = CALIBRATIONS  # type: ignore[attr-defined]
    for b in bs:
        r.feed(b)
        naive.update(b)
    got, want = normalise(r.log, NAME).findings, naive.normal().findings
    assert got == want, (sorted(got - want)[:5], sorted(want - got)[:5])


def test_privacy_probing_naive_reference_sees_signals() -> None:
    """The property test above compares something: on a longer probing stream both sides
    flag queries of both kinds."""
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [r + rng.normal(0, 0.01, (6, 4)) for r in rng.normal(0, 1, (5, 4))]
        + [rng.normal(0, 1, (1, 4)) + 0.02 * np.arange(10)[:, None]]
    )
    half = np.full((len(x), 2), 0.5)
    ts = (cf.T0_MS + np.arange(len(x)) * 1000).tolist()
    b = cf.make_batch(ts, ["ka"] * len(x), features=x, scores=half)
    r = Runner(QueryProbing(**SMALL), references=small_references()).run([b])
    naive = NaivePrivacyProbing(**SMALL)
    naive.references = small_references()
    naive.update(b)
    got = normalise(r.log, NAME)
    assert got.findings == naive.normal().findings
    assert {label for _, label, _ in got.findings} == {"membership_probe", "inversion_probe"}


def test_privacy_probing_harvesting_needs_volume_and_perturbed_records() -> None:
    """With the cluster and record signals out of reach, a confidence prober is still alerted
    for harvesting full score vectors above its own history; a batch-scoring job of the same
    volume, with no perturbations, is not."""
    det = QueryProbing(clusters=10_000, records=10_000)
    tr, attacker = attack_stream("confidence", 0, 600)
    w, rng = world(), np.random.default_rng(2)
    tr.add(START_MS + 60_000 + np.arange(2_000) * 50, "key_batch", ["10.9.9.9"], 0,
           w.natural(0, rng, 2_000))  # fmt: skip
    found = firing(run(batches(tr), det))
    assert {a.entity for a in found} == {attacker}
    assert found[0].evidence["signals"] == ["confidence_harvesting"]
    assert found[0].evidence["hour_full_scores"] >= found[0].evidence["hour_threshold"]


def test_privacy_probing_scales_a_reference_with_a_column_no_row_has() -> None:
    # found by the fuzzer: a feature the index knows from other events, empty in every row
    from detectors.models.reference_store import ReferenceStore
    from detectors.privacy.query_probing.state import Scaler
    from detectors.query.sketch import build_sketch

    n = 300
    rng = np.random.default_rng(3)
    b = cf.make_batch(
        list(range(n)), [f"k{i % 40}" for i in range(n)], features=rng.normal(size=(n, 3))
    )
    (ref,) = ReferenceStore(n_events=n).update(b, route(b, FeatureIndex()))
    sample = np.array(ref.sample_features)
    sample[:, 1] = np.nan
    ref = dataclasses.replace(ref, sample_features=sample)
    sk = build_sketch(ref)
    assert sk is not None
    sc = Scaler.of(sk, ref)
    assert (sc.centre[1], sc.inv_scale[1]) == (0.0, 1.0)
