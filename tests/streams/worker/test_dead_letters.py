"""Dead letters keep what events keep and no more (streams/worker/dead_letters.py): structure,
field,
fingerprint, never text in clear, bounded; a file source skips an over-long line unread; and
``inferwatch dead-letters`` lists them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams.api.client import API_FILE
from streams.sources.base import FileSource, Skipped
from streams.store import fingerprint
from streams.store import rows as records
from streams.store.store import Store
from streams.worker import dead_letters
from streams.worker.loop import Worker, WorkerSettings

KEY = b"test-hmac-key"
REPO = Path(__file__).resolve().parents[3]
T0 = 1_767_225_600_000
PII = ("4111 1111 1111 1111", "jane.doe@bank.example", "078-05-1120", "I was fired")


@pytest.fixture(autouse=True)
def hmac_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERWATCH_HMAC_KEY", KEY.decode())


def event(event_id: str, **fields: Any) -> dict[str, Any]:
    return {"schema_version": 1, "event_id": event_id, "ts": T0, "model_id": "m",
            "api_key_id": "k1", **fields}  # fmt: skip


def dumps(ev: dict[str, Any]) -> bytes:
    return json.dumps(ev, separators=(",", ":")).encode()


# one wrong-typed field (api_key_id) in a message full of text a bank must not keep in clear
LEAKY = dumps(
    event(
        "bad-1", api_key_id=7, session_id="s-1",
        input={"prompt": f"my card is {PII[0]}, mail {PII[1]}", "features": {"age": 41}},
        output={"text": f"Noted. SSN {PII[2]} on file.", "label": "approve"},
        notes=PII[3],
    )
)  # fmt: skip


def run(path: Path, store_dir: Path, store_text: str = "redacted") -> Any:
    source = FileSource(path)
    try:
        with Store(f"chdb:{store_dir}") as store:
            return Worker(store, source, [], WorkerSettings(store_text=store_text)).run()
    finally:
        source.close()


def rows(store_dir: Path) -> list[dict[str, Any]]:
    with Store(f"chdb:{store_dir}") as store:
        result = store.query("SELECT * FROM dead_letters FINAL ORDER BY source_offset")
        return [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]


def test_dead_letters_keep_the_shape_field_and_fingerprint_never_the_text(tmp_path: Path) -> None:
    good = [dumps(event("g1")), dumps(event("g2"))]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join([good[0], LEAKY, good[1]]) + b"\n")
    counters = run(path, tmp_path / "store")
    assert counters.events_total == 2 and counters.rejects_total == {"wrong_type": 1}
    (row,) = rows(tmp_path / "store")
    kept = " ".join(str(v) for v in row.values())
    assert not [p for p in PII if p in kept], kept
    assert row["raw"] in ("", b"") and row["raw_bytes"] == len(LEAKY)
    assert (row["source"], row["source_offset"]) == (f"file:{path.resolve()}", len(good[0]) + 1)
    assert (row["reason"], row["field"], row["event_id"]) == ("wrong_type", "api_key_id", "bad-1")
    fp = fingerprint.of_messages([LEAKY], fingerprint.fingerprint_key(KEY))[0]
    assert row["fingerprint"] == fingerprint.hex_of(fp)
    shape = json.loads(row["structure"])
    prompt = json.loads(LEAKY)["input"]["prompt"]
    assert shape["input"]["prompt"] == (
        f"[redacted {len(prompt)} chars, hmac {records.text_hmac(KEY, prompt)}]"
    )  # the same keyed HMAC as events.prompt_hmac, so the two can be matched
    assert shape["output"]["text"].startswith("[redacted ")
    assert shape["notes"].startswith("[redacted ")  # not a field events keep in clear
    # what events keep in clear stays readable: ids, numbers, labels
    assert (shape["api_key_id"], shape["session_id"], shape["ts"]) == (7, "s-1", T0)
    assert (shape["input"]["features"], shape["output"]["label"]) == ({"age": 41}, "approve")
    with Store(f"chdb:{tmp_path / 'store'}") as store:
        ids = {r[0] for r in store.query("SELECT event_id FROM events FINAL").result_rows}
    assert ids == {"g1", "g2"}


def test_the_bytes_kept_per_dead_letter_are_capped(tmp_path: Path) -> None:
    fields = {f"unknown_{i:05d}_" + "k" * 40: "v" * 30 for i in range(10_000)}
    wide = dumps(event("wide", **fields))  # ~1 MiB: every field an unknown one
    deep = dumps(event("deep", attributes={"a": [[[[[[[[[[["x"]]]]]]]]]]]}))
    long_name = dumps(event("name", **{"x" * 200_000: 1}))  # the detail names the field
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join([wide, deep, long_name]) + b"\n")
    assert len(wide) < 1 << 20
    run(path, tmp_path / "store", store_text="raw")
    found = rows(tmp_path / "store")
    assert [r["event_id"] for r in found] == ["wide", "deep", "name"]
    for row, raw in zip(found, [wide, deep, long_name], strict=True):
        assert row["raw_bytes"] == len(raw)
        assert len(row["raw"]) == min(len(raw), dead_letters.MAX_RAW_BYTES)
        assert len(row["detail"]) <= dead_letters.MAX_DETAIL_CHARS + 3
        assert len(row["field"]) <= dead_letters.MAX_FIELD_CHARS + 3
        assert len(row["structure"].encode()) <= dead_letters.MAX_STRUCTURE_BYTES
        json.loads(row["structure"])  # cut short, still JSON
    assert '"...": "+' in found[0]["structure"]
    assert "deeper]" in found[1]["structure"]


def test_file_source_skips_an_over_long_line_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    long_line = b"z" * (32 << 20)  # 32 MiB, limit 64 KiB, read 256 KiB at a time
    with path.open("wb") as fh:
        fh.write(b"before\n" + long_line + b"\nafter\n" + b"y" * (100 << 10) + b"\nlast")
    source = FileSource(path, read_bytes=256 << 10, max_line_bytes=64 << 10)
    tracemalloc.start()
    try:
        polled = [source.poll(1000) for _ in range(50) if not source.exhausted]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        source.close()
    assert [m for p in polled for m in p.messages] == [b"before", b"after", b"last"]
    offsets = [o for p in polled for o in p.offset.tolist()]
    assert offsets == [0, 7 + len(long_line) + 1, 7 + len(long_line) + 7 + (100 << 10) + 1]
    assert [s for p in polled for s in p.skipped] == [
        Skipped(0, 7, len(long_line)), Skipped(0, 7 + len(long_line) + 7, 100 << 10)
    ]  # fmt: skip
    assert polled[-1].next_offsets == {0: path.stat().st_size}
    assert peak < 2 << 20, f"peak {peak:,} bytes while skipping a 32 MiB line"


def test_worker_records_an_over_long_line_as_a_dead_letter_and_keeps_its_neighbours(
    tmp_path: Path,
) -> None:
    before, after = dumps(event("b1")), dumps(event("a1"))
    long_line = dumps(event("huge", attributes={"pad": "x" * (3 << 20)}))
    path = tmp_path / "in.jsonl"
    path.write_bytes(before + b"\n" + long_line + b"\n" + after + b"\n")
    counters = run(path, tmp_path / "store")
    assert counters.events_total == 2 and counters.rejects_total == {"oversize_message": 1}
    (row,) = rows(tmp_path / "store")
    assert (row["reason"], row["source_offset"], row["raw_bytes"]) == (
        "oversize_message", len(before) + 1, len(long_line)
    )  # fmt: skip
    assert "skipped unread" in row["detail"] and row["raw"] in ("", b"")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ})  # fmt: skip


def test_dead_letters_command_filters_and_formats_and_refuses_bad_arguments(
    tmp_path: Path,
) -> None:
    path = tmp_path / "in.jsonl"
    lines = [dumps(event("g1")), LEAKY, b'{"schema_version": 1, "event_id": ', dumps(event("g2"))]
    path.write_bytes(b"\n".join(lines) + b"\n")
    store = f"chdb:{tmp_path / 'store'}"
    run(path, tmp_path / "store")
    out = cli("dead-letters", "--store", store, "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    found = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert sorted(r["reason"] for r in found) == ["bad_json", "wrong_type"]
    assert not [p for p in PII if p in out.stdout]
    assert all("raw" not in r and r["fingerprint"] for r in found)
    only = cli("dead-letters", "--store", store, "--format", "csv", "--reason", "bad_json",
               "--since", "1h")  # fmt: skip
    assert only.returncode == 0 and only.stdout.count("\n") == 2  # header and one row
    table = cli("dead-letters", "--store", store, "--since", "1h", "--limit", "1")
    assert (
        table.returncode == 0
        and table.stdout.count("wrong_type") + table.stdout.count("bad_json") == 1
    )
    none = cli("dead-letters", "--store", store, "--since", "2999-01-01T00:00:00Z")
    assert none.returncode == 0 and "(none)" in none.stdout
    bad = cli("dead-letters", "--store", store, "--reason", "typo")
    assert bad.returncode == 2 and "--reason 'typo': expected one of" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    since = cli("dead-letters", "--store", store, "--since", "yesterday")
    assert since.returncode == 2 and "--since 'yesterday'" in since.stderr


@pytest.mark.slow
def test_dead_letters_command_goes_through_the_worker_that_owns_the_store(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join([dumps(event("g1")), LEAKY]) + b"\n")
    store_dir = tmp_path / "store"
    run(path, store_dir)
    direct = cli("dead-letters", "--store", f"chdb:{store_dir}", "--format", "jsonl")
    log = (tmp_path / "worker.log").open("wb")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "tests.support.api_worker_process", str(store_dir)]
    worker = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not (store_dir / API_FILE).exists():
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline, "worker published no api.json within 30 s"
            time.sleep(0.05)
        via_api = cli("dead-letters", "--store", f"chdb:{store_dir}", "--format", "jsonl")
        assert via_api.returncode == 0, via_api.stderr
        bad = cli("dead-letters", "--store", f"chdb:{store_dir}", "--reason", "typo")
        assert bad.returncode == 2 and "--reason 'typo'" in bad.stderr
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, (tmp_path / "worker.log").read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        log.close()
    assert via_api.stdout == direct.stdout and "wrong_type" in direct.stdout


@pytest.mark.slow
def test_kafka_dlq_keeps_an_oversize_message_whole_and_the_worker_goes_on(tmp_path: Path) -> None:
    """A 1.5 MB message the events topic accepted used to stop the worker at every start:
    the DLQ producer refused it (librdkafka's 1 MB default) and the checkpoint failed."""
    from confluent_kafka import Producer

    from streams.sources.kafka import KafkaSource
    from tests.support.kafka import SESSION, MockCluster, run_worker_until

    big = dumps(event("big", attributes={"pad": "x" * 1_500_000}))
    values = [dumps(event("g1")), big, dumps(event("g2"))]
    cluster = MockCluster()
    try:
        producer = Producer({"bootstrap.servers": cluster.bootstrap, "message.max.bytes": 4 << 20})
        for value in values:
            producer.produce("big.events.v1", value=value, partition=0)
        assert producer.flush(30) == 0
        del producer  # before the cluster goes
        src = KafkaSource(cluster.bootstrap, "big.events.v1", "big", config=SESSION)
        try:
            with Store(f"chdb:{tmp_path / 'store'}") as store:
                worker = Worker(store, src, [], WorkerSettings(checkpoint_s=0.5))
                counters = run_worker_until(
                    worker, lambda w: w.next_offsets.get(0, -1) >= 3, timeout_s=90
                )
                raw = store.query("SELECT raw, raw_bytes FROM dead_letters FINAL").result_rows
        finally:
            src.close()
        assert counters.events_total == 2 and counters.rejects_total == {"oversize_message": 1}
        assert [(r[0] in ("", b""), r[1]) for r in raw] == [(True, len(big))]
        (dlq,) = cluster.read_all("big.events.v1.dlq")
        headers = dict(dlq.headers())
        assert dlq.value() == big and headers["source_offset"] == b"1"
    finally:
        cluster.close()
