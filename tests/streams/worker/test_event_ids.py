"""Reused event ids (streams/worker/event_ids.py) and the keyed fingerprints behind them
(streams/store/fingerprint.py): a different message under a stored id is a dead letter and the first
version stays; byte-identical replays, reruns and restarts after a crash are not conflicts."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from streams.sim.simulate import write as simulate_write
from streams.sources.base import FileSource
from streams.store import directory as store_dir_module
from streams.store import fingerprint
from streams.store import store as store_module
from streams.store.store import Store
from streams.worker.event_ids import EventIds
from streams.worker.loop import FAULT_ENV, Worker, WorkerSettings

KEY = b"test-hmac-key"
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HOUR = 3_600_000


@pytest.fixture(autouse=True)
def hmac_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERWATCH_HMAC_KEY", KEY.decode())


def line(event_id: str, ts_ms: int = T0, key: str = "k1", **extra: Any) -> bytes:
    event = {"schema_version": 1, "event_id": event_id, "ts": ts_ms, "model_id": "m",
             "api_key_id": key, **extra}  # fmt: skip
    return json.dumps(event, separators=(",", ":")).encode()


def fp(message: bytes) -> str:
    return fingerprint.hex_of(
        fingerprint.of_messages([message], fingerprint.fingerprint_key(KEY))[0]
    )


def run(path: Path, store_dir: Path, batch: int = 10_000, from_start: bool = False) -> Any:
    settings = WorkerSettings(batch_max=batch, checkpoint_events=max(batch, 2), checkpoint_s=3600)
    source = FileSource(path)
    try:
        with Store(f"chdb:{store_dir}") as store:
            return Worker(store, source, [], settings, from_start).run()
    finally:
        source.close()


def write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def stored(store_dir: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    with Store(f"chdb:{store_dir}") as store:
        events = store.query(
            "SELECT event_id, api_key_id, fingerprint FROM events FINAL ORDER BY event_id, "
            "fingerprint"
        ).result_rows
        dead = store.query(
            "SELECT reason, event_id, fingerprint, stored_fingerprint, source_offset, detail "
            "FROM dead_letters FINAL ORDER BY source_offset"
        ).result_rows
    return [tuple(r) for r in events], [tuple(r) for r in dead]


@pytest.mark.parametrize("batch", [10_000, 1], ids=["one batch", "one event per batch"])
def test_a_reused_event_id_is_a_dead_letter_and_the_first_version_stays(
    tmp_path: Path, batch: int
) -> None:
    first, other = line("e1", key="alice"), line("e2")
    forged = line("e1", key="mallory")  # the same id, another caller: it would erase alice's
    lines = [first, other, forged, other]  # the second e2 is a byte-identical replay
    path = write(tmp_path / "in.jsonl", lines)
    counters = run(path, tmp_path / "store", batch)
    assert counters.events_total == 3
    assert counters.rejects_total == {"conflicting_event_id": 1}
    events, dead = stored(tmp_path / "store")
    assert events == [("e1", "alice", fp(first)), ("e2", "k1", fp(other))]
    offset = len(first) + len(other) + 2  # the forged line's byte offset in the file
    assert [d[:5] for d in dead] == [("conflicting_event_id", "e1", fp(forged), fp(first), offset)]
    assert fp(first) in dead[0][5] and fp(forged) in dead[0][5]


def test_a_restarted_worker_refuses_an_id_an_earlier_run_stored(tmp_path: Path) -> None:
    first = line("e1", key="alice")
    run(write(tmp_path / "a.jsonl", [first, line("e2")]), tmp_path / "store")
    forged, fresh = line("e1", key="mallory"), line("e3")
    counters = run(write(tmp_path / "b.jsonl", [first, forged, fresh]), tmp_path / "store")
    assert counters.events_total == 2  # the replayed e1 and e3
    assert counters.rejects_total == {"conflicting_event_id": 1}
    events, dead = stored(tmp_path / "store")
    assert [e[:2] for e in events] == [("e1", "alice"), ("e2", "k1"), ("e3", "k1")]
    assert [(d[0], d[1], d[2], d[3]) for d in dead] == [
        ("conflicting_event_id", "e1", fp(forged), fp(first))
    ]


def test_the_check_reaches_back_25_hours_of_event_time(tmp_path: Path) -> None:
    """Within 25 hours of the watermark a reuse is caught (ids expire once per hour of event
    time, judged at the start of a batch, so the reach is 25 to 26 hours and a batch); beyond,
    the reused id is stored beside the first version (the sorting key holds the fingerprint),
    never over it."""
    first = line("e1", key="alice")
    filler = [line(f"f{i}", T0 + i * 600_000) for i in range(1, 6 * 27)]  # every 10 minutes
    within = line("e1", T0 + 24 * HOUR, key="bob")
    beyond = line("e1", T0 + 27 * HOUR, key="carol")
    lines = [first, *filler[: 6 * 24], within, *filler[6 * 24 :], beyond]
    counters = run(write(tmp_path / "in.jsonl", lines), tmp_path / "store", batch=10)
    assert counters.rejects_total == {"conflicting_event_id": 1}
    events, dead = stored(tmp_path / "store")
    assert sorted(e[1] for e in events if e[0] == "e1") == ["alice", "carol"]
    assert [(d[1], d[2]) for d in dead] == [("e1", fp(within))]


@pytest.mark.slow
def test_a_restart_after_a_crash_rereads_stored_events_without_conflicts(tmp_path: Path) -> None:
    path = tmp_path / "traffic.jsonl"
    simulate_write("default", 3_000, 5, path)
    store_dir = tmp_path / "store"
    args = ["run", "--source", f"file:{path}", "--store", f"chdb:{store_dir}", "-q"]
    args += ["--batch-size", "500", "--checkpoint-events", "1000", "--checkpoint-s", "3600"]
    env = {**os.environ, "INFERWATCH_HMAC_KEY": KEY.decode()}

    def cli(fault: str | None = None) -> subprocess.CompletedProcess[str]:
        extra = {FAULT_ENV: fault} if fault else {}
        return subprocess.run([sys.executable, "-m", "streams.cli", *args], env={**env, **extra},
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    # killed after the second checkpoint stored its events, before it saved its positions:
    # the restart reads those 1,000 stored events again (--from-start replays are in
    # tests/streams/worker/test_worker.py, which counts every event of the replay)
    assert cli("kill_after_flush:2").returncode == -9
    done = cli()
    assert done.returncode == 0, done.stderr
    assert "events 2,000  rejected 0 " in done.stdout
    with Store(f"chdb:{store_dir}") as store:
        assert store.query("SELECT count() FROM dead_letters").result_rows == [(0,)]
        per_id = store.query("SELECT uniqExact(event_id), count() FROM events FINAL")
        assert per_id.result_rows == [(3_000, 3_000)]


def test_the_bound_drops_the_oldest_ids_first_and_says_how_far_it_reaches() -> None:
    ids = EventIds(KEY, window_ms=25 * HOUR, max_ids=2_500)
    keys = np.arange(1, 5_001, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    minute = np.repeat(np.arange(5, dtype=np.int64), 1_000) * 60_000 + T0
    for part in range(5):
        rows = slice(part * 1_000, (part + 1) * 1_000)
        status, _ = ids.check(keys[rows], keys[rows], minute[rows])
        assert (status == 0).all()
    # whole minutes go, oldest first: at each batch over the bound the oldest minute left
    assert ids.count == 2_000 and ids.evicted_total == 3_000
    assert ids.reach_ms(T0 + 4 * 60_000) == 60_000  # minutes 3 and 4 are kept
    status, _ = ids.check(keys[3_000:3_001], keys[3_000:3_001] + np.uint64(1), minute[:1])
    assert status.tolist() == [2]  # the newest ones are still checked
    status, _ = ids.check(keys[2_999:3_000], keys[2_999:3_000] + np.uint64(1), minute[:1])
    assert status.tolist() == [0]  # the older ones are gone


def test_expiry_forgets_ids_older_than_the_window_and_keeps_the_rest() -> None:
    ids = EventIds(KEY, window_ms=25 * HOUR)
    keys = np.array([11, 12], np.uint64)
    ids.check(keys, keys, np.array([T0, T0 + 10 * HOUR], np.int64))
    ids.expire(T0 + 30 * HOUR)
    status, stored_fp = ids.check(keys, keys + np.uint64(1), np.full(2, T0 + 30 * HOUR))
    assert status.tolist() == [0, 2] and int(stored_fp[1]) == 12


def test_siphash_2_4_matches_clickhouse_and_1_3_matches_cpython(tmp_path: Path) -> None:
    r = random.Random(8)
    messages = [bytes(r.getrandbits(8) for _ in range(r.randrange(0, 70))) for _ in range(300)]
    key = (r.getrandbits(64), r.getrandbits(64))
    ours = fingerprint.of_messages(messages, key, rounds=(2, 4))
    with Store(f"chdb:{tmp_path / 'store'}") as store:
        theirs = store.query(
            "SELECT sipHash64Keyed((toUInt64({a:UInt64}), toUInt64({b:UInt64})), unhex(x)) "
            "FROM (SELECT arrayJoin({xs:Array(String)}) AS x)",
            {"a": key[0], "b": key[1], "xs": [m.hex() for m in messages]},
        ).result_rows
    assert ours.tolist() == [int(t[0]) for t in theirs]
    # CPython hashes bytes with SipHash-1-3; PYTHONHASHSEED=0 makes its key (0, 0)
    nonempty = [m for m in messages if m]
    code = "import sys; print([hash(bytes.fromhex(h)) for h in sys.argv[1:]])"
    out = subprocess.run([sys.executable, "-c", code, *(m.hex() for m in nonempty)],
                         env={**os.environ, "PYTHONHASHSEED": "0"}, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    mine = fingerprint.of_messages(nonempty, (0, 0)).view(np.int64).tolist()
    assert mine == json.loads(out)
    strings = pa.array([m.hex() for m in messages]).slice(3)
    assert (
        fingerprint.of_strings(strings, key).tolist()
        == fingerprint.of_messages([m.hex().encode() for m in messages[3:]], key).tolist()
    )


def test_an_existing_store_upgrades_and_its_old_events_are_not_conflicts(tmp_path: Path) -> None:
    """A store made by version 5 of the schema: events without a fingerprint, a dead letter
    with its raw message. The upgrade adds the columns and keeps every row; an old event is
    not loaded into the check (its fingerprint is unknown), so a replay of it is stored again
    beside it, and dead letters expire with the store's retention from now on."""
    import clickhouse_connect

    store_dir = tmp_path / "store"
    store_dir.mkdir()
    store_dir_module.mark(store_dir)  # made by `inferwatch migrate` of version 5
    client = clickhouse_connect.get_client(dsn=f"chdb://{store_dir}")
    client.command(
        "CREATE TABLE schema_migrations (version UInt32, name String, applied_at "
        "DateTime64(3, 'UTC')) ENGINE = ReplacingMergeTree ORDER BY version"
    )
    for version, name, sql in store_module.migration_files():
        if version <= 5:
            for statement in store_module.split_sql(sql.replace("{ttl_days}", "30")):
                client.command(statement)
            client.command(f"INSERT INTO schema_migrations VALUES ({version}, '{name}', now())")
    client.command(
        "INSERT INTO events (event_id, ts, model_id, api_key_id) "
        "VALUES ('old', '2026-01-01 00:00:00', 'm', 'alice')"
    )
    client.command(
        "INSERT INTO dead_letters (source, source_partition, source_offset, reason, detail, raw, "
        "raw_bytes, gap_to, received_at) VALUES ('file:x', 0, 7, 'bad_json', 'd', 'secret', 6, "
        "-1, now())"
    )
    client.close()
    with Store(f"chdb:{store_dir}") as store:
        assert store.applied == ["0006_fingerprints.sql", "0007_reference_precedence.sql"]
        create = store.query("SHOW CREATE TABLE events").result_rows[0][0]
        assert "ORDER BY (model_id, event_id, fingerprint)" in create
        assert "TTL" in store.query("SHOW CREATE TABLE dead_letters").result_rows[0][0]
        assert store.query("SELECT raw, fingerprint FROM dead_letters").result_rows == [
            ("secret", "")
        ]
    again = line("old", key="alice")
    counters = run(write(tmp_path / "in.jsonl", [again, line("new")]), store_dir)
    assert counters.rejects_total == {} and counters.events_total == 2
    events, _ = stored(store_dir)
    assert events == [("new", "k1", fp(line("new"))), ("old", "alice", ""),
                      ("old", "alice", fp(again))]  # fmt: skip
    with Store(f"chdb:{store_dir}") as store:
        assert store.applied == []
