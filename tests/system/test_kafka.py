"""The Kafka source against confluent-kafka's mock cluster: a worker process end to end with
rejects on the DLQ, a retention gap recorded and skipped, a new group starting at the log start,
and partitions moving between two workers with their state."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from detectors.registry import create_all
from streams.sources.base import SourceError
from streams.sources.kafka import KafkaSource, open_kafka
from streams.sources.kafka_config import config_from_env
from streams.sources.retention_gap import RETENTION_GAP_DETECTOR
from streams.store.store import Store
from tests.support.kafka import (
    SETTINGS,
    MockCluster,
    RecordingWorker,
    Runner,
    WorkerProcess,
    event_ids,
    events,
    keys_of,
    produce_paced,
    run_to_end,
    source,
    wait_for,
)

BAD = [
    (b"not json at all", "bad_json"),
    (b'{"schema_version":1,"event_id":"dup","event_id":"dup2","ts":1,"model_id":"m",'
     b'"api_key_id":"k"}', "duplicate_key"),
    (b'{"schema_version":1,"event_id":"nan","ts":1767225600000,"model_id":"m",'
     b'"api_key_id":"k","latency_ms":NaN}', "non_finite_number"),
    (b'{"schema_version":1,"event_id":"nokey","ts":1767225600000,"model_id":"m"}',
     "missing_field"),
]  # fmt: skip


def padded(n: int, seed: int, pad_bytes: int = 7_000) -> list[bytes]:
    """Large valid events, to push a partition past the mock cluster's ~5 MiB quickly."""
    out = []
    for line in events(n, seed):
        event = orjson.loads(line)
        event["attributes"] = {"pad": "x" * pad_bytes}
        out.append(orjson.dumps(event))
    return out


def as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


@pytest.fixture
def worker_process(cluster: MockCluster, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(source: str, store_dir: Path, *args: str) -> WorkerProcess:
        proc = WorkerProcess(source, store_dir, tmp_path / f"logs{len(started)}", *args)
        started.append(proc)
        return proc

    yield start
    for proc in started:  # before the cluster goes (fixture order)
        proc.kill()


# --------------------------------------------------------------------------------- spec parsing


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("kafka://", "no broker address"),
        ("kafka://broker:9092", "no topic"),
        ("kafka://broker:9092/", "no topic"),
        ("kafka://broker/events", "broker address 'broker' is not HOST:PORT"),
        ("kafka://broker:99999/events", "is not HOST:PORT"),
        ("kafka://a:1,,b:2/events", "broker address '' is not HOST:PORT"),
        ("kafka://broker:9092/bad topic", "is not a valid Kafka topic name"),
        ("kafka://broker:9092/a/b", "is not a valid Kafka topic name"),
        (
            "kafka://broker:9092/events?grup=x",
            "unknown parameter 'grup' (known: group, start_from)",
        ),
        ("kafka://broker:9092/events?group=", "parameter 'group' is empty"),
        ("kafka://broker:9092/events?group=a&group=b", "parameter 'group' given twice"),
        ("kafka://broker:9092/events?start_from=middle", "is not earliest or latest"),
        ("kafka://broker:9092/events#frag", "unexpected fragment"),
        ("http://broker:9092/events", "not a kafka:// source"),
    ],
)
def test_kafka_spec_errors_say_what_is_wrong_and_what_is_expected(spec: str, message: str) -> None:
    with pytest.raises(SourceError) as err:
        open_kafka(spec)
    assert message in str(err.value)
    assert "expected kafka://HOST:PORT[,HOST:PORT]/TOPIC" in str(err.value)


def test_kafka_source_refuses_config_that_would_commit_behind_the_checkpoint() -> None:
    with pytest.raises(SourceError, match=r"enable\.auto\.commit"):
        KafkaSource("127.0.0.1:1", "t", config={"enable.auto.commit": "true"})


