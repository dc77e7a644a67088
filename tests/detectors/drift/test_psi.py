"""drift.psi: fires on shifted scores, not on stationary ones, in event time, deterministically."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detectors.base import DetectorInput, KeySpace, Output, WindowMetric
from detectors.drift.psi.detector import PSI, psi
from detectors.models.reference import Reference
from detectors.models.reference_store import ReferenceStore
from detectors.models.routing import FeatureIndex, route
from schemas.batch import EventBatch
from tests.support import conformance as cf
from tests.support.batches import events, two_class

F64 = npt.NDArray[np.float64]
MINUTE = 60_000
CALLERS = [f"k{i:03d}" for i in range(100)]


@dataclass
class Pipeline:
    """The worker's order per batch: store.update, detector.update, advance(watermark)."""

    det: PSI = field(default_factory=PSI)
    store: ReferenceStore = field(default_factory=ReferenceStore)
    index: FeatureIndex = field(default_factory=FeatureIndex)
    max_ts: int = -(2**62)
    log: list[tuple[EventBatch, Output]] = field(default_factory=list)

    @property
    def watermark(self) -> int:
        return self.max_ts - cf.LATENESS_MS

    def feed(self, batch: EventBatch) -> Output:
        views = route(batch, self.index)
        self.store.update(batch, views)
        refs = self.store.frozen()
        out = self.det.update(DetectorInput(batch, {}, KeySpace(), self.watermark, views, refs))
        if batch.n:
            self.max_ts = max(self.max_ts, int(batch.ts_ms.max()))
        out = out + self.det.advance(self.watermark)
        self.log.append((batch, out))
        return out

    def run(self, batches: Iterable[EventBatch]) -> Pipeline:
        for b in batches:
            self.feed(b)
        return self

    def metrics(self) -> list[WindowMetric]:
        return [m for _, out in self.log for m in out.metrics]

    def alerts(self) -> list[Any]:
        return [a for _, out in self.log for a in out.alerts]


def scored_stream(
    seed: int, minutes: int = 60, per_minute: int = 300, shift_minute: int | None = None
) -> EventBatch:
    """Scores ~ Beta(2, 5), from ``shift_minute`` on Beta(4, 3); a little disorder."""
    rng = np.random.default_rng(seed)
    n = minutes * per_minute
    ts = np.sort(rng.integers(0, minutes * MINUTE, n))
    ts = cf.T0_MS + ts - rng.integers(0, 3_000, n) * (rng.random(n) < 0.2)
    p = rng.beta(2, 5, n)
    if shift_minute is not None:
        late = ts >= cf.T0_MS + shift_minute * MINUTE
        p[late] = rng.beta(4, 3, int(late.sum()))
    return events(ts.tolist(), [CALLERS[i % 100] for i in range(n)], scores=two_class(p))


def batches_of(batch: EventBatch, size: int = 500) -> list[EventBatch]:
    return [batch.take(np.arange(a, min(a + size, batch.n))) for a in range(0, batch.n, size)]


@functools.cache
def shifted_run() -> Pipeline:
    return Pipeline().run(batches_of(scored_stream(11, shift_minute=30)))


def test_psi_fires_on_a_shifted_score_distribution() -> None:
    run = shifted_run()
    (alert,) = run.alerts()
    assert (alert.status, alert.entity_type, alert.entity, alert.model_id) == (
        "firing",
        "model",
        "m0",
        "m0",
    )
    crossed = [m for m in run.metrics() if m.value >= 0.25 and m.event_count >= 200]
    first = min(crossed, key=lambda m: m.window_end_ms)
    assert alert.ts_ms == alert.episode_start_ms == first.window_end_ms
    assert (alert.first_seen_ms, alert.last_seen_ms) == (first.window_start_ms, first.window_end_ms)
    assert first.window_end_ms > cf.T0_MS + 30 * MINUTE
    ev = alert.evidence
    assert ev["psi"] == pytest.approx(alert.score, abs=1e-6) and ev["threshold"] == 0.25
    assert ev["channel"] == "score" and ev["top_channels"][0]["channel"] == "score"
    assert {m.feature for m in run.metrics()} == {"score"}  # one channel, no version
    assert len(ev["reference_proportions"]) == len(ev["current_proportions"]) == 10
    assert ev["reference_quantiles"]["p50"] < ev["current_quantiles"]["p50"]
    assert set(ev["current_quantiles"]) == {"p10", "p50", "p90"}
    assert alert.sample_event_ids == () and alert.tenant == ""


