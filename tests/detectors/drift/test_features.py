"""drift.features: the statistics against scipy, calibration, the engine against a naive one,
and the detector in the worker's order (references, versions, event order, snapshots)."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import warnings

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.spatial.distance import jensenshannon

from detectors.base import AlertChange, DetectorInput, KeySpace, Output, Snapshot
from detectors.drift import stats as ds
from detectors.drift.bins import BinLayout, build_layout
from detectors.drift.features.detector import FeatureDrift
from detectors.drift.features.state import _pack_ids, _unpack_ids
from detectors.drift.features.windows import Engine, Settings
from detectors.models.reference import Reference, npz_bytes, npz_load
from detectors.models.reference_store import ReferenceStore
from detectors.models.routing import FeatureIndex, route
from schemas.batch import EventBatch
from tests.support import conformance as cf
from tests.support.batches import events, two_class

F64 = npt.NDArray[np.float64]
CALLERS = [f"k{i:03d}" for i in range(100)]
SECOND = 1_000

# statistics -------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 7), min_size=1, max_size=60),
    st.lists(st.integers(0, 7), min_size=1, max_size=60),
)
def test_drift_statistics_equal_scipy_on_binned_values(a: list[int], b: list[int]) -> None:
    r, c = np.bincount(a, minlength=8), np.bincount(b, minlength=8)
    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's p-value for tiny samples
        want_ks = stats.ks_2samp(a, b, method="asymp").statistic
    assert ds.ks_stat(r, c) == pytest.approx(want_ks, abs=1e-12)
    assert ds.js_distance(r, c) == pytest.approx(jensenshannon(r, c, base=2), abs=1e-7)
    centers = np.arange(8) * 1.5 + 0.0
    assert ds.wasserstein(r, c, centers) == pytest.approx(
        stats.wasserstein_distance(centers, centers, r, c), abs=1e-9
    )
    used = (r + c) > 0
    chi, dof = ds.chi2_homogeneity(r, c)
    if used.sum() > 1:
        want = stats.chi2_contingency(np.stack([r[used], c[used]]), correction=False)
        assert chi == pytest.approx(want.statistic, rel=1e-9, abs=1e-9) and dof == want.dof
        assert ds.chi2_pvalue(chi, dof) == pytest.approx(want.pvalue, rel=1e-6, abs=1e-12)


@given(st.lists(st.floats(0, 1), min_size=1, max_size=30), st.floats(1e-4, 0.5))
def test_benjamini_hochberg_matches_its_definition(p: list[float], q: float) -> None:
    arr = np.array(p)
    m = arr.size
    ranked = sorted(arr.tolist())
    k = max((i + 1 for i, v in enumerate(ranked) if v <= q * (i + 1) / m), default=0)
    want = arr <= ranked[k - 1] if k else np.zeros(m, bool)
    got = ds.bh_reject(arr[None, :], q)[0]
    assert got.sum() == k and (got == want).all()


def test_asymptotic_nulls_hold_by_permutation_on_the_reference() -> None:
    """Random splits of a reference: the KS null is not anti-conservative on continuous,
    discrete and tied columns, and the location z has unit variance."""
    rng = np.random.default_rng(5)
    sample = np.column_stack(
        [
            rng.normal(size=2000),
            rng.exponential(size=2000),
            rng.integers(0, 3, 2000).astype(float),  # heavy ties
            np.round(rng.normal(size=2000), 1),
        ]
    )
    lay = build_layout(("a", "b", "c", "d"), (False,) * 4, sample)
    codes = lay.codes(sample)
    ratio = ds.permutation_check(codes, lay.bins + 1, 100, 400, 0.05, seed=1)
    assert (ratio < 1.6).all(), ratio
    z = []
    for _ in range(400):
        take = rng.choice(2000, 100, replace=False)
        rest = np.setdiff1d(np.arange(2000), take)
        hop = np.stack([np.bincount(codes[take, j], minlength=lay.bins + 1) for j in range(4)])
        ref = np.stack([np.bincount(codes[rest, j], minlength=lay.bins + 1) for j in range(4)])
        b = lay.bins
        d = (hop[:, :b] @ lay.scores.T).diagonal() / 100 - (
            ref[:, :b] @ lay.scores.T
        ).diagonal() / 1900
        z.append(d / lay.score_sd / np.sqrt(1 / 100 + 1 / 1900))
    assert np.std(z, axis=0) == pytest.approx(np.ones(4), abs=0.12)


def test_location_pvalue_is_exact_at_the_floor() -> None:
    d = np.array([0.15 + 3 * np.sqrt(1 / 100 + 1 / 2000)])
    p = ds.location_pvalue(d, np.array([100.0]), np.array([2000.0]), 0.15)
    assert p[0] == pytest.approx(stats.norm.sf(3) + stats.norm.sf(3 + 0.3 / np.sqrt(0.0105)))


def test_bins_put_ties_on_one_side_and_keep_binary_features_apart() -> None:
    sample = np.column_stack([np.r_[np.zeros(700), np.ones(1300)], np.full(2000, 4.0)])
    lay = build_layout(("bin", "const"), (False, False), sample)
    assert lay.widths.tolist() == [2, 3] and lay.counts[0, :2].tolist() == [700, 1300]
    assert lay.codes(np.array([[0.0, 3.0], [1.0, 4.0], [np.nan, 5.0]])).tolist() == [
        [0, 0],
        [1, 1],
        [lay.bins, 2],
    ]


# the engine -------------------------------------------------------------------------------


@functools.cache
def layout_100() -> BinLayout:
    rng = np.random.default_rng(0)
    names = tuple(f"f{j}" for j in range(100))
    return build_layout(names, (False,) * 100, rng.normal(size=(2000, 100)))


def test_engine_fires_once_on_a_sudden_shift_and_ranks_the_moved_features() -> None:
    lay = layout_100()
    eng = Engine(lay, Settings())
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20_000, 100)).astype(np.float32)
    x[12_345:, [3, 50, 77]] += 1.0
    changes = [c for a in range(0, 20_000, 5_000) for c in eng.feed(lay.codes(x[a : a + 5_000]))]
    (fire,) = changes
    assert fire.status == "firing" and 12_345 < fire.end_event <= 12_345 + 200
    assert set(np.flatnonzero(fire.rejected)) <= {3, 50, 77} and fire.rejected.any()


def test_engine_stays_quiet_on_stationary_data_and_a_seasonal_wobble() -> None:
    lay = layout_100()
    eng = Engine(lay, Settings())
    rng = np.random.default_rng(2)
    n = 200_000
    for a in range(0, n, 20_000):
        x = rng.normal(size=(20_000, 100)).astype(np.float32)
        x += 0.1 * np.sin(np.arange(a, a + 20_000) / 30_000)[:, None].astype(np.float32)
        assert eng.feed(lay.codes(x)) == []
    assert eng.hops == n // 100


def naive_changes(
    codes: npt.NDArray[np.uint8], ts: npt.NDArray[np.int64] | None, s: Settings, eng: Engine
) -> list[tuple[str, int]]:
    """Row at a time: hops as lists of rows, a window as a list of hops, counts by Python
    loops; the tests' p-values and BH from the (separately checked) statistics."""
    hops: list[list[int]] = []
    current: list[int] = []
    out: list[tuple[str, int]] = []
    state = {"episode": False, "clear": 0}
    bins = eng.layout.bins

    def counts(rows: list[int]) -> npt.NDArray[np.int64]:
        c = np.zeros((codes.shape[1], bins + 1), np.int64)
        for r in rows:
            for j in range(codes.shape[1]):
                c[j, codes[r, j]] += 1
        return c

    def close(end: int) -> None:
        hops.append(current.copy())
        current.clear()
        i = len(hops) - 1
        window = hops[max(0, i - s.window_hops + 1) : i + 1]
        if s.window_ms is not None and ts is not None:
            last = ts[hops[i][-1]]
            window = [h for h in window[:-1] if ts[h[0]] > last - s.window_ms] + [hops[i]]
        dec = eng.decide(counts(hops[i])[None], counts([r for h in window for r in h])[None])
        fire = any(bool(f[0].any()) for f in dec.full.values())
        if i < s.window_hops:
            return
        if not state["episode"] and fire:
            state.update(episode=True, clear=0)
            out.append(("firing", end))
        elif state["episode"]:
            state["clear"] = 0 if fire else state["clear"] + 1
            if state["clear"] >= s.clear_hops:
                state["episode"] = False
                out.append(("resolved", end))

    for r in range(codes.shape[0]):
        timed = current and ts is not None and s.hop_ms is not None
        if timed and ts[r] >= ts[current[0]] + s.hop_ms:  # type: ignore[index]
            close(r)
        current.append(r)
        if len(current) == s.hop_events:
            close(r + 1)
    return out


