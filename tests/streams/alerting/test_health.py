"""Pipeline-health alerts (issue 5, item 4): a dead-letter spike through a real worker and chdb,
consumer lag through the Kafka mock cluster, and the rules on an injected clock."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from detectors.registry import create_all
from streams.alerting.health import DLQ, LAG, PipelineHealth
from streams.sim.simulate import write as simulate_write
from streams.sources.base import FileSource
from streams.store.store import Store
from streams.worker.loop import Worker, WorkerSettings
from tests.support.kafka import SETTINGS as KAFKA_SETTINGS
from tests.support.kafka import MockCluster, events, keys_of, run_worker_until, source


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lag_must_stay_high_for_its_duration_and_resolves_when_it_falls() -> None:
    clock = Clock()
    h = PipelineHealth("kafka:x", lag_events=1_000, lag_s=60, clock=clock)
    assert h.check({0: 5_000}, 0, 0, 1) == []
    clock.now = 59
    assert h.check({0: 5_000, 1: 10}, 0, 0, 2) == []
    clock.now = 61
    (fired,) = h.check({0: 5_000}, 0, 0, 3)
    assert (fired["detector"], fired["status"]) == (LAG, "firing")
    assert fired["evidence"]["lag_messages"] == 5_000
    assert h.check({0: 4_000}, 0, 0, 4) == []
    (done,) = h.check({0: 10}, 0, 0, 5)
    assert done["status"] == "resolved" and done["alert_id"] == fired["alert_id"]
    clock.now = 62  # a dip resets the duration
    h.check({0: 5_000}, 0, 0, 6)
    clock.now = 100
    assert h.check({0: 5_000}, 0, 0, 7) == []


def test_a_dead_letter_spike_is_judged_against_the_usual_share() -> None:
    h = PipelineHealth("file:x")
    for _ in range(10):
        assert h.check({}, 100, 10_000, 1) == []  # 1% rejects is this producer's normal
    (fired,) = h.check({}, 1_200, 10_000, 2)  # 12%: past 5% and 10 x the usual 1%
    assert (fired["detector"], fired["status"]) == (DLQ, "firing")
    assert h.check({}, 600, 10_000, 3) == []  # not yet under half the bar
    (done,) = h.check({}, 100, 10_000, 4)
    assert done["status"] == "resolved"
    assert h.check({}, 99, 99, 5) == []  # fewer than 100 rejects: not a spike
    noisy = PipelineHealth("file:y")
    for _ in range(30):
        noisy.check({}, 200, 10_000, 1)  # a producer that usually loses 2%
    assert noisy.check({}, 1_500, 10_000, 2) == []  # 15%: past 5%, not 10 x 2%


def test_garbage_after_good_traffic_raises_a_dead_letter_spike_and_keeps_every_event(
    tmp_path: Path,
) -> None:
    good = tmp_path / "good.jsonl"
    simulate_write("quiet", 12_000, 3, good)
    lines = good.read_bytes().splitlines()
    garbage = [b'{"schema_version": 1, "event_id": ' + str(i).encode() for i in range(2_000)]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines[:6_000] + garbage + lines[6_000:]) + b"\n")
    settings = WorkerSettings(batch_max=1_000, checkpoint_events=2_000, checkpoint_s=3600)
    src = FileSource(path)
    try:
        with Store(f"chdb:{tmp_path / 'store'}") as store:
            counters = Worker(store, src, create_all(), settings).run()
            rows = store.query(
                "SELECT status, evidence FROM alerts FINAL WHERE detector = {d:String}",
                {"d": DLQ},
            ).result_rows
            stored = store.query("SELECT count() FROM events FINAL").result_rows[0][0]
    finally:
        src.close()
    assert (
        counters.events_total == stored == 12_000 and sum(counters.rejects_total.values()) == 2_000
    )
    ((status, evidence),) = rows
    assert status == "resolved" and json.loads(evidence)["at_firing"]["rejected"] >= 1_000


@pytest.mark.slow
def test_consumer_lag_above_the_threshold_is_raised_and_resolved(
    cluster: MockCluster,
    tmp_path: Path,
) -> None:
    topic, group = "lag.events.v1", "lag"
    lines = events(6_000, seed=9)
    cluster.produce(topic, lines, keys_of(lines))
    ends = cluster.watermarks(topic)
    settings = dataclasses.replace(
        KAFKA_SETTINGS, checkpoint_events=1_000, lag_alert_events=1_000, lag_alert_s=0
    )
    src = source(cluster, topic, group)
    try:
        with Store(f"chdb:{tmp_path / 'store'}") as store:
            worker = Worker(store, src, create_all(), settings)
            run_worker_until(
                worker,
                lambda w: all(w.next_offsets.get(p, -1) >= hi for p, (lo, hi) in ends.items()),
                timeout_s=90,
            )
            worker.checkpoint()  # caught up: the lag is gone
            rows = store.query(
                "SELECT status, evidence FROM alerts FINAL WHERE detector = {d:String}",
                {"d": LAG},
            ).result_rows
    finally:
        src.close()
    ((status, evidence),) = rows
    assert status == "resolved" and json.loads(evidence)["threshold"] == 1_000
