"""The alert lifecycle through a real worker (issue 5, items 1 and 3): incidents stored and
notified per group at a loopback webhook, the same ids on replay, silences and allow-list
entries that suppress alerts but never findings, verdicts recorded and shown by the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from detectors.registry import create_all
from streams.alerting import analyst
from streams.alerting.lifecycle import AllowEntry, Silence
from streams.alerting.webhook import WebhookRoute, WebhookSettings
from streams.sim.simulate import write as simulate_write
from streams.sources.base import FileSource
from streams.store.store import Store
from streams.worker.loop import Worker, WorkerSettings
from tests.support.cli import run_cli
from tests.support.receiver import serve

SETTINGS = WorkerSettings(batch_max=2_000, checkpoint_events=6_000, checkpoint_s=3600)
FAR = 4_102_444_800_000  # 2100-01-01


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("traffic") / "traffic.jsonl"
    simulate_write("default", 30_000, 11, path)
    return path


def run(path: Path, store_dir: Path, url: str | None = None, setup: Any = None) -> dict[str, Any]:
    """Run a worker over ``path`` (grouped webhook at ``url``); what the store then holds."""
    routes = [WebhookRoute(WebhookSettings(url, notify="incidents"))] if url else []
    source = FileSource(path)
    try:
        with Store(f"chdb:{store_dir}") as store:
            if setup is not None:
                setup(store)
            Worker(store, source, create_all(), SETTINGS, routes=routes).run()
            q = store.query
            return {
                "alerts": {
                    r[0]: r[1:]
                    for r in q(
                        "SELECT alert_id, status, incident_id, detector, entity, evidence, "
                        "entity_type FROM alerts FINAL"
                    ).result_rows
                },
                "incidents": {
                    r[0]: r[1:]
                    for r in q(
                        "SELECT incident_id, status, alert_ids FROM incidents FINAL"
                    ).result_rows
                },
                "findings": Counter(
                    dict(
                        q(
                            "SELECT detector, count() FROM findings FINAL GROUP BY detector"
                        ).result_rows
                    )
                ),
            }
    finally:
        source.close()


@pytest.fixture(scope="module")
def baseline(traffic: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    with serve() as rec:
        out = run(traffic, tmp_path_factory.mktemp("baseline") / "store", rec.url)
    out["requests"] = [json.loads(r["body"]) | {"key": r["headers"]["Idempotency-Key"]}
                       for r in rec.requests]  # fmt: skip
    return out


def test_incidents_group_alerts_and_are_notified_per_group(baseline: dict[str, Any]) -> None:
    alerts, incidents, notes = baseline["alerts"], baseline["incidents"], baseline["requests"]
    assert alerts and incidents and notes
    # every alert belongs to an incident that lists it; all of a group's alerts share a detector
    # and model (the default group_by)
    for aid, (_, incident_id, *_rest) in alerts.items():
        assert aid in incidents[incident_id][1]
    # each notification names its incident; keys are incident:n, counting up from 1 per group
    by_incident: dict[str, list[int]] = {}
    for n in notes:
        assert n["key"] == f"{n['incident_id']}:{n['notification']}"
        by_incident.setdefault(n["incident_id"], []).append(n["notification"])
    assert all(v == list(range(1, len(v) + 1)) for v in by_incident.values())
    # every alert that was not silenced reached the receiver inside a notification
    notified = {a["alert_id"] for n in notes for a in n["alerts"]}
    assert notified == {a for a, (status, *_r) in alerts.items() if status != "silenced"}
    # at the end of a file every group was flushed: the last notification of an incident whose
    # alerts all resolved says resolved, and the incident is resolved
    for incident_id, (status, ids) in incidents.items():
        if all(alerts[a][0] == "resolved" for a in ids):
            assert status == "resolved"
            assert [n for n in notes if n["incident_id"] == incident_id][-1]["status"] == (
                "resolved"
            )


def test_a_replay_gives_the_same_incident_ids_and_notifications(
    traffic: Path, tmp_path: Path, baseline: dict[str, Any]
) -> None:
    with serve() as rec:
        again = run(traffic, tmp_path / "store", rec.url)
    assert again["incidents"].keys() == baseline["incidents"].keys()
    assert {a: v[:2] for a, v in again["alerts"].items()} == {
        a: v[:2] for a, v in baseline["alerts"].items()
    }
    keys = [r["headers"]["Idempotency-Key"] for r in rec.requests]
    assert keys == [n["key"] for n in baseline["requests"]]


def test_a_silence_suppresses_alerts_and_keeps_every_finding(
    traffic: Path, tmp_path: Path, baseline: dict[str, Any]
) -> None:
    detector = "abuse.rate_spike"
    assert any(v[2] == detector for v in baseline["alerts"].values())
    silence = analyst.new_silence([f"detector={detector}"], FAR, "ana", "test", starts_ms=0)
    with serve() as rec:
        out = run(traffic, tmp_path / "store", rec.url, lambda st: analyst.add_silence(st, silence))
    ours = {a: v for a, v in out["alerts"].items() if v[2] == detector}
    assert ours.keys() == {a for a, v in baseline["alerts"].items() if v[2] == detector}
    for status, _, _, _, evidence, _ in ours.values():
        assert status in ("silenced", "resolved")
        if status == "silenced":
            assert json.loads(evidence)["suppressed_by"] == f"silence:{silence.silence_id}"
    notified = {a["alert_id"] for r in rec.requests for a in json.loads(r["body"])["alerts"]}
    assert not notified & ours.keys() and notified  # other detectors still page
    assert out["findings"] == baseline["findings"]  # nothing dropped


def test_an_allow_list_entry_suppresses_its_entity_and_keeps_every_finding(
    traffic: Path, tmp_path: Path, baseline: dict[str, Any]
) -> None:
    aid, (_, _, _, entity, _, entity_type) = next(
        (a, v) for a, v in sorted(baseline["alerts"].items()) if v[5] in ("api_key", "client_ip")
    )
    entry = analyst.new_allow(entity_type, entity, "", FAR, "ana", "pen test")
    out = run(traffic, tmp_path / "store", None, lambda st: analyst.add_allow(st, entry))
    status, _, _, _, evidence, _ = out["alerts"][aid]
    assert status in ("silenced", "resolved")
    if status == "silenced":
        assert json.loads(evidence)["suppressed_by"] == f"allow:{entry.allow_id}"
    others = {a: v[0] for a, v in out["alerts"].items() if v[3] != entity}
    assert others == {a: v[0] for a, v in baseline["alerts"].items() if v[3] != entity}
    assert out["findings"] == baseline["findings"]


def test_verdicts_and_assignments_are_recorded_and_shown(traffic: Path, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    run(traffic, store_dir)
    store = f"chdb:{store_dir}"
    listed = run_cli("incidents", "list", "--store", store, "--format", "jsonl")
    assert listed.returncode == 0, listed.stderr
    incident_id = json.loads(listed.stdout.splitlines()[0])["incident_id"]
    env = {"INFERWATCH_OPERATOR": "ana"}
    assigned = run_cli("incidents", "assign", incident_id, "--to", "bo", "--store", store, env=env)
    assert assigned.returncode == 0, assigned.stderr
    closed = run_cli("incidents", "close", incident_id, "--verdict", "true_positive", "--note",
                     "confirmed extraction", "--store", store, env=env)  # fmt: skip
    assert closed.returncode == 0, closed.stderr
    shown = run_cli("incidents", "show", incident_id, "--store", store)
    assert shown.returncode == 0, shown.stderr
    for text in ("true_positive", "verdict_by   ana", "assignee     bo", "closed",
                 "ana: confirmed extraction"):  # fmt: skip
        assert text in shown.stdout, shown.stdout
    bad = run_cli("incidents", "close", incident_id, "--verdict", "maybe", "--store", store)
    assert bad.returncode == 2 and "expected one of true_positive" in bad.stderr
    missing = run_cli("incidents", "ack", "nope", "--store", store)
    assert missing.returncode == 2 and "no incident 'nope'" in missing.stderr
    closed_only = run_cli("incidents", "list", "--status", "closed", "--store", store,
                          "--format", "jsonl")  # fmt: skip
    assert [json.loads(x)["incident_id"] for x in closed_only.stdout.splitlines()] == [incident_id]


def test_silence_and_allow_commands_add_list_and_expire(tmp_path: Path) -> None:
    store = f"chdb:{tmp_path / 'store'}"
    env = {"INFERWATCH_OPERATOR": "ana"}
    added = run_cli("silence", "add", "-m", "detector=abuse.rate_spike", "-m", "model_id=fraud",
                    "--for", "2h", "--comment", "deploy", "--store", store, env=env)  # fmt: skip
    assert added.returncode == 0 and "by ana" in added.stdout, added.stderr
    silence_id = added.stdout.split()[1]
    listed = run_cli("silence", "list", "--store", store, "--format", "jsonl")
    (row,) = [json.loads(x) for x in listed.stdout.splitlines()]
    assert row["matchers"] == "detector=abuse.rate_spike model_id=fraud" and row["author"] == "ana"
    assert run_cli("silence", "expire", silence_id, "--store", store).returncode == 0
    assert run_cli("silence", "list", "--store", store, "--format", "jsonl").stdout == ""
    everything = run_cli("silence", "list", "--all", "--store", store, "--format", "jsonl")
    assert json.loads(everything.stdout)["silence_id"] == silence_id
    allow = run_cli("allow", "add", "--entity-type", "api_key", "--entity", "key-7", "--for",
                    "1d", "--reason", "pen test", "--store", store)  # fmt: skip
    assert allow.returncode == 0, allow.stderr
    listed = run_cli("allow", "list", "--store", store, "--format", "jsonl")
    assert json.loads(listed.stdout)["entity"] == "key-7"
    for args, error in [
        (["silence", "add", "-m", "colour=red"], "unknown label 'colour'"),
        (["silence", "add", "-m", "entity=~("], "bad regular expression"),
        (["silence", "add", "-m", "detector=x", "--for", "soon"], "--for 'soon': expected"),
        (["silence", "add", "-m", "detector=x", "--until", "2020-01-01T00:00:00Z"], "future"),
        (["silence", "expire", "nope"], "no silence 'nope'"),
        (["allow", "add", "--entity-type", "user", "--entity", "x"], "entity type 'user'"),
        (["allow", "expire", "nope"], "no allow-list entry 'nope'"),
    ]:
        bad = run_cli(*args, "--store", store)
        assert bad.returncode == 2 and error in bad.stderr, (args, bad.stderr)


def test_silences_and_allow_entries_from_the_store_reach_a_new_worker(tmp_path: Path) -> None:
    with Store(f"chdb:{tmp_path / 'store'}") as st:
        s = analyst.add_silence(st, analyst.new_silence(["entity=k"], FAR, "ana"))
        a = analyst.add_allow(st, analyst.new_allow("api_key", "k", "", FAR, "ana"))
        assert analyst.silences(st) == [s] and analyst.allow_entries(st) == [a]
        assert isinstance(s, Silence) and isinstance(a, AllowEntry)
        analyst.expire_silence(st, s.silence_id)
        assert analyst.silences(st) == [] and len(analyst.silences(st, True)) == 1