@functools.cache
def small_layout() -> BinLayout:
    rng = np.random.default_rng(3)
    sample = np.column_stack(
        [rng.normal(size=400), rng.integers(0, 4, 400), np.round(rng.exponential(size=400), 1)]
    )
    return build_layout(("x", "cat", "y"), (False, True, False), sample, bins=6)


@st.composite
def coded_streams(
    draw: st.DrawFn,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], list[int]]:
    """Codes with stretches pushed to one end (drift on and off), times with gaps, and batch
    cuts anywhere."""
    n = draw(st.integers(1, 400))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lay = small_layout()
    codes = lay.codes(
        np.column_stack([rng.normal(size=n), rng.integers(0, 5, n), rng.exponential(size=n)])
    )
    for _ in range(draw(st.integers(0, 3))):
        a = draw(st.integers(0, n))
        codes[a : a + draw(st.integers(0, 150)), draw(st.integers(0, 2))] = draw(st.integers(0, 6))
    gaps = rng.choice([0, 1, 50, 3_000], n, p=[0.3, 0.4, 0.25, 0.05])
    ts = np.cumsum(gaps).astype(np.int64)
    cuts = sorted(set(draw(st.lists(st.integers(0, n), max_size=6))) | {0, n})
    return codes, ts, cuts


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(coded_streams(), st.booleans())
def test_engine_matches_a_naive_row_at_a_time_engine(
    spec: tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], list[int]], timed: bool
) -> None:
    codes, ts, cuts = spec
    s = Settings(
        hop_events=20,
        window_hops=3,
        hop_ms=2_000 if timed else None,
        window_ms=5_000 if timed else None,
        alpha=0.05,
        min_hop_events=5,
        min_window_events=10,
        clear_hops=2,
    )
    eng = Engine(small_layout(), s)
    got = []
    for a, b in itertools.pairwise(cuts):
        got += [(c.status, c.end_event) for c in eng.feed(codes[a:b], ts[a:b] if timed else None)]
    fresh = Engine(small_layout(), s)
    assert got == naive_changes(codes, ts if timed else None, s, fresh)
    assert eng.events == codes.shape[0]


