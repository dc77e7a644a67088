"""``pipeline.silent_source`` (issue 5, item 4): a model or gateway that stops is reported once,
resolves when it comes back; steady, bursty-on-a-schedule and sparse honest sources are not;
any cut of the stream into batches gives the same alerts."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np
import orjson

from detectors.base import DetectorInput, KeySpace
from detectors.pipeline.silent_source import SilentSource
from schemas.batch import EventBatch, empty_batch

MIN, H = 60_000, 3_600_000


def stream(seed: int, hours: int = 60, stop: tuple[str, int, int] | None = None) -> EventBatch:
    """Events of four sources in arrival order (a little out of order, as partitions are):
    ``steady`` ~1/s, ``batchjob`` 500 events in the first 5 minutes of every hour, ``sparse``
    ~1 every 10 minutes, and gateway ``gw-eu`` (model ``chat``) ~1 every 20 s. ``stop`` =
    (source, from_ms, to_ms) removes a source's events in that span."""
    rng = np.random.default_rng(seed)
    end = hours * H
    parts = [
        ("steady", np.sort(rng.uniform(0, end, hours * 3600)), ""),
        ("sparse", np.sort(rng.uniform(0, end, hours * 6)), ""),
        ("chat", np.sort(rng.uniform(0, end, hours * 180)), '{"gateway":"gw-eu"}'),
        (
            "batchjob",
            np.concatenate([h * H + np.sort(rng.uniform(0, 5 * MIN, 500)) for h in range(hours)]),
            "",
        ),
    ]
    ts, model, attrs = [], [], []
    for name, t, attr in parts:
        if stop is not None and stop[0] in (name, "gw-eu" if attr else None):
            t = t[(t < stop[1]) | (t >= stop[2])]
        ts.append(t)
        model += [name] * t.size
        attrs += [attr] * t.size
    all_ts = np.concatenate(ts).astype(np.int64)
    arrival = np.argsort(all_ts + rng.integers(0, 5_000, all_ts.size), kind="stable")
    b = empty_batch()
    n = all_ts.size
    return dataclasses.replace(
        b,
        ts_ms=all_ts[arrival],
        model_id=np.array(model, dtype=object)[arrival],
        attributes=np.array(attrs, dtype=object)[arrival],
        event_id=np.array([f"e{i}" for i in range(n)], dtype=object),
    )


def take(b: EventBatch, rows: slice) -> EventBatch:
    return dataclasses.replace(
        b,
        ts_ms=b.ts_ms[rows],
        model_id=b.model_id[rows],
        attributes=b.attributes[rows],
        event_id=b.event_id[rows],
    )


def run(b: EventBatch, cuts: list[int], det: SilentSource | None = None) -> list[Any]:
    det = det or SilentSource()
    out = []
    bounds = [0, *cuts, b.n]
    for lo, hi in itertools.pairwise(bounds):
        got = det.update(DetectorInput(take(b, slice(lo, hi)), {}, KeySpace(), 0))
        out += [(a.entity, a.status, a.ts_ms, a.resolved_ms) for a in got.alerts]
    return out


def test_honest_sources_of_every_rhythm_raise_nothing_over_two_days() -> None:
    for seed in range(3):
        assert run(stream(seed), [50_000, 100_000]) == []


def test_a_model_that_stops_is_reported_once_and_resolves_when_it_returns() -> None:
    b = stream(1, stop=("steady", 30 * H, 32 * H))
    alerts = run(b, [])
    assert [(e, s) for e, s, _, _ in alerts] == [("steady", "firing"), ("steady", "resolved")]
    (_, _, fired, _), (_, _, _, resolved) = alerts
    # a ~1/s source: its deadline is its last event plus 10 minutes (the floor), not hours
    assert 30 * H + 10 * MIN - 10_000 <= fired <= 30 * H + 10 * MIN
    assert 32 * H <= resolved <= 32 * H + 10_000


def test_a_scheduled_job_that_misses_its_runs_and_a_gateway_that_stops_are_reported() -> None:
    late = run(stream(2, stop=("batchjob", 40 * H, 50 * H)), [])
    assert [(e, s) for e, s, _, _ in late] == [("batchjob", "firing"), ("batchjob", "resolved")]
    gw = run(stream(3, stop=("gw-eu", 30 * H, 32 * H)), [])
    assert [(e, s) for e, s, _, _ in gw] == [
        ("gateway:gw-eu", "firing"),
        ("gateway:gw-eu", "resolved"),
    ]


def test_any_cut_into_batches_gives_the_same_alerts() -> None:
    b = stream(4, hours=50, stop=("sparse", 30 * H, 40 * H))
    whole = run(b, [])
    assert whole
    rng = np.random.default_rng(0)
    for _ in range(3):
        cuts = sorted(set(rng.integers(1, b.n, 40).tolist()))
        assert run(b, cuts) == whole
    # and through a snapshot and restore half-way
    det = SilentSource()
    first = run(take(b, slice(0, b.n // 2)), [], det)
    again = SilentSource()
    again.restore(det.snapshot(KeySpace()), KeySpace())
    assert first + run(take(b, slice(b.n // 2, b.n)), [], again) == whole


def test_evidence_names_the_last_event_and_the_usual_gap() -> None:
    b = stream(5, stop=("steady", 30 * H, 32 * H))
    det = SilentSource()
    alert = next(
        a for a in det.update(DetectorInput(b, {}, KeySpace(), 0)).alerts if a.status == "firing"
    )
    ev = orjson.loads(orjson.dumps(alert.evidence))
    assert ev["last_event_ms"] < 30 * H and ev["events_seen"] > 50
    assert 0 < ev["usual_gap_high_ms"] < 60_000
    assert alert.entity_type == "model" and alert.title == "Model steady went silent"


def test_sources_from_the_pipelines_model_views_equal_the_fallback() -> None:
    from types import SimpleNamespace

    from detectors.pipeline.silent_source import _sources

    b = stream(6, hours=2)
    fallback = _sources(DetectorInput(b, {}, KeySpace(), 0))
    models = sorted(set(b.model_id.tolist()))
    views = {m: SimpleNamespace(rows=np.flatnonzero(b.model_id == m)) for m in models}
    viewed = _sources(DetectorInput(b, {}, KeySpace(), 0, views))  # type: ignore[arg-type]
    assert fallback.keys() == viewed.keys() == {
        "model:steady", "model:sparse", "model:batchjob", "gateway:gw-eu"
    }  # fmt: skip
    for k in fallback:
        assert fallback[k].tolist() == viewed[k].tolist()
