"""The conformance checks every registered detector must pass.

Parametrized over ``detectors.registry.names()``: a detector that cannot be imported breaks
collection, loudly. A keyed detector (one with entity types) must come with a deliberately naive
one-object-per-key reference: ``NAIVE_REFERENCE`` (and optionally ``NAIVE_PARAMS``) in
the test module ``NAIVE_MODULES`` names for it, a class with ``update(batch)``,
``advance(watermark_ms)`` and ``normal() -> conformance.Normal``.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import pickle
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detectors import registry
from detectors.base import Detector, KeySpace, entity_keys
from detectors.models.routing import FeatureIndex
from schemas.batch import EventBatch, empty_batch
from tests.support import conformance as cf

NAMES = registry.names()
SEED = 7


@functools.cache
def batches() -> tuple[EventBatch, ...]:
    return tuple(cf.stream(SEED))


@functools.cache
def references() -> dict[tuple[str, str], Any]:
    return cf.references()


def runner(name: str, **kw: Any) -> cf.Runner:
    return cf.Runner(registry.create(name), references=references(), **kw)


@functools.cache
def uninterrupted(name: str) -> cf.Normal:
    return cf.normalise(runner(name).run(batches()).log, name)


@pytest.mark.parametrize("name", NAMES)
def test_registry_creates_every_detector_with_no_arguments(name: str) -> None:
    det = registry.create(name)
    assert isinstance(det, Detector)
    assert det.name == name and det.version
    assert all(isinstance(x, str) for x in (*det.atlas, *det.owasp, *det.entity_types))


@pytest.mark.parametrize("name", NAMES)
def test_clone_is_a_fresh_detector_with_equal_parameters(name: str) -> None:
    used = runner(name).run(batches()[:10]).det
    clone = used.clone()
    assert type(clone) is type(used) and clone is not used
    assert repr(clone) == repr(used)
    assert cf.normalise(cf.Runner(clone, references=references()).run(batches()).log, name) == (
        uninterrupted(name)
    )


@pytest.mark.parametrize("name", NAMES)
def test_splitting_batches_gives_the_same_result(name: str) -> None:
    rng = np.random.default_rng(1)
    halves: list[EventBatch] = []
    for b in batches():
        halves.extend(cf.split(b, int(rng.integers(0, b.n + 1))))
    assert cf.normalise(runner(name).run(halves).log, name) == (uninterrupted(name))


@pytest.mark.parametrize("name", NAMES)
def test_merging_batches_gives_the_same_result(name: str) -> None:
    all_ = batches()
    merged = [cf.concat(all_[i : i + 5]) for i in range(0, len(all_), 5)]
    assert cf.normalise(runner(name).run(merged).log, name) == (uninterrupted(name))


@pytest.mark.parametrize("name", NAMES)
def test_snapshot_restore_round_trips(name: str) -> None:
    all_ = batches()
    a = runner(name)
    snaps, indexes, max_ts = [], [], []
    for b in all_:
        a.feed(b)
        snaps.append(cf.through_store(a.det.snapshot(a.keyspace)))
        indexes.append(a.index.snapshot())
        max_ts.append(a.max_ts)
    for j in (1, len(all_) // 3, len(all_) // 2, len(all_) - 2):
        b = runner(name, keyspace=KeySpace(), max_ts=max_ts[j - 1])
        b.index = FeatureIndex()
        b.index.restore(indexes[j - 1])
        for snap in snaps[:j]:
            b.det.restore(snap, b.keyspace)
        b.run(all_[j:])
        cf.assert_same(cf.normalise(b.log, name), cf.normalise(a.log[j:], name), f"restored at {j}")


@pytest.mark.parametrize("name", NAMES)
def test_update_does_not_mutate_its_input(name: str) -> None:
    r = runner(name)
    for b in batches()[:12]:
        inp = r.inputs(b)
        before = cf.digest(inp.events, dict(inp.slots), dict(inp.views))
        r.det.update(inp)
        r.det.advance(int(b.ts_ms.max()))
        assert cf.digest(inp.events, dict(inp.slots), dict(inp.views)) == before


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch_is_a_no_op(name: str) -> None:
    r = runner(name).run(batches()[:12])
    r.det.snapshot(r.keyspace)  # take what was dirty
    state = pickle.dumps(r.det)
    empty = empty_batch()
    out = r.det.update(r.inputs(empty))
    assert cf.normalise([(empty, out)], name).empty()
    assert all(f.rows.size == 0 for f in out.findings) and not out.alerts and not out.metrics
    assert pickle.dumps(r.det) == state
    snap = r.det.snapshot(r.keyspace)
    assert all(len(rows.keys) == 0 for rows in snap.keyed) and snap.model is None


@pytest.mark.parametrize("name", NAMES)
def test_state_is_bounded_by_the_keys(name: str) -> None:
    long = cf.stream(SEED, minutes=80, attack_minute=None)
    r = runner(name)
    sizes, saved, width = [], {}, {}
    for i, b in enumerate(long):
        r.feed(b)
        for rows in r.det.snapshot(r.keyspace).keyed:
            saved.setdefault(rows.entity_type, set()).update(rows.keys)
            # a row's width never changes: state per key is O(1) in events seen
            assert width.setdefault(rows.entity_type, rows.data.itemsize) == rows.data.itemsize
        if i in (len(long) // 4, len(long) - 1):
            sizes.append(len(pickle.dumps(r.det)))
    seen = cf.concat(long)
    for et, keys in saved.items():
        assert len(keys) <= len(set(entity_keys(seen, et).tolist()))
    assert sizes[1] <= 1.25 * sizes[0] + 32_768, f"state grew with events: {sizes}"


# the module that holds each keyed detector's one-object-per-key reference, by registry name
NAIVE_MODULES = {
    "abuse.rate_spike": "tests.support.naive_rate_spike",
    "extraction.query_pattern": "tests.support.naive_query_pattern",
    "privacy.query_probing": "tests.support.naive_query_probing",
}


def naive_reference(name: str) -> tuple[Any, dict[str, Any]]:
    if name not in NAIVE_MODULES:
        raise AssertionError(f"keyed detector {name} needs a naive reference in NAIVE_MODULES")
    module = NAIVE_MODULES[name]
    tests = importlib.import_module(module)
    if not hasattr(tests, "NAIVE_REFERENCE"):
        raise AssertionError(
            f"keyed detector {name}: {module} must define NAIVE_REFERENCE, a "
            "one-object-per-key reference with update(batch), advance(ms) and normal()"
        )
    return tests.NAIVE_REFERENCE, dict(getattr(tests, "NAIVE_PARAMS", {}))


Event = tuple[int, str, str]  # (ms after the stream's start, api key, client IP)


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[Event], list[int]]:
    """Few keys and IPs, bursts, gaps long and short, a little disorder, random batch cuts;
    plain values, so that a failing example reads well."""
    n = draw(st.integers(1, 160))
    gaps = st.one_of(
        st.just(0), st.integers(0, 1_500), st.integers(0, 25_000), st.integers(0, 400_000)
    )
    t, events = draw(st.integers(0, 59_999)), []
    for _ in range(n):
        t += draw(gaps)
        late = draw(st.sampled_from([0, 0, 0, 0, 1, 7_000, 12_000]))
        events.append((t - late, draw(st.sampled_from("abcdefg")), draw(st.sampled_from(IPS))))
    cuts = sorted(set(draw(st.lists(st.integers(0, n), max_size=6))) | {0, n})
    return events, cuts


IPS = ("", "1.1.1.1", "2.2.2.2")


def to_batches(events: list[Event], cuts: list[int]) -> list[EventBatch]:
    ts, keys, ips = zip(*events, strict=True)
    whole = cf.make_batch(
        [cf.T0_MS + t for t in ts],
        list(keys),
        client_ip=list(ips),
        partition=[int(k in "dg") for k in keys],
        tenant=list(keys),
    )
    return [whole.take(np.arange(a, b)) for a, b in itertools.pairwise(cuts)]


@pytest.mark.parametrize("name", NAMES)
def test_keyed_detector_matches_its_naive_reference(name: str) -> None:
    if not registry.create(name).entity_types:
        pytest.skip(f"{name} keeps no per-key state: no naive per-key reference to compare")
    reference, params = naive_reference(name)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(streams())
    def check(spec: tuple[list[Event], list[int]]) -> None:
        r = cf.Runner(registry.create(name, **params))
        naive = reference(**params)
        for b in to_batches(*spec):
            r.feed(b)
            naive.update(b)
            naive.advance(r.watermark)
        cf.assert_same(cf.normalise(r.log, name), naive.normal())

    check()
