"""The reference store: freezing, the per-caller cap, score types, bytes, determinism."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detectors.models.channels import MAX_CLASS_CHANNELS
from detectors.models.reference import Reference, npz_bytes, npz_load
from detectors.models.reference_store import ReferenceStore
from detectors.models.routing import FeatureIndex, route
from schemas.batch import EventBatch
from tests.support import conformance as cf
from tests.support.batches import events, two_class


def feed(
    store: ReferenceStore, batches: Sequence[EventBatch], index: FeatureIndex | None = None
) -> list[Reference]:
    index = index or FeatureIndex()
    out: list[Reference] = []
    for b in batches:
        out.extend(store.update(b, route(b, index)))
    return out


def cut(batch: EventBatch, sizes: int) -> list[EventBatch]:
    return [batch.take(np.arange(a, min(a + sizes, batch.n))) for a in range(0, batch.n, sizes)]


KEYS_50 = [f"k{i}" for i in range(50)]


def test_reference_freezes_after_n_accepted_events() -> None:
    rng = np.random.default_rng(1)
    n = 1_200
    whole = events(
        np.arange(n) * 100,
        [f"k{i % 40}" for i in range(n)],
        scores=two_class(rng.random(n)),
        features=rng.normal(size=(n, 2)),
    )
    store = ReferenceStore(n_events=500)
    index = FeatureIndex()
    frozen_in = [len(feed(store, [b], index)) for b in cut(whole, 97)]
    assert frozen_in == [0] * 5 + [1] + [0] * (len(frozen_in) - 6)  # the 500th event: batch 6
    ref = store.get("m0", "")
    assert ref is not None and ref.complete
    assert (ref.n_events, ref.events_seen, ref.callers) == (500, 500, 40)
    assert (ref.first_ts_ms, ref.last_ts_ms) == (0, 499 * 100)
    assert ref.channels == ("score",) and ref.channel_columns == ("1",)
    assert ref.channel_counts.sum() == 500 and ref.sample_features.shape == (500, 2)
    assert ref.sample_features.dtype == np.float32
    assert [c.sum() for c in ref.feature_counts] == [500, 500]
    assert ref.channel_edges.shape == (1, 9) and list(store.frozen()) == [("m0", "")]


def test_reference_resists_an_early_flooding_caller() -> None:
    rng = np.random.default_rng(2)
    n = 5_000
    flood = rng.random(n) < 0.5  # one caller sends half of the first 5,000 events
    honest_p = rng.beta(2, 5, n)
    p = np.where(flood, rng.beta(9, 1, n), honest_p)
    f0 = np.where(flood, rng.normal(10, 1, n), rng.normal(0, 1, n))
    callers = np.where(flood, "attacker", np.char.add("k", (np.arange(n) % 300).astype(str)))
    whole = events(
        cf.T0_MS + np.arange(n) * 10,
        callers.tolist(),
        scores=two_class(p),
        features=np.column_stack([f0, rng.normal(size=n)]),
    )

    def reference(share: float) -> Reference:
        store = ReferenceStore(max_caller_share=share)
        (ref,) = feed(store, cut(whole, 512))
        return ref

    ref = reference(0.05)
    store = ReferenceStore()
    cap = store.cap(ref.callers)  # 301 callers: 1/sqrt(301) of 2,000
    share = cap / 2_000
    assert ref.complete and ref.n_events == 2_000 and cap == 115
    assert ref.max_caller_events <= cap and ref.capped_callers == ("attacker",)
    assert (ref.sample_features[:, 0] > 5).sum() <= cap
    # A share c of other events can move the reference's q-quantile only to between the
    # honest quantiles at (q - c) / (1 - c) and q / (1 - c); 0.02 allows for sampling.
    q = np.array([0.1, 0.5, 0.9])
    honest = honest_p[~flood]
    low = np.quantile(honest, (q - share) / (1 - share)) - 0.02
    high = np.quantile(honest, q / (1 - share)) + 0.02
    ref_q = np.quantile(ref.sample_channels[:, 0], q)
    assert np.all((low <= ref_q) & (ref_q <= high)), (low, ref_q, high)
    # without the cap the same stream poisons the reference: the check above is not vacuous
    poisoned = np.quantile(reference(1.0).sample_channels[:, 0], q)
    assert np.abs(poisoned - np.quantile(honest, q)).max() > 0.2


def interleaved(rng: np.random.Generator, shares: Sequence[float], n: int) -> list[str]:
    """``n`` calls from callers k0, k1, ... drawn independently with the given shares."""
    who = rng.choice(len(shares), n, p=np.asarray(shares) / np.sum(shares))
    return [f"k{i}" for i in who.tolist()]


@pytest.mark.parametrize("callers", [1, 3, 6, 20, 200])
def test_reference_of_a_model_with_few_callers_freezes_after_n_events(callers: int) -> None:
    rng = np.random.default_rng(callers)
    n = 2_500
    who = interleaved(rng, [1.0] * callers, n)
    whole = events(np.arange(n), who, features=np.arange(n, dtype=float)[:, None])
    store = ReferenceStore()
    (ref,) = feed(store, cut(whole, 300))
    assert (ref.n_events, ref.events_seen, ref.complete) == (2_000, 2_000, True)
    assert ref.callers == len(set(who[:2_000])) and ref.capped_callers == ()
    assert ref.sample_features[:, 0].tolist() == list(range(2_000))  # every event it saw
    assert store.building() == {}


def test_reference_flooding_caller_among_slow_ones_waits_and_never_dominates() -> None:
    rng = np.random.default_rng(8)
    n = 40_000
    who = interleaved(rng, [0.96, 0.02, 0.02], n)  # k0 floods; k1, k2 are slow honest callers
    whole = events(np.arange(n), who, features=np.arange(n, dtype=float)[:, None])
    store = ReferenceStore()
    parts = cut(whole, 1_000)
    assert feed(store, parts[:10]) == []  # 10,000 seen: the old seen limit gave way here
    (state,) = store.building().values()
    assert (state.callers, state.allowed_share, state.capped[0][0]) == (3, 0.5, "k0")
    assert state.n < 2_000 and "k0 sent 96% of the 10,000 events" in state.reason
    (ref,) = feed(store, parts[10:])
    kept = ref.sample_features[:, 0].astype(int)
    from_k0 = np.array([who[i] == "k0" for i in kept.tolist()])
    assert ref.n_events == 2_000 and from_k0.sum() == 1_000 == ref.max_caller_events
    assert ref.capped_callers == ("k0",)
    # the others' events are all in it, and k0's 1,000 are spread over all it sent
    assert (~from_k0).sum() == ref.events_seen - sum(1 for w in who[: ref.events_seen] if w == "k0")
    k0_idx = kept[from_k0]
    assert k0_idx.min() < 0.05 * ref.events_seen and k0_idx.max() > 0.95 * ref.events_seen


def test_reference_early_flood_is_trimmed_when_other_callers_arrive() -> None:
    # a caller floods 1,500 events before anyone else; then it and 21 others share traffic
    rng = np.random.default_rng(9)
    who = ["flood"] * 1_500 + interleaved(rng, [1.0] * 21, 6_000)
    n = len(who)
    whole = events(np.arange(n), who, features=np.arange(n, dtype=float)[:, None])
    store = ReferenceStore()
    (ref,) = feed(store, cut(whole, 700))
    assert ref.callers == 22 and ref.max_caller_events <= store.cap(22) == 426
    kept = ref.sample_features[:, 0].astype(int)
    assert (kept < 1_500).sum() <= 426  # the launch flood is at most its capped share


CLASSES = ("cat", "dog", "eel")


@pytest.mark.parametrize(
    ("kwargs", "score_type", "positive", "channels"),
    [
        ({"scores": two_class(np.linspace(0.01, 0.99, 50))}, "probability", "1", ("score",)),
        (
            {"scores": np.tile([0.2, 0.5, 0.3], (50, 1)), "score_labels": CLASSES},
            "probability",
            "",
            ("score:cat", "score:dog", "score:eel", "label"),
        ),
        (
            {"scores": np.linspace(0.05, 0.95, 50)[:, None], "score_labels": ("fraud",)},
            "probability",
            "",
            ("score",),
        ),
        (
            {"scores": np.column_stack([np.linspace(-3, 2, 50), np.zeros(50)])},
            "logit",
            "",
            ("score:0", "score:1", "label"),
        ),
        (  # in [0, 1], but rows sum to 1.3
            {"scores": np.tile([0.7, 0.6], (50, 1))},
            "logit",
            "",
            ("score:0", "score:1", "label"),
        ),
        ({"labels": ["spam", "ham"] * 25}, "label_only", "", ("label",)),
        ({"values": np.linspace(10, 20, 50)}, "regression", "", ("score",)),
    ],
)
def test_reference_infers_the_score_type_and_its_channels(
    kwargs: dict[str, Any], score_type: str, positive: str, channels: tuple[str, ...]
) -> None:
    store = ReferenceStore(n_events=50)
    (ref,) = feed(store, [events(np.arange(50), KEYS_50, **kwargs)])
    assert (ref.score_type, ref.positive_label, ref.channels) == (score_type, positive, channels)
    assert ref.channel_counts.sum(axis=1).tolist() == [50] * len(channels)
    assert ref.sample_channels.shape == (50, len(channels))


def naive_channel_counts(values: list[float], edges: list[float]) -> list[int]:
    """Row at a time: bin i is (edges[i-1], edges[i]]."""
    counts = [0] * (len(edges) + 1)
    for v in values:
        counts[sum(1 for e in edges if e < v)] += 1
    return counts


def test_reference_multi_class_has_a_channel_per_class_and_the_predicted_label() -> None:
    rng = np.random.default_rng(6)
    n = 600
    p = rng.dirichlet([3.0, 2.0, 1.0], n)
    p[:50, 2] = np.nan  # the "eel" score is missing from some events
    (ref,) = feed(
        ReferenceStore(n_events=n, max_caller_share=1.0),
        [events(np.arange(n), KEYS_50 * 12, scores=p, score_labels=CLASSES)],
    )
    assert ref.channels == ("score:cat", "score:dog", "score:eel", "label")
    assert ref.channel_columns == (*CLASSES, "") and ref.channel_categories == CLASSES
    for j in range(3):
        col = p[:, j][~np.isnan(p[:, j])]
        edges = ref.channel_edges[j].tolist()
        assert edges == np.quantile(col, np.linspace(0, 1, 11)[1:-1]).tolist()
        assert ref.channel_counts[j].tolist() == naive_channel_counts(col.tolist(), edges)
        assert ref.channel_range[j].tolist() == [col.min(), col.max()]
    predicted = [max(range(3), key=lambda k: -1.0 if np.isnan(r[k]) else r[k]) for r in p]
    label_counts = ref.channel_counts[3, :4].tolist()
    assert label_counts == [predicted.count(k) for k in range(3)] + [0]
    assert ref.channel_edges[3, :3].tolist() == [0.5, 1.5, 2.5]
    assert np.isinf(ref.channel_edges[3, 3:]).all() and not ref.channel_counts[3, 4:].any()
    assert np.isnan(ref.channel_range[3]).all()
    # live events are read by label, whatever their column order; ties go to the first class
    live = np.array([[0.9, 0.05, 0.05], [0.5, 0.5, 0.0], [np.nan, np.nan, np.nan]])
    later = events([0, 1, 2], KEYS_50[:3], scores=live, score_labels=("eel", "cat", "dog"))
    bins, values = ref.bins_of(later, np.arange(3))
    assert values[:, 3].tolist()[:2] == [2.0, 0.0] and bins[2].tolist() == [-1] * 4
    assert values[0, :3].tolist() == [0.05, 0.05, 0.9]


def test_reference_caps_class_channels_at_the_most_predicted_classes() -> None:
    rng = np.random.default_rng(7)
    n, k = 2_000, 40
    names = tuple(f"c{i:02d}" for i in range(k))
    p = rng.dirichlet(np.linspace(0.2, 3.0, k), n)
    p[:, 0] = np.nan  # c00 never has a score: no channel
    (ref,) = feed(
        ReferenceStore(n_events=n, max_caller_share=1.0),
        [events(np.arange(n), KEYS_50 * 40, scores=p, score_labels=names)],
    )
    wins = np.bincount(np.nanargmax(p, axis=1), minlength=k)
    ranked = sorted(range(1, k), key=lambda i: (-wins[i], i))[:MAX_CLASS_CHANNELS]
    kept = tuple(names[i] for i in sorted(ranked))
    assert ref.channel_categories == kept and len(kept) == MAX_CLASS_CHANNELS == 32
    assert ref.channels == (*(f"score:{c}" for c in kept), "label")
    other = int(sum(wins[i] for i in range(k) if names[i] not in kept))
    assert ref.channel_counts[-1, MAX_CLASS_CHANNELS] == other > 0  # the label channel's last bin


def test_reference_label_only_bins_are_the_labels() -> None:
    store = ReferenceStore(n_events=50, max_caller_share=1.0)
    (ref,) = feed(store, [events(np.arange(50), KEYS_50, labels=["spam", "ham"] * 25)])
    assert ref.channels == ("label",) and ref.channel_categories == ("ham", "spam")
    assert ref.channel_counts.tolist() == [[25, 25, 0]]
    later = events(np.arange(4), KEYS_50[:4], labels=["spam", "new", "", "ham"])
    bins, _ = ref.bins_of(later, np.arange(4))
    assert bins.tolist() == [[1], [2], [-1], [0]]


def test_reference_declared_score_type_wins_over_inference() -> None:
    store = ReferenceStore(n_events=50, score_types={"m0": "logit"})
    (ref,) = feed(store, [events(np.arange(50), KEYS_50, scores=two_class(np.full(50, 0.3)))])
    assert ref.score_type == "logit"
    with pytest.raises(ValueError, match="expected one of"):
        ReferenceStore(score_types={"m0": "probabilities"})


def test_reference_to_bytes_round_trips_exactly() -> None:
    rng = np.random.default_rng(3)
    n = 300
    feats = rng.normal(size=(n, 3))
    feats[rng.random(n) < 0.1, 1] = np.nan
    store = ReferenceStore(n_events=n, sample_size=100)
    scores = rng.dirichlet([1.0, 1.0, 1.0], n)
    (ref,) = feed(
        store,
        [events(np.arange(n), KEYS_50 * 6, scores=scores, score_labels=CLASSES, features=feats)],
    )
    assert np.isinf(ref.channel_edges[-1]).any()  # the label channel's padding survives
    blob = ref.to_bytes()
    back = Reference.from_bytes(blob)
    assert back == ref and back.to_bytes() == blob
    for f in dataclasses.fields(Reference):
        mine, theirs = getattr(ref, f.name), getattr(back, f.name)
        assert type(mine) is type(theirs)
        for x, y in zip(
            *(v if isinstance(v, tuple) else (v,) for v in (mine, theirs)), strict=True
        ):
            if isinstance(x, np.ndarray):
                assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True), f.name
            else:
                assert x == y, f.name
    assert ref.sample_features.shape == (100, 3) and ref.feature_missing[1] > 0


def test_reference_of_the_single_score_format_is_refused_with_the_remedy() -> None:
    (ref,) = feed(
        ReferenceStore(n_events=50),
        [events(np.arange(50), KEYS_50, scores=two_class(np.full(50, 0.5)))],
    )
    arrays = npz_load(ref.to_bytes())
    meta = orjson.loads(arrays["meta"].tobytes())
    arrays["meta"] = np.frombuffer(orjson.dumps({**meta, "format": 1}), np.uint8)
    with pytest.raises(ValueError, match=r"format 1, expected 2.*delete its row"):
        Reference.from_bytes(npz_bytes(arrays))


def test_reference_bytes_do_not_depend_on_batch_cuts_or_later_features() -> None:
    rng = np.random.default_rng(4)
    n = 900
    feats = np.full((n, 3), np.nan)
    feats[:, 0] = rng.normal(size=n)
    feats[700:, 2] = 1.0  # f2 appears only after the reference froze at event 600
    whole = events(
        np.arange(n),
        [f"k{i % 50}" for i in range(n)],
        scores=two_class(rng.random(n)),
        features=feats,
    )
    blobs = set()
    for size in (n, 650, 128, 7):
        (ref,) = feed(ReferenceStore(n_events=600), cut(whole, size))
        blobs.add(ref.to_bytes())
    assert len(blobs) == 1
    assert ref.feature_names == ("f0",)  # trailing unused columns trimmed


def test_reference_builders_survive_snapshot_and_restore() -> None:
    rng = np.random.default_rng(5)
    n = 1_000
    whole = events(
        np.arange(n),
        [f"k{i % 7}" for i in range(n)],
        scores=two_class(rng.random(n)),
        features=rng.normal(size=(n, 2)),
    )
    parts = cut(whole, 150)
    straight = feed(ReferenceStore(n_events=800), parts)
    index = FeatureIndex()
    first = ReferenceStore(n_events=800)
    assert feed(first, parts[:3], index) == []
    blob = first.snapshot()
    assert blob == first.snapshot()  # deterministic bytes
    second = ReferenceStore(n_events=800)
    second.restore(blob)
    assert feed(second, parts[3:], index) == straight


def test_reference_per_version_and_only_successful_calls() -> None:
    n = 100
    v1 = events(np.arange(n), ["a", "b"] * 50, version="v1", scores=two_class(np.full(n, 0.2)))
    v2 = events(np.arange(n), ["a", "b"] * 50, version="v2", scores=two_class(np.full(n, 0.8)))
    errors = events(
        np.arange(n), ["a", "b"] * 50, version="v2", status=503, scores=two_class(np.ones(n))
    )
    store = ReferenceStore(n_events=60, max_caller_share=1.0)
    refs = feed(store, [cf.concat([errors, v1.take(np.arange(50)), v2])])
    assert [(r.model_version, r.channel_range.tolist()) for r in refs] == [("v2", [[0.8, 0.8]])]
    refs = feed(store, [v1])
    assert [r.model_version for r in refs] == ["v1"] and store.get("m0", "v1") is not None


def test_reference_add_replaces_the_builder() -> None:
    store = ReferenceStore(n_events=50)
    (ref,) = feed(store, [events(np.arange(50), KEYS_50, scores=two_class(np.full(50, 0.5)))])
    other = ReferenceStore(n_events=10)
    feed(other, [events(np.arange(5), KEYS_50[:5])])
    other.add(ref)
    assert other.get("m0", "") is ref
    assert other.snapshot() == ReferenceStore(n_events=10).snapshot()
    assert feed(other, [events(np.arange(50), KEYS_50)]) == []


def naive_reference_rows(callers: list[str], n_events: int, floor: float) -> list[int] | None:
    """Row at a time: the events (by index) of the reference, or None if it never froze."""
    import math
    import zlib

    counts: dict[str, int] = {}
    stop = None
    for i, c in enumerate(callers):
        counts[c] = counts.get(c, 0) + 1
        k = len(counts)
        share = 1.0 if k == 1 else max(floor, min(0.5, 1 / math.sqrt(k)))
        cap = max(1, int(share * n_events + 1e-9))
        if sum(min(v, cap) for v in counts.values()) >= n_events:
            stop = i + 1
            break
    if stop is None:
        return None
    seen = callers[:stop]
    order = list(dict.fromkeys(seen))  # callers in the order they were first seen
    level = 1
    while sum(min(v, level) for v in counts.values()) < n_events:
        level += 1
    quota = {c: min(counts[c], level - 1) for c in order}
    short = n_events - sum(quota.values())
    for c in order:
        if short and counts[c] >= level:
            quota[c] += 1
            short -= 1
    rows = []
    for c in order:
        mine = [j for j, w in enumerate(seen) if w == c]
        mine.sort(key=lambda j: (zlib.crc32(f"e{j}".encode()), j))
        rows.extend(mine[: quota[c]])
    return sorted(rows)


@settings(max_examples=150, deadline=None)
@given(
    callers=st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=300),
    heavy=st.sampled_from("abc"),
    cuts=st.lists(st.integers(0, 400), max_size=6),
    n_events=st.integers(5, 80),
    share=st.sampled_from([0.05, 0.1, 0.25, 1.0]),
)
def test_reference_pool_matches_a_row_at_a_time_reference(
    callers: list[str], heavy: str, cuts: list[int], n_events: int, share: float
) -> None:
    callers = [c for c in callers for c in (c, heavy, heavy)]  # one caller floods
    n = len(callers)
    feats = np.arange(n, dtype=float)[:, None]
    whole = events(np.arange(n), callers, features=feats)
    bounds = sorted({0, n, *(c for c in cuts if c <= n)})
    store = ReferenceStore(n_events=n_events, max_caller_share=share)
    refs = feed(store, [whole.take(np.arange(a, b)) for a, b in itertools.pairwise(bounds)])
    want = naive_reference_rows(callers, n_events, share)
    if want is None:
        assert refs == []
        return
    (ref,) = refs
    assert ref.sample_features[:, 0].astype(int).tolist() == want
    assert ref.events_seen == ref.last_ts_ms + 1


def test_reference_of_values_at_the_ends_of_float_range_builds_without_overflow() -> None:
    # found by the fuzzer once references built early: interpolating between -1e308 and 1e308
    n = 60
    values = np.where(np.arange(n) % 2 == 0, -1e308, 1e308)
    (ref,) = feed(
        ReferenceStore(n_events=n), [events(np.arange(n), KEYS_50 + KEYS_50[:10], values=values)]
    )
    assert np.isfinite(ref.channel_edges[0][np.isfinite(ref.channel_edges[0])]).all()
    assert ref.channel_counts.sum() == n