# the detector in the worker's order ---------------------------------------------------------


@dataclasses.dataclass
class Pipeline:
    """The worker's order per batch: store.update, detector.update, advance(watermark)."""

    det: FeatureDrift = dataclasses.field(default_factory=FeatureDrift)
    store: ReferenceStore = dataclasses.field(default_factory=ReferenceStore)
    index: FeatureIndex = dataclasses.field(default_factory=FeatureIndex)
    max_ts: int = -(2**62)
    log: list[tuple[EventBatch, Output]] = dataclasses.field(default_factory=list)

    def feed(self, batch: EventBatch) -> Output:
        views = route(batch, self.index)
        self.store.update(batch, views)
        wm = self.max_ts - cf.LATENESS_MS
        out = self.det.update(DetectorInput(batch, {}, KeySpace(), wm, views, self.store.frozen()))
        if batch.n:
            self.max_ts = max(self.max_ts, int(batch.ts_ms.max()))
        out = out + self.det.advance(self.max_ts - cf.LATENESS_MS)
        self.log.append((batch, out))
        return out

    def run(self, batches: list[EventBatch]) -> Pipeline:
        for b in batches:
            self.feed(b)
        return self

    def alerts(self) -> list[AlertChange]:
        return [a for _, out in self.log for a in out.alerts]


