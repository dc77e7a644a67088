"""The traffic simulator: exact, deterministic, schema-valid, and honest about its truth."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from streams.sim.simulate import SCENARIOS, Truth, simulate, write

KEY_RE = re.compile(r"^key_[0-9a-f]{12}$")
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
V1_FIELDS = {
    "schema_version", "event_id", "ts", "model_id", "api_key_id", "model_version", "tenant",
    "client_ip", "user_agent", "session_id", "status", "latency_ms", "input", "output",
    "tokens_in", "tokens_out", "ground_truth", "attributes",
}  # fmt: skip
STRING_FIELDS = ("event_id", "model_id", "api_key_id", "model_version", "tenant", "client_ip")


def ts_ms(value: int | str) -> int:
    if isinstance(value, int):
        return value
    return int(datetime.fromisoformat(value).timestamp() * 1000)


def problems_of(ev: dict[str, Any]) -> list[str]:
    """What is wrong with one event against wire schema v1 (the subset the simulator uses)."""
    out = [f"unknown field {k}" for k in ev if k not in V1_FIELDS]
    if ev.get("schema_version") != 1:
        out.append("schema_version")
    out += [f"{k} not a string" for k in STRING_FIELDS if not isinstance(ev.get(k), str)]
    ts = ev.get("ts")
    if not (isinstance(ts, int) or (isinstance(ts, str) and RFC3339_MS.match(ts))):
        out.append(f"bad ts {ts!r}")
    if not UUID_RE.match(str(ev.get("event_id"))):
        out.append("event_id")
    if not isinstance(ev.get("status"), int) or not isinstance(ev.get("latency_ms"), float | int):
        out.append("status/latency")
    inp = ev.get("input", {})
    if not ({"features", "vector", "prompt", "messages"} & set(inp)):
        out.append("input")
    if ev["status"] == 200 and "output" not in ev:
        out.append("output")
    tokens = [ev.get("tokens_in"), ev.get("tokens_out")]
    llm_ok = ev["model_id"] != "support-chat" or ev["status"] != 200
    if not (llm_ok or all(isinstance(t, int) for t in tokens)):
        out.append("tokens")
    return out


@dataclass
class Columns:
    ts: list[int] = field(default_factory=list)
    key: list[str] = field(default_factory=list)
    ip: list[str] = field(default_factory=list)
    ua: list[str] = field(default_factory=list)
    tenant: list[str] = field(default_factory=list)
    model: list[str] = field(default_factory=list)
    ts_types: set[tuple[str, type]] = field(default_factory=set)
    event_ids: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    credit: list[tuple[int, float, list[float]]] = field(default_factory=list)
    credit_names: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def default_run() -> tuple[Columns, Truth]:
    lines, truth = simulate("default", 100_000, seed=7)
    c = Columns()
    for i, line in enumerate(lines):
        ev = orjson.loads(line)
        c.problems += [f"line {i}: {p}" for p in problems_of(ev)]
        t = ts_ms(ev["ts"])
        c.ts.append(t)
        c.key.append(ev["api_key_id"])
        c.ip.append(ev["client_ip"])
        c.ua.append(ev["user_agent"])
        c.tenant.append(ev["tenant"])
        c.model.append(ev["model_id"])
        c.ts_types.add((ev["model_id"], type(ev["ts"])))
        c.event_ids.add(ev["event_id"])
        if ev["model_id"] == "credit-risk" and ev["status"] == 200:
            feats = ev["input"]["features"]
            c.credit_names = [k for k, v in feats.items() if not isinstance(v, str)]
            values = [float(feats[k]) for k in c.credit_names]
            c.credit.append((t, ev["output"]["scores"]["high"], values))
    return c, truth


def test_simulate_same_seed_gives_the_same_bytes() -> None:
    for scenario in ("default", "bench"):
        a, truth_a = simulate(scenario, 3_000, seed=11)
        b, truth_b = simulate(scenario, 3_000, seed=11)
        assert list(a) == list(b)
        assert truth_a == truth_b
    c, _ = simulate("default", 3_000, seed=12)
    d, _ = simulate("default", 3_000, seed=11)
    assert list(c) != list(d)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("events", [0, 1, 999, 8_193])
def test_simulate_yields_exactly_the_events_asked_for(scenario: str, events: int) -> None:
    lines, truth = simulate(scenario, events, seed=3)
    assert sum(1 for _ in lines) == events == truth.events


def test_simulate_lines_are_valid_v1_events(default_run: tuple[Columns, Truth]) -> None:
    cols, _ = default_run
    assert cols.problems == []
    assert len(cols.event_ids) == len(cols.ts) == 100_000
    # one gateway writes epoch ms, the others RFC 3339
    assert ("doc-embedder-clf", int) in cols.ts_types
    assert ("fraud-scorer", str) in cols.ts_types
    assert {m for m, _ in cols.ts_types} == {
        "fraud-scorer", "credit-risk", "doc-embedder-clf", "support-chat",
    }  # fmt: skip


def test_simulate_ts_is_never_more_than_2s_out_of_order(
    default_run: tuple[Columns, Truth],
) -> None:
    cols, truth = default_run
    ts = np.asarray(cols.ts)
    assert int((np.maximum.accumulate(ts) - ts).max()) <= 2_000
    assert truth.start_ts_ms <= ts.min() and ts.max() < truth.end_ts_ms
    assert 100 <= (truth.end_ts_ms - truth.start_ts_ms) / 60_000 <= 140  # about 2 hours


def test_simulate_default_has_at_least_500_active_benign_callers(
    default_run: tuple[Columns, Truth],
) -> None:
    cols, truth = default_run
    active = set(cols.key)
    assert len(active & set(truth.benign_callers)) >= 500
    assert set(truth.attackers) <= active
    assert not set(truth.attackers) & set(truth.benign_callers)
    assert active <= set(truth.attackers) | set(truth.benign_callers)
    per_key = np.array(sorted(Counter(cols.key).values()))
    assert per_key[-1] > 20 * np.median(per_key)  # heavy tail: batch jobs dwarf the typical key


def test_simulate_attackers_are_indistinguishable_by_identity(
    default_run: tuple[Columns, Truth],
) -> None:
    cols, truth = default_run
    attackers = set(truth.attackers)
    assert all(KEY_RE.match(k) for k in truth.benign_callers + truth.attackers)
    benign = [i for i, k in enumerate(cols.key) if k not in attackers]
    bad = [i for i, k in enumerate(cols.key) if k in attackers]

    def net(ip: str) -> str:
        return ip.rsplit(".", 1)[0]

    for column, view in ((cols.ua, str), (cols.tenant, str), (cols.ip, net)):
        assert {view(column[i]) for i in bad} <= {view(column[i]) for i in benign}


def test_simulate_truth_covers_every_kind_and_counts_match_the_lines(
    default_run: tuple[Columns, Truth],
) -> None:
    cols, truth = default_run
    kinds = {(i.kind, i.detector, i.entity_type) for i in truth.incidents}
    assert kinds == {
        ("rate_spike_key", "abuse.rate_spike", "api_key"),
        ("rate_spike_ip", "abuse.rate_spike", "client_ip"),
        ("prediction_drift", "drift.psi", "model"),
    }
    assert sum(i.kind == "rate_spike_key" for i in truth.incidents) == 2
    ts = np.asarray(cols.ts)
    column = {"api_key": cols.key, "client_ip": cols.ip, "model": cols.model}
    span = truth.end_ts_ms - truth.start_ts_ms
    for inc in truth.incidents:
        mine = np.asarray(column[inc.entity_type], dtype=object) == inc.entity
        inside = (ts >= inc.start_ts_ms) & (ts < inc.end_ts_ms)
        assert int((mine & inside).sum()) == inc.event_count > 0, inc
        if inc.kind != "prediction_drift":  # a spike: the rate in the window vs the rest
            before = (mine & (ts < inc.start_ts_ms)).sum() / (inc.start_ts_ms - truth.start_ts_ms)
            during = inc.event_count / (inc.end_ts_ms - inc.start_ts_ms)
            assert during > 4 * before, inc
        else:
            assert inc.start_ts_ms - truth.start_ts_ms >= 0.4 * span
            assert inc.end_ts_ms == truth.end_ts_ms


def test_simulate_drift_shifts_inputs_and_then_predictions(
    default_run: tuple[Columns, Truth],
) -> None:
    cols, truth = default_run
    (drift,) = [i for i in truth.incidents if i.kind == "prediction_drift"]
    ts = np.array([t for t, _, _ in cols.credit])
    high = np.array([s for _, s, _ in cols.credit])
    x = np.array([v for _, _, v in cols.credit])
    after = ts >= drift.start_ts_ms
    assert high[after].mean() - high[~after].mean() > 0.1
    shift = (np.median(x[after], 0) - np.median(x[~after], 0)) / (x[~after].std(0) + 1e-9)
    assert (np.abs(shift) > 0.2).sum() >= 3  # several input features moved
    half = (~after).sum() // 2  # no drift inside the reference period
    assert abs(high[:half].mean() - high[half : 2 * half].mean()) < 0.03


def test_simulate_quiet_is_the_default_population_with_nothing_injected() -> None:
    quiet_lines, quiet = simulate("quiet", 2_000, seed=5)
    _, default = simulate("default", 2_000, seed=5)
    assert quiet.incidents == [] and quiet.attackers == []
    assert set(quiet.benign_callers) == set(default.benign_callers) | set(default.attackers)
    assert quiet.models == default.models
    assert sum(1 for _ in quiet_lines) == 2_000


def test_simulate_bench_is_one_tabular_model_of_about_500_bytes() -> None:
    lines, truth = simulate("bench", 5_000, seed=5)
    events = [orjson.loads(line) for line in lines]
    sizes = [len(orjson.dumps(ev)) for ev in events]
    assert truth.incidents == [] and len(truth.benign_callers) == 500
    assert {ev["model_id"] for ev in events} == {"bench-tabular"}
    assert all(len(ev["input"]["features"]) == 16 for ev in events)
    assert all(set(ev["output"]["scores"]) == {"neg", "pos"} for ev in events if "output" in ev)
    assert 400 <= float(np.mean(sizes)) <= 650


def test_write_writes_the_events_and_the_truth_file(tmp_path: Path) -> None:
    seen: list[int] = []
    out = tmp_path / "events.jsonl"
    truth = write("default", 9_000, 2, out, progress=seen.append)
    raw = out.read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 9_000
    assert seen[-1] == 9_000 and seen == sorted(seen)
    saved = orjson.loads((tmp_path / "events.truth.json").read_bytes())
    assert saved["attackers"] == truth.attackers
    assert [i["event_count"] for i in saved["incidents"]] == [
        i.event_count for i in truth.incidents
    ]
    lines, _ = simulate("default", 9_000, 2)
    assert raw == b"".join(line + b"\n" for line in lines)


def test_simulate_rejects_an_unknown_scenario() -> None:
    with pytest.raises(ValueError, match="unknown scenario 'noisy'"):
        simulate("noisy", 10, seed=1)
