"""The file -> worker -> chdb spine: idempotent replays, resume, crash recovery, the store lock,
and alert/finding rows against the contracts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pyarrow as pa
import pytest

from detectors.registry import create_all
from schemas.decode import decode
from streams.api import queries
from streams.sim.simulate import write as simulate_write
from streams.sources.base import FileSource
from streams.store import rows as records
from streams.store.store import Store
from streams.worker.buffers import Buffers, EarlyWriter
from streams.worker.faults import Faults
from streams.worker.loop import FAULT_ENV, Worker, WorkerSettings
from tests.support.cli import ALERT_FIELDS, run_cli

EVENTS = 30_000
SETTINGS = WorkerSettings(batch_max=2_000, checkpoint_events=6_000, checkpoint_s=3600)


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("traffic") / "traffic.jsonl"
    simulate_write("default", EVENTS, 11, path)
    return path


def run_file(path: Path, store_dir: Path, from_start: bool = False) -> Any:
    source = FileSource(path)
    try:
        with Store(f"chdb:{store_dir}") as store:
            return Worker(store, source, create_all(), SETTINGS, from_start).run()
    finally:
        source.close()


def snapshot(store_dir: Path) -> dict[str, Any]:
    """Everything a query of the project can see, minus wall-clock columns."""
    with Store(f"chdb:{store_dir}") as store:

        def rows(sql: str) -> list[tuple[Any, ...]]:
            return sorted(tuple(r) for r in store.query(sql).result_rows)

        return {
            "counts": queries.counts(store),
            "events": rows("SELECT event_id, count() FROM events FINAL GROUP BY event_id"),
            "findings": rows(
                "SELECT finding_id, event_id, detector, label, score FROM findings FINAL"
            ),
            "alerts": rows(
                "SELECT alert_id, status, event_count, first_seen, last_seen, score "
                "FROM alerts FINAL"
            ),
            "metrics": rows(
                "SELECT model_id, metric, window_start, value FROM window_metrics FINAL"
            ),
        }


@pytest.fixture(scope="module")
def reference_run(traffic: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    store_dir = tmp_path_factory.mktemp("reference") / "store"
    run_file(traffic, store_dir)
    return snapshot(store_dir)


def test_worker_stores_every_event_once_and_raises_alerts(reference_run: dict[str, Any]) -> None:
    assert reference_run["counts"]["events"] == EVENTS
    assert all(n == 1 for _, n in reference_run["events"])
    assert reference_run["counts"]["alerts"] > 0
    assert reference_run["counts"]["findings"] > 0


def test_worker_replay_from_start_leaves_no_duplicates_and_same_ids(
    traffic: Path, tmp_path: Path, reference_run: dict[str, Any]
) -> None:
    store_dir = tmp_path / "store"
    run_file(traffic, store_dir)
    counters = run_file(traffic, store_dir, from_start=True)
    assert counters.events_total == EVENTS
    assert snapshot(store_dir) == reference_run


def test_worker_plain_rerun_resumes_at_saved_position(traffic: Path, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    run_file(traffic, store_dir)
    counters = run_file(traffic, store_dir)
    assert counters.events_total == 0


def test_worker_killed_mid_checkpoint_and_rerun_ends_with_same_rows(
    traffic: Path, tmp_path: Path, reference_run: dict[str, Any]
) -> None:
    store = f"chdb:{tmp_path / 'store'}"
    args = ["run", "--source", f"file:{traffic}", "--store", store, "-q", "--batch-size", "2000"]
    args += ["--checkpoint-events", "6000", "--checkpoint-s", "3600"]
    killed = run_cli(*args, env={FAULT_ENV: "kill_after_flush:3"})
    assert killed.returncode == -9, killed.stderr
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert snapshot(tmp_path / "store") == reference_run


def test_store_lock_names_the_owning_pid(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    with Store(f"chdb:{store_dir}"):
        other = run_cli("migrate", "--store", f"chdb:{store_dir}")
    assert other.returncode == 2
    assert f"store {store_dir.resolve()} is in use by pid {os.getpid()}" in other.stderr


FINDING_FIELDS = {
    "finding_id", "event_id", "ts", "model_id", "api_key_id", "client_ip", "session_id",
    "detector", "detector_version", "label", "score", "atlas", "owasp", "evidence",
}  # fmt: skip


def test_alerts_and_findings_match_the_v1_contracts(traffic: Path, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    run_file(traffic, store_dir)
    out = run_cli("alerts", "--store", f"chdb:{store_dir}", "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    alerts = [json.loads(line) for line in out.stdout.splitlines()]
    assert alerts
    for alert in alerts:
        assert set(alert) == ALERT_FIELDS
        assert alert["severity"] in {"info", "low", "medium", "high", "critical"}
        assert alert["status"] in {"firing", "resolved", "silenced"}
        assert alert["first_seen"] <= alert["ts"] or alert["status"] == "resolved"
        assert isinstance(alert["evidence"], dict) and alert["evidence"]
    rate = [a for a in alerts if a["detector"] == "abuse.rate_spike"]
    assert rate and all(a["atlas"] == ["AML.T0040"] and a["sample_event_ids"] for a in rate)
    out = run_cli("findings", "--store", f"chdb:{store_dir}", "--format", "jsonl")
    found = [json.loads(line) for line in out.stdout.splitlines()]
    assert found and all(set(f) == FINDING_FIELDS for f in found)
    with Store(f"chdb:{store_dir}") as store:
        ids = {r[0] for r in store.query("SELECT event_id FROM events FINAL").result_rows}
    assert {f["event_id"] for f in found} <= ids
    sample_ids = {e for a in rate for e in a["sample_event_ids"]}
    assert sample_ids <= ids


def test_bad_source_and_store_arguments_fail_with_clear_errors(tmp_path: Path) -> None:
    missing = run_cli("run", "--source", f"file:{tmp_path / 'nope.jsonl'}", "--store", "chdb:x")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    bad = run_cli("migrate", "--store", "mysql://db")
    assert bad.returncode == 2 and "expected chdb:DIR or http(s)://HOST:PORT" in bad.stderr


def test_event_schema_file_is_valid_json_schema() -> None:
    from schemas.event_schema import load_schema

    jsonschema.Draft202012Validator.check_schema(load_schema())


BAD_LINES = {
    "bad_json": b'{"schema_version": 1, "event_id": ',
    "non_finite_number": b'{"schema_version":1,"event_id":"b2","ts":1767225600000,'
    b'"model_id":"m","api_key_id":"k","latency_ms":NaN}',
    "duplicate_key": b'{"schema_version":1,"event_id":"b3","ts":1767225600000,'
    b'"model_id":"m","api_key_id":"k","api_key_id":"other"}',
    "wrong_type": b'{"schema_version":1,"event_id":"b4","ts":1767225600000,'
    b'"model_id":"m","api_key_id":7}',
    "missing_field": b'{"schema_version":1,"event_id":"b5","ts":1767225600000,"model_id":"m"}',
    "unknown_schema_version": b'{"schema_version":2,"event_id":"b6","ts":1767225600000,'
    b'"model_id":"m","api_key_id":"k"}',
    "oversize_message": b'{"schema_version":1,"event_id":"b7","ts":1767225600000,'
    b'"model_id":"m","api_key_id":"k","attributes":{"pad":"' + b"x" * (1 << 20) + b'"}}',
    "oversize_text": b'{"schema_version":1,"event_id":"b8","ts":1767225600000,'
    b'"model_id":"m","api_key_id":"k","input":{"prompt":"' + b"y" * (300 << 10) + b'"}}',
    "oversize_vector": b'{"schema_version":1,"event_id":"b9","ts":1767225600000,'
    b'"model_id":"m","api_key_id":"k","input":{"vector":[' + b"0," * 5000 + b"0]}}",
    "bad_timestamp": b'{"schema_version":1,"event_id":"b10","ts":"2026-01-01 noon",'
    b'"model_id":"m","api_key_id":"k"}',
}


def test_worker_sends_every_bad_line_to_dead_letters_and_stores_every_good_one(
    traffic: Path, tmp_path: Path
) -> None:
    good = traffic.read_bytes().splitlines()[:3_000]
    lines = list(good)
    for i, bad in enumerate(BAD_LINES.values()):
        lines.insert(100 + i * 250, bad)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    store_dir = tmp_path / "store"
    counters = run_file(path, store_dir)
    assert counters.events_total == len(good)
    assert counters.rejects_total == {reason: 1 for reason in BAD_LINES}
    with Store(f"chdb:{store_dir}") as store:
        stored = {r[0] for r in store.query("SELECT event_id FROM events FINAL").result_rows}
        dead = store.query(
            "SELECT reason, detail, raw_bytes FROM dead_letters FINAL", binary=False
        ).result_rows
    assert stored == {json.loads(line)["event_id"] for line in good}
    by_reason = {r[0]: (r[1], r[2]) for r in dead}
    assert set(by_reason) == set(BAD_LINES)
    for reason, bad in BAD_LINES.items():
        detail, size = by_reason[reason]
        assert detail and size == len(bad), (reason, detail)
    assert "api_key_id" in by_reason["wrong_type"][0]
    assert "api_key_id" in by_reason["missing_field"][0]


def test_cli_rejects_bad_arguments_with_what_was_expected(tmp_path: Path) -> None:
    store = f"chdb:{tmp_path / 'store'}"
    since = run_cli("alerts", "--store", store, "--since", "yesterday")
    assert since.returncode == 2
    assert "expected a duration like 30m, 2h, 7d or an RFC 3339 time" in since.stderr
    fmt = run_cli("findings", "--store", store, "--format", "xml")
    assert fmt.returncode == 2 and "xml" in fmt.stderr
    scenario = run_cli("simulate", "--out", str(tmp_path / "x.jsonl"), "--scenario", "nope")
    assert scenario.returncode == 2 and "known: bench, default, quiet" in scenario.stderr
    kafka = run_cli("run", "--source", "kafka://no-port/topic", "--store", store)
    assert kafka.returncode == 2 and "kafka" in kafka.stderr.lower()


def test_early_writer_stores_events_before_the_checkpoint_and_hands_failed_rows_back(
    traffic: Path, tmp_path: Path
) -> None:
    """Events go to the store beside the next batches once a batch's worth waits; rows of a write
    that failed come back, oldest first, for the checkpoint's retry: none is lost."""
    lines = traffic.read_bytes().splitlines()[:900]
    table = records.events_table(decode(lines).batch, b"key")
    faults = Faults("sink_outage:1:3600")  # the store fails once the outage is started below
    with Store(f"chdb:{tmp_path / 'store'}") as store:
        writer, buffers = EarlyWriter(faults.wrap(store), min_rows=300), Buffers()

        def stored() -> int:
            return int(store.query("SELECT count() FROM events FINAL").result_rows[0][0])

        buffers.add("events", table.slice(0, 200))
        writer.offer(buffers)
        assert buffers.pending_rows == 200, "fewer rows than a batch wait for the checkpoint"
        buffers.add("events", table.slice(200, 200))
        writer.offer(buffers)
        writer.drain(buffers)
        assert (buffers.pending_rows, stored()) == (0, 400)

        faults.checkpoint_starts(1)  # the store is down from here
        buffers.add("events", table.slice(400, 300))
        writer.offer(buffers)
        buffers.add("events", table.slice(700, 200))
        writer.offer(buffers)  # the first write failed: no other starts before the checkpoint
        writer.drain(buffers)
        assert stored() == 400
        back = pa.concat_tables(buffers.tables["events"]).column("event_id")
        assert back.to_pylist() == table.slice(400).column("event_id").to_pylist()
        writer.close()