def test_psi_stays_quiet_on_a_stationary_stream() -> None:
    run = Pipeline().run(batches_of(scored_stream(12)))
    values = [m.value for m in run.metrics()]
    assert len(values) > 40 and max(values) < 0.05 and run.alerts() == []


RISK = ("low", "medium", "high")
BEFORE, AFTER = (0.5, 0.32, 0.18), (0.35, 0.24, 0.41)  # mean P(high) 0.18 -> 0.41


def risk_stream(seed: int, shift_minute: int | None = None, minutes: int = 60) -> EventBatch:
    """A 3-class credit-risk model, per-event probabilities ~ Dirichlet(3 x mean): from
    ``shift_minute`` on, applicants move from "low" and "medium" to "high"."""
    rng = np.random.default_rng(seed)
    n = minutes * 300
    ts = cf.T0_MS + np.sort(rng.integers(0, minutes * MINUTE, n))
    p = rng.dirichlet(3 * np.array(BEFORE), n)
    if shift_minute is not None:
        late = ts >= cf.T0_MS + shift_minute * MINUTE
        p[late] = rng.dirichlet(3 * np.array(AFTER), int(late.sum()))
    callers = [CALLERS[i % 100] for i in range(n)]
    return events(ts.tolist(), callers, version="7.1.0", scores=p, score_labels=RISK)


def max_probability_psi(reference: F64, current: F64) -> float:
    """What a single "prediction score" (the maximum probability) would have measured."""
    edges = np.unique(np.quantile(reference.max(1), np.linspace(0, 1, 11)[1:-1]))
    r, c = (
        np.bincount(np.searchsorted(edges, x.max(1)), minlength=11) for x in (reference, current)
    )
    return psi(r, c)


def test_psi_fires_on_the_channel_of_the_class_whose_share_grew() -> None:
    whole = risk_stream(21, shift_minute=30)
    run = Pipeline().run(batches_of(whole))
    features = {"score:low", "score:medium", "score:high", "label"}
    assert {m.feature for m in run.metrics()} == {f"{c}@7.1.0" for c in features}
    (alert,) = run.alerts()
    ev = alert.evidence
    assert (alert.status, alert.entity, ev["channel"], ev["model_version"]) == (
        "firing",
        "m0",
        "score:high",
        "7.1.0",
    )
    top = {"channel": "score:high", "psi": ev["psi"], "events": alert.event_count}
    assert ev["top_channels"][0] == top and alert.event_count > 2_000
    assert [c["psi"] for c in ev["top_channels"]] == sorted(
        (c["psi"] for c in ev["top_channels"]), reverse=True
    )
    assert ev["reference_quantiles"]["p50"] < ev["current_quantiles"]["p50"]
    assert sum(ev["current_proportions"][-3:]) > 0.5 > sum(ev["reference_proportions"][-3:])
    assert "score:high" in alert.summary and alert.score == pytest.approx(ev["psi"], abs=1e-6)
    # the maximum probability barely moves over the same window: one score would miss this
    ref, window = (
        whole.scores[:2_000],
        whole.take(
            np.flatnonzero((whole.ts_ms >= alert.first_seen_ms) & (whole.ts_ms < alert.ts_ms))
        ),
    )
    assert ref.shape == (2_000, 3) and max_probability_psi(ref, window.scores) < 0.1


def test_psi_stays_quiet_on_a_stationary_multi_class_stream() -> None:
    run = Pipeline().run(batches_of(risk_stream(22)))
    values = [m.value for m in run.metrics()]
    assert len(values) > 4 * 40 and max(values) < 0.05 and run.alerts() == []


def naive_counts(ref: Reference, channel: int, values: Sequence[float]) -> tuple[list[int], ...]:
    """The reference's and the values' counts per bin of one channel, row at a time: bin i is
    (edges[i-1], edges[i]]; the label channel's values are bin numbers already."""
    edges = [e for e in ref.channel_edges[channel].tolist() if e != math.inf]
    counts = [0] * (len(edges) + 1)
    for v in values:
        if ref.channels[channel] == "label":
            counts[int(v)] += 1
        else:
            counts[sum(1 for e in edges if e < v)] += 1
    return ref.channel_counts[channel, : len(counts)].tolist(), counts


