"""abuse.rate_spike: behaviour through the public interface, and the naive reference that the
conformance suite compares it with (``NAIVE_REFERENCE``, ``NAIVE_PARAMS``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detectors.abuse.rate_spike.detector import RateSpike
from detectors.abuse.rate_spike.state import COLUMNS
from detectors.base import AlertChange, Output
from schemas.batch import EventBatch
from tests.support.conformance import (
    T0_MS,
    Runner,
    make_batch,
    normalise,
    stream,
)
from tests.support.naive_rate_spike import NaiveRateSpike

MINUTE = 60_000

# --- the naive reference: one plain object per key, one event at a time ---------------------


# --- behaviour --------------------------------------------------------------------------------


def poisson_calls(
    rng: np.random.Generator, key: str, per_minute: float, start_min: float, minutes: float
) -> tuple[list[int], list[str]]:
    n = rng.poisson(per_minute * minutes)
    ts = T0_MS + int(start_min * MINUTE) + rng.integers(0, int(minutes * MINUTE), n)
    return sorted(ts.tolist()), [key] * n


def batches_of(
    calls: list[tuple[list[int], list[str]]], size: int = 5_000, ips: dict[str, str] | None = None
) -> list[EventBatch]:
    ts = np.concatenate([np.asarray(t, np.int64) for t, _ in calls])
    keys = np.concatenate([np.asarray(k, object) for _, k in calls])
    order = np.argsort(ts, kind="stable")
    ts, keys = ts[order], keys[order]
    ip = [(ips or {}).get(k, "") for k in keys.tolist()]
    whole = make_batch(ts.tolist(), keys.tolist(), client_ip=ip, tenant=["t"] * ts.size)
    return [whole.take(np.arange(i, min(i + size, ts.size))) for i in range(0, ts.size, size)]


def alerts_for(log: list[tuple[EventBatch, Output]], entity: str) -> list[AlertChange]:
    return [a for _, out in log for a in out.alerts if a.entity == entity]


def population(rng: np.random.Generator, minutes: float, keys: int = 60) -> list[Any]:
    rates = np.geomspace(0.5, 300, keys)
    return [poisson_calls(rng, f"pop_{i}", r, 0, minutes) for i, r in enumerate(rates)]


def test_rate_spike_heavy_honest_caller_does_not_fire() -> None:
    rng = np.random.default_rng(1)
    calls = [*population(rng, 120), poisson_calls(rng, "heavy", 2_000, 0, 120)]
    log = Runner(RateSpike()).run(batches_of(calls)).log
    assert alerts_for(log, "heavy") == []
    assert all(not a.entity.startswith("pop_") for _, o in log for a in o.alerts)


def test_rate_spike_heavy_caller_going_5x_fires() -> None:
    rng = np.random.default_rng(2)
    calls = [
        *population(rng, 60),
        poisson_calls(rng, "heavy", 500, 0, 40),
        poisson_calls(rng, "heavy", 2_500, 40, 5),
        poisson_calls(rng, "heavy", 500, 45, 15),
    ]
    log = Runner(RateSpike()).run(batches_of(calls)).log
    alerts = alerts_for(log, "heavy")
    assert alerts, "a heavy caller going 5x must fire"
    first = alerts[0]
    assert first.status == "firing" and first.severity == "medium"
    assert 40 * MINUTE <= first.ts_ms - T0_MS < 42 * MINUTE
    assert first.episode_start_ms == first.ts_ms // MINUTE * MINUTE
    assert first.evidence["mean"] == pytest.approx(500, rel=0.1)
    assert first.evidence["threshold"] == pytest.approx(2_000, rel=0.1)
    assert alerts[-1].status == "resolved"
    assert {a.episode_start_ms for a in alerts} == {first.episode_start_ms}


def test_rate_spike_light_caller_going_20x_fires() -> None:
    rng = np.random.default_rng(3)
    calls = [
        *population(rng, 40),
        poisson_calls(rng, "light", 2, 0, 30),
        poisson_calls(rng, "light", 40, 30, 3),
    ]
    log = Runner(RateSpike()).run(batches_of(calls)).log
    alerts = alerts_for(log, "light")
    # judged against its own quiet history (about 2 a minute), well below the 40 it sends
    assert alerts and 10 <= alerts[0].evidence["threshold"] < 20
    assert alerts[0].title == "Request-rate spike on api key light"


def test_rate_spike_cold_key_with_steady_moderate_rate_does_not_fire() -> None:
    rng = np.random.default_rng(4)
    calls = [*population(rng, 90), poisson_calls(rng, "newcomer", 100, 30, 60)]
    log = Runner(RateSpike()).run(batches_of(calls, size=2_000)).log
    assert alerts_for(log, "newcomer") == []


def test_rate_spike_cold_key_far_above_the_population_fires() -> None:
    rng = np.random.default_rng(5)
    calls = [*population(rng, 40), poisson_calls(rng, "flood", 3_000, 30, 2)]
    log = Runner(RateSpike()).run(batches_of(calls)).log
    alerts = alerts_for(log, "flood")
    assert alerts and alerts[0].evidence["population_high"] is not None
    assert "new caller" in alerts[0].summary


def test_rate_spike_does_not_judge_cold_keys_before_a_population_exists() -> None:
    rng = np.random.default_rng(6)
    log = Runner(RateSpike()).run(batches_of([poisson_calls(rng, "k", 3_000, 0, 3)])).log
    assert all(not o.alerts and not o.findings for _, o in log)


def test_rate_spike_idle_key_is_judged_as_cold_when_it_returns() -> None:
    rng = np.random.default_rng(7)
    calls = [
        *population(rng, 200),
        poisson_calls(rng, "nightly", 150, 0, 20),
        poisson_calls(rng, "nightly", 150, 180, 20),  # back after 2 h 40 min
    ]
    log = Runner(RateSpike()).run(batches_of(calls)).log
    assert alerts_for(log, "nightly") == []


def counted(ts: list[int], key: str = "k", **kw: Any) -> EventBatch:
    return make_batch(ts, [key] * len(ts), tenant=["t"] * len(ts), **kw)


def small() -> RateSpike:
    return RateSpike(
        bucket_s=10, warmup_buckets=2, k_sigma=1, ratio=2, min_count=3, min_population=0
    )


def test_rate_spike_out_of_order_events_count_into_the_current_bucket() -> None:
    det = small()
    r = Runner(det)
    r.feed(counted([T0_MS + i * 10_000 for i in range(4)]))  # warm: one call per bucket
    t = T0_MS + 40_000
    # the key is in bucket 4; three late events of bucket 3 arrive after its first event
    out = r.feed(counted([t, t - 1, t - 2, t - 3], offset0=10))
    assert [str(e) for e in r.log[-1][0].event_id[out.findings[0].rows]] == ["e13"]
    assert out.alerts[0].episode_start_ms == t


def test_rate_spike_episode_resolves_after_one_quiet_bucket_and_reopens_later() -> None:
    det = small()
    r = Runner(det)
    warm = [T0_MS + i * 10_000 for i in range(4)]
    spike1 = [T0_MS + 40_000 + i for i in range(5)]
    spike2 = [T0_MS + 60_000 + i for i in range(10)]  # bucket 6: one quiet bucket between
    out = det.update(r.inputs(counted(warm + spike1 + spike2)))
    statuses = [(a.status, a.episode_start_ms - T0_MS) for a in out.alerts]
    assert statuses == [("firing", 40_000), ("resolved", 40_000), ("firing", 60_000)]
    assert out.alerts[1].resolved_ms == T0_MS + 60_000  # cleared when the quiet bucket ended
    assert out.alerts[1].ts_ms == out.alerts[0].ts_ms  # ts stays the crossing time
    assert det.advance(T0_MS + 79_999).alerts == ()
    (resolved,) = det.advance(T0_MS + 80_000).alerts
    assert resolved.status == "resolved" and resolved.event_count == 10 - 3


def test_rate_spike_sends_one_change_per_episode_per_batch() -> None:
    det = small()
    r = Runner(det)
    r.feed(counted([T0_MS + i * 10_000 for i in range(4)]))
    burst = [T0_MS + 40_000 + i for i in range(40)]
    outs = [r.feed(counted(burst[i : i + 10], offset0=100 + i), advance=False) for i in (0, 10)]
    assert [len(o.alerts) for o in outs] == [1, 1]
    first, update = outs[0].alerts[0], outs[1].alerts[0]
    assert (first.event_count, update.event_count) == (10 - 3, 20 - 3)
    assert first.ts_ms == update.ts_ms and first.episode_start_ms == update.episode_start_ms
    assert update.sample_event_ids == first.sample_event_ids[:5]
    assert len(update.sample_event_ids) == 5


def test_rate_spike_client_ips_are_keyed_per_partition_and_blank_ips_ignored() -> None:
    det = small()
    r = Runner(det)
    ts = [T0_MS + i for i in range(8)]
    keys = [f"k{i}" for i in range(8)]  # many keys, so only the IP key can spike
    ip = ["10.0.0.1"] * 4 + [""] * 4
    part = [0, 0, 1, 1, 0, 0, 0, 0]
    r.feed(make_batch(ts, keys, client_ip=ip, partition=part))
    snap = det.snapshot(r.keyspace)
    ip_rows = next(s for s in snap.keyed if s.entity_type == "client_ip")
    assert sorted(ip_rows.keys) == ["0|10.0.0.1", "1|10.0.0.1"]


def test_rate_spike_one_finding_per_event_with_the_higher_score() -> None:
    det = small()
    r = Runner(det)
    r.feed(counted([T0_MS + i * 10_000 for i in range(4)], client_ip=["1.2.3.4"] * 4))
    burst = [T0_MS + 40_000 + i for i in range(6)]
    out = r.feed(counted(burst, client_ip=["1.2.3.4"] * 6, offset0=10))
    (f,) = out.findings
    assert f.rows.tolist() == [3, 4, 5]
    assert f.score.tolist() == [4 / 3, 5 / 3, 6 / 3]
    assert [a.entity_type for a in out.alerts] == ["api_key", "client_ip"]
    assert '"entity_type":"api_key"' in f.evidence[0] and '"threshold":3.0' in f.evidence[0]


def test_rate_spike_evict_forgets_the_key() -> None:
    det = small()
    r = Runner(det)
    r.feed(counted([T0_MS + i * 10_000 for i in range(4)] + [T0_MS + 40_000 + i for i in range(9)]))
    slots = np.array([r.keyspace["api_key"].slot_of("k")])
    det.evict("api_key", slots)
    assert det.advance(T0_MS + 10 * MINUTE).alerts == ()
    assert det.snapshot(r.keyspace).keyed[0].keys == ()
    row = det.tables["api_key"].cols.rows(slots)[0]
    assert all(row[name] == default for name, (_, default) in COLUMNS.items())


def test_rate_spike_rejects_bad_parameters_with_what_it_expected() -> None:
    with pytest.raises(ValueError, match=r"invalid bucket_s, ratio; expected bucket_s >= 1"):
        RateSpike(bucket_s=0, ratio=0.5)


def test_rate_spike_fires_on_the_conformance_stream() -> None:
    """The shared conformance checks compare alerts too; make sure there are some."""
    normal = normalise(Runner(RateSpike()).run(stream(seed=7)).log, "abuse.rate_spike")
    assert normal.findings and normal.alerts
    assert any(state[0] == "resolved" for state in normal.alerts.values())


def test_naive_reference_agrees_on_a_long_realistic_stream() -> None:
    batches = stream(seed=11, minutes=40)
    naive = NaiveRateSpike()
    r = Runner(RateSpike())
    for b in batches:
        r.feed(b)
        naive.update(b)
        naive.advance(r.watermark)
    assert normalise(r.log, "abuse.rate_spike") == naive.normal()


@settings(max_examples=300, deadline=None)
@given(
    buckets=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 40)), min_size=1, max_size=25),
    history=st.sampled_from([1, 2, 4, 9, 30]),
    cuts=st.integers(1, 4),
)
def test_rate_spike_history_matches_folding_one_bucket_at_a_time(
    buckets: list[tuple[int, int]], history: int, cuts: int
) -> None:
    params = {"bucket_s": 10, "history_buckets": history, "min_population": 0}
    det, naive = RateSpike(**params), NaiveRateSpike(**params)
    ts, b = [], 0
    for count, gap in buckets:
        ts.extend(T0_MS + b * 10_000 + i for i in range(count))
        b += gap
    ts.append(T0_MS + b * 10_000)  # opens the bucket after the last one: all are folded
    whole = counted(ts)
    r = Runner(det)
    for part in np.array_split(np.arange(whole.n), cuts):
        r.feed(whole.take(part))
    naive.update(whole)
    (row,) = next(s for s in det.snapshot(r.keyspace).keyed if s.entity_type == "api_key").data
    key = naive.keys["api_key"]["k"]
    assert (int(row["bucket"]), int(row["count"]), int(row["n_buckets"])) == (
        key.bucket,
        key.count,
        key.n,
    )
    assert float(row["mean"]) == pytest.approx(key.mean, rel=1e-9, abs=1e-9)
    assert float(row["var"]) == pytest.approx(key.var, rel=1e-7, abs=1e-7)
    assert float(row["threshold"]) == key.thr
