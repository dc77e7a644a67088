"""Per-key state follows partitions through saved state: two consumers in one process share the
store, one leaves and later rejoins, and the per-key results equal a one-consumer replay."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from detectors.abuse.rate_spike.state import COLUMNS
from detectors.registry import create_all
from schemas.timestamps import parse_ts
from streams.sim.simulate import simulate
from streams.store.store import Store
from streams.worker.loop import Worker, WorkerSettings
from tests.support.kafka import (
    MockCluster,
    RecordingWorker,
    Runner,
    events,
    keys_of,
    run_worker_until,
    source,
    wait_for,
)

PER_KEY = {"api_key", "client_ip", "session"}
SETTINGS = WorkerSettings(batch_max=1_000, checkpoint_s=0.5, poll_timeout_s=0.1)


@pytest.fixture
def cluster() -> MockCluster:  # type: ignore[misc]
    mock = MockCluster()
    yield mock
    mock.close()


def ts_ms(event: dict[str, Any]) -> int:
    ts = event["ts"]
    return ts if isinstance(ts, int) else (parse_ts(ts) or 0)


def traffic() -> list[bytes]:
    """Simulated traffic, then a tail half an hour later on every partition, so every bucket
    and episode of the traffic closes in both runs whatever their watermarks were."""
    lines = events(8_000, seed=12)
    last = max(ts_ms(orjson.loads(line)) for line in lines)
    tail, _ = simulate("default", 400, 13, start_ms=last + 1_800_000)
    return lines + list(tail)


def population_file(lines: list[bytes], path: Path) -> dict[str, float]:
    """The population baseline, written to a file and read back as both runs load it: the
    99th percentile of per-minute request counts per api key and per client IP."""
    highs = {}
    for et, field in (("api_key", "api_key_id"), ("client_ip", "client_ip")):
        per_bucket: Counter[tuple[str, int]] = Counter()
        for line in lines:
            event = orjson.loads(line)
            per_bucket[(event[field], ts_ms(event) // 60_000)] += 1
        highs[et] = float(np.percentile(list(per_bucket.values()), 99))
    path.write_bytes(orjson.dumps(highs))
    return dict(orjson.loads(path.read_bytes()))


def detectors(highs: dict[str, float]) -> list[Any]:
    return create_all({"abuse.rate_spike": {"population_high": highs}})


def per_key_results(store: Store, names: list[str]) -> dict[str, Any]:
    """Alerts of per-key detectors, and the latest saved per-key counters of rate_spike."""
    alerts = store.query(
        "SELECT detector, entity_type, entity, alert_id, status, event_count, first_seen, "
        "last_seen, score FROM alerts FINAL WHERE detector IN {d:Array(String)} "
        "ORDER BY alert_id",
        {"d": names},
    ).result_rows
    dtype = np.dtype([(n, t) for n, (t, _) in COLUMNS.items()])
    state = store.query(
        "SELECT entity_type, key, argMax(data, seq), argMax(deleted, seq) FROM detector_state "
        "WHERE detector = 'abuse.rate_spike' AND partition >= 0 "
        "AND entity_type IN ('api_key', 'client_ip') GROUP BY entity_type, key",
        binary=True,
    ).result_rows
    counters = {
        (et.decode(), key.decode()): np.frombuffer(data, dtype)[0].tolist()
        for et, key, data, deleted in state
        if not deleted
    }
    return {"alerts": alerts, "counters": counters}


@pytest.mark.slow
def test_state_follows_partitions_and_per_key_results_equal_a_one_consumer_replay(
    cluster: MockCluster, tmp_path: Path
) -> None:
    lines = traffic()
    highs = population_file(lines, tmp_path / "population.json")
    per_key = [d.name for d in detectors(highs) if PER_KEY & set(d.entity_types)]
    excluded = [d.name for d in detectors(highs) if d.name not in per_key]
    print(f"compared: {per_key}; model-wide, excluded: {excluded}")

    # the one-consumer replay
    cluster.produce("replay.v1", lines, keys_of(lines))
    ends = {p: hi for p, (_, hi) in cluster.watermarks("replay.v1").items()}
    with Store(f"chdb:{tmp_path / 'one'}") as store:
        src = source(cluster, "replay.v1", "one")
        try:
            worker = Worker(store, src, detectors(highs), SETTINGS)
            run_worker_until(worker, lambda w: w.next_offsets == ends, 120)
        finally:
            src.close()
        expected = per_key_results(store, per_key)
    assert expected["alerts"], "the traffic raises per-key alerts"

    # two consumers: A alone, B joins, B leaves, B rejoins
    topic, group = "moving.v1", "two"
    cuts = [0, 2_500, 5_000, 7_000, len(lines)]
    lock = threading.RLock()
    runners: list[Runner] = []

    def start() -> RecordingWorker:
        src = source(cluster, topic, group)
        w = RecordingWorker(lock, store, src, detectors(highs), SETTINGS)
        runners.append(Runner(w, src))
        runners[-1].start()
        return w

    def alive() -> None:
        for r in runners:
            r.check()

    def feed(phase: int) -> None:
        part = lines[cuts[phase] : cuts[phase + 1]]
        cluster.produce(topic, part, keys_of(part))
        wait_for(lambda: cluster.caught_up(topic, group), 120, f"phase {phase}", alive)

    with Store(f"chdb:{tmp_path / 'two'}") as store:
        cluster.create_topic(topic)
        try:
            a = start()
            feed(0)
            b = start()
            wait_for(lambda: bool(a.revoked and b.assigned), 60, "B joining", alive)
            feed(1)
            b.stop_requested.set()  # B leaves the group: A gets its partitions back
            runners[1].join(60)
            wait_for(lambda: len(a.assigned) >= 2, 60, "A taking B's partitions", alive)
            feed(2)
            b2 = start()  # B rejoins
            wait_for(lambda: len(a.revoked) >= 2 and bool(b2.assigned), 60, "B rejoining", alive)
            feed(3)
        finally:
            for r in runners:
                r.worker.stop_requested.set()
            for r in runners:
                r.join(60)
        alive()
        got = per_key_results(store, per_key)
    moved = [parts for parts, _, _ in b.assigned] + [parts for parts, _, _ in b2.assigned]
    print(f"moved to B and back, then to B again: {moved}; {len(got['counters'])} keys compared")
    assert all(moved) and set().union(*moved) < {0, 1, 2, 3}, moved
    assert a.counters.events_total + b.counters.events_total + b2.counters.events_total == len(
        lines
    )
    assert got["counters"] == expected["counters"], "per-key counters follow the partitions"
    assert got["alerts"] == expected["alerts"], "per-key alerts equal the one-consumer replay"