def test_kafka_config_from_env_maps_names_and_reads_secret_files(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    env = {
        "INFERWATCH_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "INFERWATCH_KAFKA_SASL_PASSWORD_FILE": str(secret),
        "INFERWATCH_STORE": "chdb:x",
    }
    assert config_from_env(env) == {"sasl.mechanism": "SCRAM-SHA-512", "sasl.password": "s3cret"}
    with pytest.raises(SourceError, match="cannot read"):
        config_from_env({"INFERWATCH_KAFKA_SSL_KEY_PASSWORD_FILE": str(tmp_path / "missing")})


def test_kafka_source_on_a_missing_topic_fails_with_a_clear_error(cluster: MockCluster) -> None:
    cluster.produce("exists", [b"x"])
    src = source(cluster, "missing.topic", "g")
    try:
        with pytest.raises(
            SourceError, match=r"topic 'missing\.topic' does not exist on 127\.0\.0\.1"
        ):
            for _ in range(50):
                src.poll(10, 0.2)
    finally:
        src.close()


# --------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_kafka_worker_process_stores_every_event_once_and_sends_rejects_to_the_dlq(
    cluster: MockCluster, worker_process: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    topic, group, n = "inferwatch.events.v1", "e2e", 20_000
    lines = events(n, seed=5)
    head = 2_000
    cluster.produce(topic, lines[:head], keys_of(lines[:head]))  # the topic exists from here
    cluster.produce(topic, [raw for raw, _ in BAD], [b"bad"] * len(BAD))
    store_dir = tmp_path / "store"
    worker = worker_process(
        cluster.source(topic, group), store_dir, "--checkpoint-s", "1", "--batch-size", "2000"
    )
    # ~780-byte events, 4 partitions: unpaced, 20,000 would come close to the ~5 MiB each keeps
    produce_paced(cluster, topic, lines[head:], group, max_lag=6_000, alive=worker.check_alive)
    wait_for(lambda: cluster.caught_up(topic, group), 120, "the worker to commit everything",
             worker.check_alive)  # fmt: skip

    # while the worker runs, the CLI reaches it through its API (it owns the store)
    out = subprocess.run(
        [sys.executable, "-m", "streams.cli", "alerts", "--store", f"chdb:{store_dir}",
         "--format", "jsonl"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    alerts = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert alerts, "the simulated incidents raise alerts, served by the running worker"
    assert all(a["detector"] != RETENTION_GAP_DETECTOR for a in alerts)

    assert worker.terminate() == 0, worker.stderr
    assert f"events {n:,}  rejected {len(BAD)}" in worker.stdout  # each read exactly once
    with Store(f"chdb:{store_dir}") as store:
        stored = store.query("SELECT event_id, count() FROM events FINAL GROUP BY event_id")
        counts = dict(stored.result_rows)
        dead = store.query(
            "SELECT reason, raw, raw_bytes, source_partition, source_offset FROM dead_letters FINAL"
        ).result_rows
    assert set(counts) == event_ids(lines) and set(counts.values()) == {1}
    # the table keeps no message (streams/worker/dead_letters.py); the DLQ topic keeps each whole,
    # at
    # the partition and offset the table names
    assert all(as_bytes(raw) == b"" for _, raw, _, _, _ in dead)
    dead_rows = sorted((reason, size, p, off) for reason, _, size, p, off in dead)
    on_topic = []
    for m in cluster.read_all(f"{topic}.dlq"):
        headers = {k: v.decode() for k, v in m.headers()}
        assert headers["detail"]
        row = (headers["reason"], m.value(), int(headers["source_partition"]))
        on_topic.append((*row, int(headers["source_offset"])))
    assert sorted((reason, raw) for reason, raw, _, _ in on_topic) == sorted(
        (reason, raw) for raw, reason in BAD
    )
    assert sorted((r, len(raw), p, off) for r, raw, p, off in on_topic) == dead_rows
    assert cluster.committed(topic, group) == {
        p: hi for p, (_, hi) in cluster.watermarks(topic).items()
    }


# --------------------------------------------------------------------------------- retention


@pytest.mark.slow
def test_kafka_retention_gap_is_recorded_alerted_and_skipped(
    cluster: MockCluster, tmp_path: Path
) -> None:
    topic, group = "gap.events.v1", "gap"
    first = events(400, seed=2)
    cluster.produce(topic, first, keys_of(first))
    with Store(f"chdb:{tmp_path / 'store'}") as store:
        run_to_end(store, cluster, topic, group)
        committed = cluster.committed(topic, group)
        # retention deletes past the committed offset of partition 0 while no one reads
        big = padded(1_200, seed=3)
        cluster.produce(topic, big, partition=0)
        low, high = cluster.watermarks(topic)[0]
        assert low > committed[0], "the mock cluster kept more than expected"

        worker = run_to_end(store, cluster, topic, group)

        assert worker.counters.lost_events_total == low - committed[0]
        gaps = store.query(
            "SELECT source_partition, source_offset, gap_to FROM dead_letters FINAL "
            "WHERE reason = 'retention_gap'"
        ).result_rows
        assert gaps == [(0, committed[0], low)]
        alerts = store.query(
            "SELECT entity_type, entity, severity, status, evidence FROM alerts FINAL "
            "WHERE detector = {d:String}",
            {"d": RETENTION_GAP_DETECTOR},
        ).result_rows
        assert [a[:4] for a in alerts] == [("global", f"{topic}/0", "high", "firing")]
        assert orjson.loads(alerts[0][4])["lost_events"] == low - committed[0]
        # consumption went on from the log start
        kept = store.query(
            "SELECT count(), min(source_offset) FROM events FINAL WHERE source_partition = 0 "
            "AND source_offset >= {lo:Int64}",
            {"lo": committed[0]},
        ).result_rows[0]
        assert kept == (high - low, low)
    assert cluster.committed(topic, group)[0] == high


@pytest.mark.slow
def test_kafka_new_group_starts_at_the_log_start_without_a_gap(
    cluster: MockCluster, tmp_path: Path
) -> None:
    topic = "fresh.events.v1"
    cluster.produce(topic, padded(1_200, seed=4), partition=0)  # log start of 0 is now > 0
    small = events(300, seed=5)
    cluster.produce(topic, small, keys_of(small))
    marks = cluster.watermarks(topic)
    assert marks[0][0] > 0
    with Store(f"chdb:{tmp_path / 'store'}") as store:
        worker = run_to_end(store, cluster, topic, "fresh")
        firsts = dict(
            store.query(
                "SELECT source_partition, min(source_offset) FROM events FINAL "
                "GROUP BY source_partition"
            ).result_rows
        )
        gaps = store.query(
            "SELECT count() FROM dead_letters FINAL WHERE reason = 'retention_gap'"
        ).result_rows[0][0]
    assert worker.counters.lost_events_total == 0 and gaps == 0
    assert worker.counters.events_total == sum(hi - lo for lo, hi in marks.values())
    assert firsts == {p: lo for p, (lo, hi) in marks.items() if hi > lo}


# --------------------------------------------------------------------------------- rebalancing


@pytest.mark.slow
def test_kafka_revoked_partitions_move_with_their_state_to_the_second_worker(
    cluster: MockCluster, tmp_path: Path
) -> None:
    topic, group = "moving.events.v1", "moving"
    first, second = events(3_000, seed=6), events(3_000, seed=7)
    cluster.produce(topic, first, keys_of(first))
    lock = threading.RLock()
    runners: list[Runner] = []
    with Store(f"chdb:{tmp_path / 'store'}") as store:
        try:
            for _ in range(2):
                src = source(cluster, topic, group)
                worker = RecordingWorker(lock, store, src, create_all(), SETTINGS)
                runners.append(Runner(worker, src))
                runners[-1].start()

                def alive() -> None:
                    for r in runners:
                        r.check()

                if len(runners) == 1:
                    wait_for(lambda: cluster.caught_up(topic, group), 90, "worker A", alive)
                    a_saved = cluster.committed(topic, group)
            a, b = (r.worker for r in runners)
            wait_for(lambda: bool(a.revoked and b.assigned), 60, "the rebalance", alive)
            cluster.produce(topic, second, keys_of(second))
            wait_for(lambda: cluster.caught_up(topic, group), 90, "both workers", alive)
        finally:
            for r in runners:
                r.worker.stop_requested.set()
            for r in runners:
                r.join(60)
        for r in runners:
            r.check()
        counts = dict(
            store.query("SELECT event_id, count() FROM events FINAL GROUP BY event_id").result_rows
        )
    # (later entries, if any, come from the rebalance when the workers stop)
    assert a.assigned[0][0] == {0, 1, 2, 3}
    moved, before, after = a.revoked[0]
    assert moved and moved < {0, 1, 2, 3}  # cooperative: only some partitions move
    assert before and not after  # A checkpointed their state, then dropped it
    parts, loaded, positions = b.assigned[0]
    assert parts == moved and before <= loaded  # B loaded it before reading anything
    assert positions == {p: off for p, off in a_saved.items() if p in moved}  # where A stopped
    # every event read exactly once, by one of the two
    assert a.counters.events_total + b.counters.events_total == len(first) + len(second)
    assert set(counts) == event_ids(first + second) and set(counts.values()) == {1}
