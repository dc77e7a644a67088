"""``inferwatch demo`` end to end (embedded broker -> worker -> chdb, then the summary), and the
scoring of alerts against the simulator's truth on a small hand-made store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from detectors.base import AlertChange
from streams.cli.demo import DemoError, prepare_store
from streams.sim.scoring import FALSE_ALARM, RELATED, evaluate
from streams.sim.simulate import Incident, Truth
from streams.store import rows as records
from streams.store.store import Store

REPO = Path(__file__).resolve().parents[2]
MIN = 60_000
T0 = 1_767_225_600_000  # the truth's start: 2026-01-01T00:00:00Z


@pytest.mark.slow
def test_demo_streams_every_event_once_and_prints_an_honest_summary(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    out = subprocess.run(
        [sys.executable, "-m", "streams.cli", "demo", "--events", "20000",
         "--store", f"chdb:{store_dir}"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    text = out.stdout
    for line in (
        "pipeline: produced 20,000, consumed 20,000, rejected 0, lost to retention 0",
        "store:    20,000 events (20,000 distinct ids)",
        "Incidents detected: ",
        "Benign callers alerted: ",
        "False alarms: ",
        f"events  {store_dir / 'demo' / 'events.jsonl'}",
        f"truth   {store_dir / 'demo' / 'events.truth.json'}",
        f"inferwatch alerts --since 1h --store chdb:{store_dir}",
        "inferwatch findings --detector abuse.rate_spike",
        "inferwatch run --source file:",
    ):
        assert line in text, f"{line!r} not in the summary:\n{text}"
    truth = orjson.loads((store_dir / "demo" / "events.truth.json").read_bytes())
    for inc in truth["incidents"]:  # each incident gets a verdict line
        assert f"{inc['incident_id']} {inc['kind']}: {inc['entity_type']} {inc['entity']}" in text
    lines = (store_dir / "demo" / "events.jsonl").read_bytes().splitlines()
    assert len(lines) == 20_000
    with Store(f"chdb:{store_dir}") as store:
        stored = dict(
            store.query("SELECT event_id, count() FROM events FINAL GROUP BY event_id").result_rows
        )
        rows = store.query("SELECT count() FROM events").result_rows[0][0]
    assert set(stored) == {orjson.loads(line)["event_id"] for line in lines}
    assert set(stored.values()) == {1}
    assert rows == len(lines), "no event was read twice (not even before a merge)"
    assert not (store_dir / "api.json").exists(), "the demo's API stopped with it"


def test_demo_fresh_clears_only_an_inferwatch_store_or_an_empty_directory(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    for fresh in (True, False):  # --keep would open it as a store: refused too
        with pytest.raises(DemoError, match=r"is not an inferwatch store: it holds notes\.txt"):
            prepare_store(f"chdb:{theirs}", fresh=fresh)
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]

    ours = tmp_path / "ours"
    in_use = f"store {ours} is in use by pid {os.getpid()}"
    with Store(f"chdb:{ours}"), pytest.raises(DemoError, match=in_use):
        prepare_store(f"chdb:{ours}", fresh=True)
    assert prepare_store(f"chdb:{ours}", fresh=True) == ours
    assert [p.name for p in ours.iterdir()] == ["inferwatch.store"]  # still a store, empty
    with pytest.raises(DemoError, match=r"embedded store \(chdb:DIR\)"):
        prepare_store("http://127.0.0.1:8123", fresh=True)


# ----------------------------------------------------------------------------------- evaluate


def incident(n: int, kind: str, detector: str, entity_type: str, entity: str) -> Incident:
    start = T0 + 20 * n * MIN
    return Incident(
        f"sim-{n}", kind, detector, entity_type, entity, "m1", start, start + 10 * MIN, 100, kind
    )


def alert(detector: str, entity_type: str, entity: str, ts_ms: int, model: str = "m1") -> Any:
    change = AlertChange(
        entity_type=entity_type, entity=entity, model_id=model, tenant="", status="firing",
        ts_ms=ts_ms, episode_start_ms=ts_ms - MIN, first_seen_ms=ts_ms - MIN, last_seen_ms=ts_ms,
        score=2.0, threshold=1.0, severity="medium", title=f"{entity} spike", summary="",
        evidence={}, event_count=10, sample_event_ids=(),
    )  # fmt: skip
    return records.alert_record(change, detector, "1", (), (), ts_ms)


def test_evaluate_scores_detections_delays_benign_callers_and_false_alarms(
    tmp_path: Path,
) -> None:
    rate, drift = "abuse.rate_spike", "drift.psi"
    truth = Truth(
        scenario="default", seed=1, events=1000,
        incidents=[
            incident(1, "rate_spike_key", rate, "api_key", "key_stolen"),
            incident(2, "rate_spike_ip", rate, "client_ip", "10.0.0.9"),
            incident(3, "prediction_drift", drift, "model", "m2"),
        ],
        benign_callers=["key_a", "key_b", "key_c"], attackers=["key_stolen", "key_s1", "key_s2"],
        models=[], start_ts_ms=T0, end_ts_ms=T0 + 120 * MIN,
    )  # fmt: skip
    s1, s2, s3 = (i.start_ts_ms for i in truth.incidents)
    alerts = [
        alert(rate, "api_key", "key_stolen", s1 + 3 * MIN),  # detects sim-1 after 3 min
        alert(rate, "api_key", "key_stolen", s1 + 7 * MIN + 1),  # a second episode
        alert(rate, "client_ip", "10.0.0.9", s2 + 26 * MIN),  # past end + 15 min: too late
        alert(rate, "model", "m2", s3 + MIN),  # the right entity, the wrong detector
        alert(drift, "model", "m1", s3 + MIN),  # a model no incident involves
        alert(rate, "api_key", "key_b", s1 + MIN),  # a benign caller
        alert(rate, "client_ip", "10.0.0.7", s1 + 5 * MIN),  # an address the attackers use
        alert(rate, "client_ip", "10.0.0.8", s1 + 5 * MIN),  # an address benign callers use
        alert(rate, "api_key", "key_a", T0 - 30 * MIN),  # before the run: not considered
    ]
    events = [
        (f"e{k}", s1 + 4 * MIN + k * 1000, key, ip)
        for k, (key, ip) in enumerate(
            [("key_s1", "10.0.0.7")] * 3
            + [("key_a", "10.0.0.7")]
            + [("key_a", "10.0.0.8")] * 3
            + [("key_s2", "10.0.0.8")]
        )
    ]
    with Store(f"chdb:{tmp_path / 'store'}") as store:
        store.insert_arrow("alerts", records.alerts_table(alerts))
        values = ", ".join(
            f"('{eid}', fromUnixTimestamp64Milli({ts}), 'm1', '{key}', '{ip}')"
            for eid, ts, key, ip in events
        )
        store.command(
            f"INSERT INTO events (event_id, ts, model_id, api_key_id, client_ip) VALUES {values}"
        )
        ev = evaluate(store, truth)

    assert [r.detected for r in ev.incidents] == [True, False, False]
    assert ev.detected == 1
    assert ev.incidents[0].delay_ms == 3 * MIN
    assert len(ev.incidents[0].alerts) == 2
    assert [r.delay_ms for r in ev.incidents[1:]] == [None, None]
    assert ev.benign_callers == 3 and ev.benign_alerted == ("key_b",)
    assert len(ev.alerts) == 8  # the alert before the run's start is left out
    by_entity = {(a.detector, a.entity): ev.verdicts[a.alert_id] for a in ev.alerts}
    assert by_entity == {
        (rate, "key_stolen"): "sim-1",
        (rate, "10.0.0.9"): RELATED,
        (rate, "m2"): RELATED,
        (drift, "m1"): FALSE_ALARM,
        (rate, "key_b"): FALSE_ALARM,
        (rate, "10.0.0.7"): RELATED,
        (rate, "10.0.0.8"): FALSE_ALARM,
    }
    assert {a.entity for a in ev.false_alarms} == {"m1", "key_b", "10.0.0.8"}