COUNTRIES = ("de", "fr", "uk")


def feature_stream(
    seed: int,
    minutes: int = 20,
    per_second: int = 10,
    shift_s: int | None = None,
    shift_score: bool = False,
    shift_country: bool = False,
    version: str = "",
) -> EventBatch:
    """Features f0..f3 ~ N(0, 1), a categorical ``country``, 2-class scores ~ Beta(2, 5); from
    ``shift_s`` on, f2 moves +1 sd (or the score, or the country mix); ~2 s of disorder."""
    rng = np.random.default_rng(seed)
    n = minutes * 60 * per_second
    t = np.sort(rng.integers(0, minutes * 60_000, n))
    feats = rng.normal(size=(n, 4))
    p = rng.beta(2, 5, n)
    country = rng.choice(3, n, p=[0.6, 0.3, 0.1])
    if shift_s is not None:
        on = t >= shift_s * SECOND
        if shift_score:
            p[on] = rng.beta(4, 3, int(on.sum()))
        elif shift_country:
            country[on] = rng.choice(3, int(on.sum()), p=[0.3, 0.3, 0.4])
        else:
            feats[on, 2] += 1.0
    ts = cf.T0_MS + t - rng.integers(0, 2_000, n) * (rng.random(n) < 0.2)
    b = events(ts.tolist(), [CALLERS[i % 100] for i in range(n)], features=feats, version=version)
    b = dataclasses.replace(
        b,
        scores=two_class(p),
        score_labels=("0", "1"),
        cat_names=("country",),
        cat_codes=country.astype(np.int32)[:, None],
        cat_values=(COUNTRIES,),
    )
    return b


def cut(batch: EventBatch, size: int = 700) -> list[EventBatch]:
    return [batch.take(np.arange(a, min(a + size, batch.n))) for a in range(0, batch.n, size)]


@functools.cache
def shifted_run() -> Pipeline:
    return Pipeline().run(cut(feature_stream(11, shift_s=600)))


def test_drift_fires_once_on_the_feature_that_moved_with_quantiles() -> None:
    run = shifted_run()
    (alert,) = run.alerts()
    assert (alert.status, alert.entity_type, alert.entity, alert.detector) == (
        "firing",
        "model",
        "m0",
        "",
    )
    shift_ms = cf.T0_MS + 600 * SECOND
    assert shift_ms < alert.ts_ms <= shift_ms + 30 * SECOND  # ~2 hops of 100 events at 10/s
    assert alert.first_seen_ms < alert.ts_ms == alert.episode_start_ms == alert.last_seen_ms
    top = alert.evidence["drifted"][0]
    assert top["column"] == "f2" and top["kind"] == "numeric" and top["shift_sd"] > 0.3
    assert top["current_quantiles"]["p50"] > top["reference_quantiles"]["p50"] + 0.3
    assert {"hop_location", "window_location"} & set(top["tests"])
    assert alert.evidence["columns"] == 4 + 1 + 1 + 1  # f0..f3, country, score, confidence
    assert alert.score >= alert.threshold and "f2" in alert.summary


def test_drift_stays_quiet_on_a_stationary_stream() -> None:
    run = Pipeline().run(cut(feature_stream(12, minutes=30)))
    assert run.alerts() == [] and run.det.late_events_total == 0