def naive_psi(ref: Reference, values: Sequence[float], channel: int = 0) -> float:
    reference, current = naive_counts(ref, channel, values)
    total_r, total_c = sum(reference), len(values)
    out = 0.0
    for r_count, c_count in zip(reference, current, strict=True):
        r, c = max(r_count / total_r, 1e-4), max(c_count / total_c, 1e-4)
        out += (c - r) * math.log(c / r)
    return out


def test_psi_value_equals_a_naive_per_bin_computation() -> None:
    run = shifted_run()
    ref = run.store.get("m0", "")
    assert ref is not None
    whole = cf.concat([b for b, _ in run.log])
    score = whole.scores[:, 1]
    for m in run.metrics():
        inside = (whole.ts_ms >= m.window_start_ms) & (whole.ts_ms < m.window_end_ms)
        assert m.event_count == int(inside.sum())  # nothing in this stream is late
        assert m.value == pytest.approx(naive_psi(ref, score[inside].tolist()), abs=1e-12)
    assert psi(np.array([10, 0]), np.array([0, 10])) == pytest.approx(
        2 * (1 - 1e-4) * math.log(1e4)
    )


def test_psi_waits_for_the_reference_and_starts_after_it() -> None:
    stream = scored_stream(13, minutes=6)  # 1,800 events: the reference needs 2,000
    run = Pipeline().run(batches_of(stream))
    run.det.advance(cf.T0_MS + 100 * MINUTE)
    assert run.metrics() == [] and run.store.frozen() == {}
    run = shifted_run()
    ref = run.store.get("m0", "")
    assert ref is not None
    first = min(m.window_start_ms for m in run.metrics())
    assert first == (ref.last_ts_ms // MINUTE + 1) * MINUTE
    assert {m.window_end_ms - m.window_start_ms for m in run.metrics()} == {600_000}


def test_psi_counts_late_events_and_never_reopens_a_window() -> None:
    stream = scored_stream(14, minutes=20)
    run = Pipeline().run(batches_of(stream))
    seen = set(run.metrics())
    assert seen and run.det.late_events_total == 0
    old = events([cf.T0_MS + 15 * MINUTE] * 300, CALLERS * 3, scores=two_class(np.full(300, 0.99)))
    out = run.feed(old)
    assert run.det.late_events_total == 300 and out.metrics == () and out.alerts == ()
    out = run.det.advance(cf.T0_MS + 200 * MINUTE)  # every remaining window closes
    assert all(m.window_end_ms > run.watermark - 2 * MINUTE for m in out.metrics)
    assert not any(m.value >= 0.25 for m in out.metrics)


def mixed_counts(ref: Reference, target: float, n: int) -> list[int]:
    """Counts of n events per reference bin whose PSI is about ``target``: part of the
    reference's mix moved into the first bin (found by bisection)."""
    counts = ref.channel_counts[0]
    r = counts / counts.sum()
    spike = np.eye(r.size)[0]
    lo, hi = 0.0, 1.0
    for _ in range(60):
        a = (lo + hi) / 2
        lo, hi = (a, hi) if psi(counts, (1 - a) * r + a * spike) < target else (lo, a)
    counts = np.floor(((1 - lo) * r + lo * spike) * n).astype(int)
    counts[0] += n - counts.sum()
    return counts.tolist()


def minute_of(ref: Reference, minute: int, counts: list[int]) -> EventBatch:
    bounds = [0.0, *ref.channel_edges[0].tolist(), 1.0]
    p = np.repeat([(bounds[i] + bounds[i + 1]) / 2 for i in range(len(counts))], counts)
    ts = minute * MINUTE + np.linspace(0, MINUTE - 1, p.size).astype(np.int64)
    return events(ts.tolist(), [CALLERS[i % 100] for i in range(p.size)], scores=two_class(p))


def test_psi_resolves_only_after_clear_windows_below_the_hysteresis_band() -> None:
    store = ReferenceStore()
    index = FeatureIndex()
    reference_events = events(
        np.arange(2_000).tolist(),
        [CALLERS[i % 100] for i in range(2_000)],
        scores=two_class(np.linspace(0, 1, 2_000)),
    )
    (ref,) = store.update(reference_events, route(reference_events, index))
    det = PSI(window_s=60, hop_s=60)  # tumbling one-minute windows
    plan = [0.0, 0.0, 0.5, 0.0, 0.22, 0.0, 0.0, 0.5, 0.0, 0.0]
    sizes = [300, 300, 300, 300, 300, 300, 300, 100, 300, 300]  # minute 8: inconclusive
    values, changes = [], []
    for minute, (target, n) in enumerate(zip(plan, sizes, strict=True), start=1):
        b = minute_of(ref, minute, mixed_counts(ref, target, n))
        det.update(DetectorInput(b, {}, KeySpace(), 0, route(b, index), store.frozen()))
        out = det.advance((minute + 1) * MINUTE)
        values += [round(m.value, 2) for m in out.metrics]
        changes += [(a.status, (a.resolved_ms or a.ts_ms) // MINUTE) for a in out.alerts]
    assert values[2] >= 0.25 and 0.2 <= values[4] < 0.25 and values[7] >= 0.25
    assert all(values[i] < 0.2 for i in (0, 1, 3, 5, 6, 8, 9))
    # fired by minute 3; minute 5 is in the band (>= 0.8 x 0.25) and restarts the count;
    # minute 8 has too few events to count either way; minutes 6, 7, 9 clear it
    assert changes == [("firing", 4), ("resolved", 10)]


@functools.cache
def drifting_stream() -> tuple[EventBatch, ...]:
    """The conformance stream with m1 a 3-class model whose class "2" grows from minute 12 on
    (m0 and m2 keep their 2-class scores; their rows have no score for "2")."""
    out = []
    for b in cf.stream(7):
        m1 = b.model_id == "m1"
        push = m1 & (b.ts_ms >= cf.T0_MS + 12 * MINUTE)
        p = np.where(push, b.scores[:, 1] ** 0.2, b.scores[:, 1])
        three = np.column_stack([(1 - p) * 0.6, (1 - p) * 0.4, p])
        scores = np.where(m1[:, None], three, np.column_stack([1 - p, p, np.full(b.n, np.nan)]))
        out.append(dataclasses.replace(b, scores=scores, score_labels=("0", "1", "2")))
    return tuple(out)


def small() -> Pipeline:
    return Pipeline(PSI(window_s=180, hop_s=60, min_events=50), ReferenceStore(n_events=300))


def normal(run: Pipeline) -> cf.Normal:
    return cf.normalise(run.log, "drift.psi")


def test_psi_is_independent_of_batch_boundaries() -> None:
    whole = small().run(drifting_stream())
    fired = {a.entity: a.evidence["channel"] for a in whole.alerts() if a.status == "firing"}
    assert fired.keys() == {"m1", "m2"} and fired["m1"].startswith("score:")  # m2: cf.stream
    assert {m.feature for m in whole.metrics() if m.model_id == "m1"} == {
        "score:0",
        "score:1",
        "score:2",
        "label",
    }
    rng = np.random.default_rng(1)
    halves: list[EventBatch] = []
    for b in drifting_stream():
        halves.extend(cf.split(b, int(rng.integers(0, b.n + 1))))
    assert normal(small().run(halves)) == normal(whole)
    merged = [cf.concat(drifting_stream()[i : i + 5]) for i in range(0, len(drifting_stream()), 5)]
    assert normal(small().run(merged)) == normal(whole)


def test_psi_snapshot_restore_round_trips() -> None:
    batches = drifting_stream()
    a = small()
    saved = []
    for b in batches:
        a.feed(b)
        snap = a.det.snapshot(KeySpace())
        saved.append((snap, a.store.snapshot(), a.store.frozen(), a.index.snapshot(), a.max_ts))
    for j in (3, len(batches) // 2, len(batches) - 2):
        b = small()
        for snap, *_ in saved[:j]:
            b.det.restore(cf.through_store(snap), KeySpace())
        _, builders, frozen, index, b.max_ts = saved[j - 1]
        b.store.restore(builders)
        for ref in frozen.values():
            b.store.add(Reference.from_bytes(ref.to_bytes()))
        b.index.restore(index)
        b.run(batches[j:])
        assert cf.normalise(b.log, "drift.psi") == cf.normalise(a.log[j:], "drift.psi"), j
    assert a.det.snapshot(KeySpace()).model is None  # unchanged since the last one


def test_psi_keeps_versions_apart() -> None:
    rng = np.random.default_rng(15)
    n = 12_000
    ts = cf.T0_MS + np.sort(rng.integers(0, 40 * MINUTE, n))
    v2 = rng.random(n) < 0.5
    drifting = v2 & (ts >= cf.T0_MS + 20 * MINUTE)
    p = np.where(drifting, rng.beta(5, 1, n), rng.beta(2, 5, n))
    whole = events(ts.tolist(), [CALLERS[i % 100] for i in range(n)], scores=two_class(p))
    whole = dataclasses.replace(whole, model_version=np.where(v2, "v2", "v1").astype(object))
    run = Pipeline(store=ReferenceStore(n_events=1_000)).run(batches_of(whole))
    assert sorted(run.store.frozen()) == [("m0", "v1"), ("m0", "v2")]
    (alert,) = run.alerts()
    assert alert.evidence["model_version"] == "v2" and alert.entity == "m0"
    # both versions in one window: the version is in the row's key, so no row replaces another
    keys = [(m.model_id, m.metric, m.feature, m.window_start_ms) for m in run.metrics()]
    assert len(keys) == len(set(keys)) and {k[2] for k in keys} == {"score@v1", "score@v2"}


# Property: the vectorised detector against a deliberately naive, row-at-a-time one.


class NaivePSI:
    """One Python step per event, channel and window; knows one (model, version) reference."""

    def __init__(self, ref: Reference, window_s: int, hop_s: int, min_events: int) -> None:
        self.ref, self.hop, self.panes = ref, hop_s * 1000, window_s // hop_s
        self.min_events = min_events
        self.start = ref.last_ts_ms // self.hop + 1
        self.closed: int | None = None
        self.rows: list[tuple[int, list[float | None]]] = []  # (pane, value per channel)
        self.late = 0
        self.metrics: dict[tuple[int, int, str], tuple[float, int]] = {}
        self.episode: int | None = None  # windows in a row below the clearing level, if open
        self.alerts: list[tuple[str, int, float]] = []

    def values(self, batch: EventBatch, i: int) -> list[float | None]:
        """The event's value per channel: a class's score, or the predicted label's bin."""
        labels, ref = list(batch.score_labels), self.ref
        score = {c: float(batch.scores[i, labels.index(c)]) for c in labels}
        score = {c: v for c, v in score.items() if not math.isnan(v)}
        out: list[float | None] = []
        for name, column in zip(ref.channels, ref.channel_columns, strict=True):
            if name != "label":
                out.append(score.get(column))
                continue
            order = [c for c in ref.score_labels if c in score] + [
                c for c in labels if c in score and c not in ref.score_labels
            ]
            best = None
            for c in order:  # strictly greater: a tie goes to the first in the order
                if best is None or score[c] > score[best]:
                    best = c
            cats = ref.channel_categories
            out.append(
                None if best is None else float(cats.index(best) if best in cats else len(cats))
            )
        return out

    def update(self, batch: EventBatch) -> None:
        for i in range(batch.n):
            values = self.values(batch, i)
            pane = int(batch.ts_ms[i]) // self.hop
            if batch.status[i] >= 400 or all(v is None for v in values) or pane < self.start:
                continue
            if self.closed is not None and pane < self.closed:
                self.late += 1
            else:
                self.rows.append((pane, values))

    def advance(self, watermark_ms: int) -> None:
        closed = watermark_ms // self.hop
        if not self.rows or (self.closed is not None and closed <= self.closed):
            self.closed = closed if self.closed is None else max(closed, self.closed)
            return
        first = self.closed + 1 if self.closed is not None else min(p for p, _ in self.rows) + 1
        for end in range(max(first, self.start + self.panes), closed + 1):
            inside = [v for p, v in self.rows if end - self.panes <= p < end]
            window: list[tuple[float, int]] = []
            for j, name in enumerate(self.ref.channels):
                values = [v[j] for v in inside if v[j] is not None]
                if values:
                    window.append((naive_psi(self.ref, values, j), len(values)))
                    key = ((end - self.panes) * self.hop, end * self.hop, name)
                    self.metrics[key] = window[-1]
            self.decide(end * self.hop, window)
        self.closed = closed

    def decide(self, end_ms: int, window: list[tuple[float, int]]) -> None:
        conclusive = [value for value, count in window if count >= self.min_events]
        if not conclusive:
            return
        value = max(conclusive)
        if value >= 0.25:
            if self.episode is None:
                self.alerts.append(("firing", end_ms, value))
            self.episode = 0
        elif self.episode is not None:
            self.episode = self.episode + 1 if value < 0.2 else 0
            if self.episode == 3:
                self.alerts.append(("resolved", end_ms, value))
                self.episode = None


def reference_of(scores: F64, labels: tuple[str, ...]) -> Reference:
    n = scores.shape[0]
    ref_batch = events(
        (cf.T0_MS - 10 * MINUTE + np.arange(n) * 100).tolist(),
        [CALLERS[i % 100] for i in range(n)],
        scores=scores,
        score_labels=labels,
    )
    (ref,) = ReferenceStore(n_events=n).update(ref_batch, route(ref_batch, FeatureIndex()))
    return ref


@functools.cache
def property_references() -> tuple[Reference, Reference]:
    rng = np.random.default_rng(0)
    return (
        reference_of(two_class(rng.beta(2, 3, 400)), ("0", "1")),
        reference_of(rng.dirichlet([3.0, 2.0, 1.0], 400), ("low", "mid", "high")),
    )


@st.composite
def scored_streams(draw: st.DrawFn) -> tuple[Reference, list[EventBatch]]:
    """Either reference; scores anywhere in [0, 1], on bin edges, tied or missing; live
    columns of the 3-class model in another order than the reference's."""
    ref = draw(st.sampled_from(property_references()))
    n = draw(st.integers(1, 150))
    gaps = st.one_of(
        st.just(0), st.integers(0, 2_000), st.integers(0, 40_000), st.integers(0, 400_000)
    )
    t, ts = cf.T0_MS + draw(st.integers(0, 59_999)), []
    for _ in range(n):
        t += draw(gaps)
        ts.append(t - draw(st.sampled_from([0, 0, 0, 1, 30_000, 70_000, 200_000])))
    edges = [e for e in ref.channel_edges.ravel().tolist() if e != math.inf]
    value = st.one_of(st.floats(0, 1), st.sampled_from(edges), st.sampled_from([0.5, math.nan]))
    if ref.channels == ("score",):
        labels = ("0", "1")
        p = draw(
            st.lists(st.one_of(st.floats(0, 1), st.sampled_from(edges)), min_size=n, max_size=n)
        )
        scores = two_class(np.array(p))
    else:
        labels = ("high", "low", "mid")
        rows = draw(st.lists(st.lists(value, min_size=3, max_size=3), min_size=n, max_size=n))
        scores = np.array(rows, np.float64)
    batch = events(ts, [CALLERS[i % 100] for i in range(n)], scores=scores, score_labels=labels)
    ok = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    batch = dataclasses.replace(batch, status=np.where(ok, 200, 500).astype(np.int32))
    cuts = sorted(set(draw(st.lists(st.integers(0, n), max_size=5))) | {0, n})
    return ref, [batch.take(np.arange(a, b)) for a, b in itertools.pairwise(cuts)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scored_streams())
def test_psi_matches_a_naive_row_at_a_time_reference(
    spec: tuple[Reference, list[EventBatch]],
) -> None:
    ref, stream = spec
    det = PSI(window_s=180, hop_s=60, min_events=5, clear_windows=3)
    naive = NaivePSI(ref, 180, 60, min_events=5)
    refs = {("m0", ""): ref}
    metrics: dict[tuple[int, int, str], tuple[float, int]] = {}
    alerts = []
    max_ts = -(2**62)
    for b in stream:
        det.update(DetectorInput(b, {}, KeySpace(), 0, {}, refs))
        naive.update(b)
        max_ts = max(max_ts, int(b.ts_ms.max())) if b.n else max_ts
        out = det.advance(max_ts - cf.LATENESS_MS)
        naive.advance(max_ts - cf.LATENESS_MS)
        for m in out.metrics:
            key = (m.window_start_ms, m.window_end_ms, m.feature)
            assert key not in metrics  # evaluated once
            metrics[key] = (m.value, m.event_count)
        alerts += out.alerts
    assert det.late_events_total == naive.late
    assert metrics.keys() == naive.metrics.keys()
    for key, (value, count) in metrics.items():
        assert count == naive.metrics[key][1]
        assert value == pytest.approx(naive.metrics[key][0], abs=1e-9)
    assert [(a.status, a.ts_ms) for a in alerts] == [(s, t) for s, t, _ in naive.alerts]
    for a, (_, _, value) in zip(alerts, naive.alerts, strict=True):
        assert a.score == pytest.approx(value, abs=1e-9)
        window = (a.ts_ms - 180_000, a.ts_ms, a.evidence["channel"])  # the deciding channel
        assert metrics[window][0] == pytest.approx(value, abs=1e-9)
