"""Alert lifecycle (issue 5, item 1): grouping like Alertmanager's, severity, silences,
allow-lists and deterministic incident ids, on an injected clock; notifications counted at a
real loopback webhook receiver."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import orjson
import pytest

from streams.alerting.lifecycle import (
    AllowEntry,
    Grouping,
    Lifecycle,
    Matcher,
    Notification,
    Silence,
    severity,
)
from streams.alerting.webhook import WebhookRoute, WebhookSettings
from tests.support.receiver import serve

S, MIN = 1_000, 60_000
STORM = Grouping(("detector", "model_id"), 30 * S, 5 * MIN, 4 * 60 * MIN)


def alert(key: int, ts: int, status: str = "firing", **kw: Any) -> dict[str, Any]:
    det = ("abuse.rate_spike", "extraction.query_pattern")[key % 2]
    return {
        "alert_id": f"{det}/{key}",
        "detector": det,
        "model_id": ("fraud", "risk", "chat")[key % 3],
        "entity_type": "api_key",
        "entity": f"key-{key}",
        "status": status,
        "severity": "medium",
        "score": 2.0,
        "threshold": 1.0,
        "ts": ts,
        "evidence": {},
        **kw,
    }


def storm(seed: int) -> list[tuple[int, dict[str, Any]]]:
    """100,000 triggers (firing updates) over 1,000 keys within one minute of event time."""
    rng = random.Random(seed)
    return sorted(
        (((t := rng.randrange(0, MIN)), alert(rng.randrange(1_000), t)) for _ in range(100_000)),
        key=lambda trigger: trigger[0],
    )


def run(lc: Lifecycle, triggers: list[tuple[int, dict[str, Any]]], end_ms: int, step_ms: int):
    """Feed the triggers in clock order, ticking ``due`` every ``step_ms`` up to ``end_ms``."""
    out: list[Notification] = []
    records: dict[str, dict[str, Any]] = {}
    i, now = 0, 0
    while now <= end_ms:
        batch = []
        while i < len(triggers) and triggers[i][0] <= now:
            batch.append(triggers[i][1])
            i += 1
        for rec in lc.observe(batch, now):
            records[rec["alert_id"]] = rec
        out += lc.due(now)
        now += step_ms
    return out, records


def test_a_storm_is_one_notification_per_group_plus_one_per_interval_at_the_receiver() -> None:
    triggers = storm(5)
    groups = {(a["detector"], a["model_id"]) for _, a in triggers}
    end = 12 * MIN
    notes, records = run(Lifecycle(STORM), triggers, end, 1 * S)
    with serve() as rec:
        route = WebhookRoute(WebhookSettings(rec.url))
        for n in notes:
            body = orjson.dumps({"key": n.key, "status": n.status, "alerts": n.total_alerts})
            assert route.deliver(n.key, body).delivered
        per_group = Counter(orjson.loads(r["body"])["key"].split(":")[0] for r in rec.requests)
    # every group notified; none more than once at group_wait plus once per elapsed interval
    allowed = 1 + (end - 30 * S) // STORM.group_interval_ms
    assert len(per_group) == len(groups) == 6
    assert max(per_group.values()) <= allowed, per_group
    assert len(rec.requests) == len(notes) <= len(groups) * allowed
    assert {r["incident_id"] for r in records.values()} == set(per_group)
    # each group's first notification waits group_wait from the tick that saw its first trigger
    seen: dict[str, int] = {}
    for t, a in triggers:
        seen.setdefault(records[a["alert_id"]]["incident_id"], -(-t // S) * S)
    first = {n.incident_id: n.at_ms for n in reversed(notes)}
    assert first == {i: t + 30 * S for i, t in seen.items()}
    assert sum(n.total_alerts for n in notes if n.at_ms == 30 * S) <= 1_000


def test_a_replay_gives_the_same_alert_records_incident_ids_and_notifications() -> None:
    triggers = storm(9)[:20_000]
    a = run(Lifecycle(STORM), triggers, 15 * MIN, 1 * S)
    b = run(Lifecycle(STORM), triggers, 15 * MIN, 1 * S)
    assert [(n.key, n.status, n.total_alerts, n.at_ms) for n in a[0]] == [
        (n.key, n.status, n.total_alerts, n.at_ms) for n in b[0]
    ]
    assert a[1] == b[1]


def test_group_interval_batches_changes_and_resolution_ends_the_incident() -> None:
    lc = Lifecycle(Grouping(("detector",), 10 * S, 60 * S, 3_600 * S))
    lc.observe([alert(0, 0)], 0)
    assert [n.key[-2:] for n in lc.due(10 * S)] == [":1"]
    lc.observe([alert(2, 15 * S)], 15 * S)  # same detector: same group, changed
    assert lc.due(40 * S) == []  # within group_interval
    (second,) = lc.due(70 * S)
    assert second.total_alerts == 2 and second.status == "firing"
    lc.observe([alert(0, 80 * S, "resolved"), alert(2, 80 * S, "resolved")], 80 * S)
    (last,) = lc.due(130 * S)
    assert last.status == "resolved" and last.key.endswith(":3")
    assert lc.groups == {}
    (inc,) = lc.take_incidents()
    assert inc["status"] == "resolved" and inc["alert_ids"] == [
        "abuse.rate_spike/0",
        "abuse.rate_spike/2",
    ]
    # the next alert of the same group starts a new incident with a new id
    rec = lc.observe([alert(4, 200 * S)], 200 * S)[0]
    assert rec["incident_id"] != inc["incident_id"]


def test_an_unchanged_firing_group_is_re_sent_every_repeat_interval() -> None:
    lc = Lifecycle(Grouping(("detector",), 0, 60 * S, 600 * S))
    lc.observe([alert(0, 0)], 0)
    sent = [n.at_ms for t in range(0, 1_300 * S, 10 * S) for n in lc.due(t)]
    assert sent == [0, 600 * S, 1_200 * S]


def test_a_silence_suppresses_then_expires_and_the_alert_is_notified() -> None:
    silence = Silence("s1", (Matcher.parse("detector=abuse.rate_spike"),), 0, 100 * S, "ana")
    lc = Lifecycle(Grouping(("detector",), 0, 60 * S, 3_600 * S), silences=[silence])
    recs = lc.observe([alert(0, 5 * S), alert(1, 5 * S)], 5 * S)
    assert [r["status"] for r in recs] == ["silenced", "firing"]
    assert recs[0]["evidence"]["suppressed_by"] == "silence:s1"
    notes = [n for t in range(0, 100 * S, S) for n in lc.due(t)]
    assert [n.group_key for n in notes] == ["{detector='extraction.query_pattern'}"]
    (released,) = lc.due(100 * S)  # the silence ended; the alert still fires
    assert released.alerts[0]["alert_id"] == "abuse.rate_spike/0"
    assert "suppressed_by" not in released.alerts[0]["evidence"]


def test_an_allow_list_entry_suppresses_its_entity_only_until_it_expires() -> None:
    entry = AllowEntry("a1", "api_key", "key-0", "", 50 * S, "ana", "pen test")
    lc = Lifecycle(Grouping(("entity",), 0, 60 * S, 3_600 * S), allow=[entry])
    recs = lc.observe([alert(0, 0), alert(1, 0)], 0)
    assert [r["status"] for r in recs] == ["silenced", "firing"]
    assert recs[0]["evidence"]["suppressed_by"] == "allow:a1"
    assert [n.group_key for n in lc.due(0)] == ["{entity='key-1'}"]
    # resolved while allow-listed: recorded, never notified
    assert lc.observe([alert(0, 10 * S, "resolved")], 10 * S)[0]["status"] == "resolved"
    assert lc.due(60 * S) == [] and lc.due(61 * S) == []


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("detector", "expected LABEL=VALUE"),
        ("colour=red", "unknown label 'colour'"),
        ("entity=~key-(", "bad regular expression"),
    ],
)
def test_bad_matchers_are_named(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Matcher.parse(text)


def test_matchers_and_severity() -> None:
    a = alert(7, 0)
    assert Matcher.parse("entity=~key-[0-9]+").matches(a)
    assert Matcher.parse("model_id!=risk").matches(a) is False  # key 7 -> risk
    assert Matcher.parse("detector!~abuse.*").matches(a)  # key 7 -> extraction
    assert Matcher.parse("detector=~abuse.*").matches(a) is False
    assert severity("high", 1.0, 1.0, "critical") == "critical"
    assert severity("info", 1.0, 1.0, "low") == "info"
    assert severity("medium", 3.0, 1.0, None) == "high"
    with pytest.raises(ValueError, match="group_by"):
        Grouping(("colour",))