def test_drift_watches_predictions_and_category_mix() -> None:
    run = Pipeline().run(cut(feature_stream(13, shift_s=600, shift_score=True)))
    (alert,) = [a for a in run.alerts() if a.status == "firing"]
    columns = [d["column"] for d in alert.evidence["drifted"]]
    assert columns[0] in ("prediction:score", "confidence") and alert.severity == "high"
    run = Pipeline().run(cut(feature_stream(14, shift_s=600, shift_country=True)))
    (alert,) = [a for a in run.alerts() if a.status == "firing"]
    top = alert.evidence["drifted"][0]
    assert top["column"] == "country" and top["tests"] == ["window_shape"]
    assert top["current_proportions"][2] > top["reference_proportions"][2] + 0.08


def test_a_new_version_gets_its_own_reference_and_warm_up() -> None:
    v1 = feature_stream(15, minutes=10, version="1")
    v2 = feature_stream(16, minutes=10, version="2")
    feats = v2.num_values.copy()
    feats[:, 2] += 1.5  # the new version sees other inputs from its first event
    v2 = dataclasses.replace(v2, num_values=feats, ts_ms=v2.ts_ms + 600 * SECOND)
    run = Pipeline().run(cut(v1) + cut(v2))
    assert sorted(run.store.frozen()) == [("m0", "1"), ("m0", "2")]
    assert run.alerts() == []


def normal(run: Pipeline) -> cf.Normal:
    return cf.normalise(run.log, "drift.features")


def test_drift_is_independent_of_batch_boundaries() -> None:
    whole = feature_stream(11, shift_s=600)
    want = normal(shifted_run())
    assert want.alerts
    rng = np.random.default_rng(1)
    pieces: list[EventBatch] = []
    for b in cut(whole):
        pieces.extend(cf.split(b, int(rng.integers(0, b.n + 1))))
    assert normal(Pipeline().run(pieces)) == want
    assert normal(Pipeline().run(cut(whole, 3_000))) == want


def test_drift_snapshot_restore_round_trips() -> None:
    batches = cut(feature_stream(11, shift_s=600))
    a = Pipeline()
    saved = []
    for b in batches:
        a.feed(b)
        snap = a.det.snapshot(KeySpace())
        saved.append((snap, a.store.snapshot(), a.store.frozen(), a.index.snapshot(), a.max_ts))
    for j in (3, len(batches) // 2, len(batches) - 3):
        c = Pipeline()
        for snap, *_ in saved[:j]:
            c.det.restore(cf.through_store(snap), KeySpace())
        _, builders, frozen, index, c.max_ts = saved[j - 1]
        c.store.restore(builders)
        for ref in frozen.values():
            c.store.add(Reference.from_bytes(ref.to_bytes()))
        c.index.restore(index)
        c.run(batches[j:])
        assert cf.normalise(c.log, "d") == cf.normalise(a.log[j:], "d"), j
    assert a.det.snapshot(KeySpace()).model is None


def test_drift_restores_snapshots_written_before_ids_were_packed() -> None:
    """A store written by an earlier version holds the waiting events' ids as numpy strings."""
    a = Pipeline()
    for b in cut(feature_stream(11, shift_s=600))[:3]:
        a.feed(b)
    blob = a.det.snapshot(KeySpace()).model
    assert blob is not None
    arrays = npz_load(blob)
    for name in [k for k in arrays if k.endswith(".id_bytes")]:
        i = name.split(".")[0]
        data, ends = arrays.pop(name).tobytes(), np.cumsum(arrays.pop(f"{i}.id_lens"))
        arrays[f"{i}.ids"] = np.array(
            [data[x:y].decode() for x, y in zip([0, *ends][:-1], ends, strict=True)], np.str_
        )
    old, new = FeatureDrift(), FeatureDrift()
    old.restore(Snapshot(model=npz_bytes(arrays)), KeySpace())
    new.restore(Snapshot(model=blob), KeySpace())
    assert old._tracks.keys() == new._tracks.keys() and old._tracks
    for key, t in new._tracks.items():
        assert t.ids.size and list(old._tracks[key].ids) == list(t.ids)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=12), max_size=20))
def test_waiting_ids_pack_and_unpack_to_the_same_strings(ids: list[str]) -> None:
    """ASCII ids take the one-join path; any other (accents, emoji) the per-id one."""
    data, lens = _pack_ids(np.array(ids, object))
    got = _unpack_ids({"0.id_bytes": data, "0.id_lens": lens}, 0)
    assert list(got) == ids


def test_drift_counts_late_events_and_drops_them() -> None:
    run = Pipeline().run(cut(feature_stream(17, minutes=8)))
    old = events([cf.T0_MS + 300 * SECOND] * 50, CALLERS[:50], features=np.zeros((50, 4)))
    run.feed(old)
    assert run.det.late_events_total == 50


def test_drift_writes_one_metric_row_per_column_and_window() -> None:
    run = shifted_run()
    rows = [m for _, out in run.log for m in out.metrics]
    names = {m.feature for m in rows}
    assert {"f0", "f2", "country", "prediction:score", "confidence", ""} <= names
    ks = [m for m in rows if m.feature == "f2"]
    assert {m.metric for m in ks} == {"drift_ks"} and all(m.event_count == 500 for m in ks)
    before = [m.value for m in ks if m.window_end_ms <= cf.T0_MS + 600 * SECOND]
    after = [m.value for m in ks if m.window_start_ms > cf.T0_MS + 600 * SECOND]
    assert max(before) < 0.15 < min(after)
    keys = [(m.metric, m.feature, m.window_start_ms) for m in rows]
    assert len(keys) == len(set(keys))


def test_engine_cusum_accumulates_a_small_persistent_shift() -> None:
    lay = layout_100()
    rng = np.random.default_rng(4)
    x = rng.normal(size=(60_000, 100)).astype(np.float32)
    quiet = Engine(lay, Settings(cusum_k=0.25))
    assert quiet.feed(lay.codes(x)) == []
    x[30_000:, [10, 20, 30]] += 0.4
    eng = Engine(lay, Settings(cusum_k=0.25))
    (fire,) = eng.feed(lay.codes(x))
    assert 30_000 < fire.end_event < 31_000
    assert any("cusum" in fire.families[j] for j in (10, 20, 30))


def test_rare_categories_share_the_other_bin() -> None:
    codes = np.r_[np.zeros(1500), np.ones(485), np.full(15, 2.0)]  # code 2: 0.75 %
    lay = build_layout(("c",), (True,), codes[:, None])
    assert lay.widths.tolist() == [3] and lay.counts[0, :3].tolist() == [1500, 485, 15]
    assert lay.codes(np.array([[0.0], [2.0], [3.0], [9.0]]))[:, 0].tolist() == [0, 2, 2, 2]


def test_an_episode_resolves_when_the_shift_ends_and_a_new_one_opens_later() -> None:
    whole = feature_stream(18, minutes=30)
    t = (whole.ts_ms - cf.T0_MS) // SECOND
    on = ((t >= 600) & (t < 900)) | (t >= 1500)
    feats = whole.num_values.copy()
    feats[on, 2] += 1.0
    run = Pipeline().run(cut(dataclasses.replace(whole, num_values=feats)))
    changes = [
        (a.status, (a.resolved_ms or a.ts_ms) // SECOND - cf.T0_MS // SECOND) for a in run.alerts()
    ]
    assert [s for s, _ in changes] == ["firing", "resolved", "firing"]
    assert 600 < changes[0][1] < 630 and 900 < changes[1][1] < 1100 and 1500 < changes[2][1] < 1530
    first, resolved, _ = run.alerts()
    assert resolved.episode_start_ms == first.episode_start_ms
    assert resolved.severity == first.severity and resolved.evidence["drifted"] == []
