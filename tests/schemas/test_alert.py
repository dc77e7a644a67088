"""Alert v1 and finding v1 (schemas/alert.py, schemas/finding.py): one alert from every producer
validates against the JSON Schema once it leaves the process, with one time format."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from detectors.base import AlertChange
from schemas import alert, finding
from schemas.timestamps import format_ms
from streams.alerting.health import PipelineHealth
from streams.alerting.lifecycle import Grouping, Lifecycle, Matcher, Silence
from streams.alerting.outage import RefusedDeliveries, SinkOutage
from streams.alerting.outbox import alert_json
from streams.sources.retention_gap import RetentionGap
from streams.store import rows

T0 = 1_796_679_000_123  # 2026-12-07T21:30:00.123Z
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def detector_alert(status: str = "firing") -> dict[str, Any]:
    change = AlertChange(
        entity_type="api_key", entity="k1", model_id="fraud", tenant="t", status="firing",
        ts_ms=T0, episode_start_ms=T0 - 60_000, first_seen_ms=T0 - 60_000, last_seen_ms=T0,
        score=9.0, threshold=2.0, severity="medium", title="rate spike", summary="s",
        evidence={"rate": 9.0, "window_start_ms": T0 - 60_000}, event_count=40,
        sample_event_ids=("e1", "e2"), linked_entities=(("client_ip", "10.0.0.1"),),
    )  # fmt: skip
    if status == "resolved":
        change = AlertChange(**{**vars_of(change), "status": "resolved", "resolved_ms": T0 + 5})
    return dict(rows.alert_record(change, "abuse.rate_spike", "1", ("AML.T0040",), (), T0 + 9))


def vars_of(change: AlertChange) -> dict[str, Any]:
    return {f: getattr(change, f) for f in AlertChange.__dataclass_fields__}


def every_producer() -> dict[str, dict[str, Any]]:
    clock = Clock()
    health = PipelineHealth("kafka:x", lag_events=10, lag_s=1, dlq_min=1, clock=clock)
    health.check({0: 50}, 0, 0, T0)
    clock.now = 2
    (lag,) = health.check({0: 50}, 0, 0, T0)
    (dlq,) = health.check({0: 50}, 90, 100, T0)
    refused = RefusedDeliveries("webhook", T0)
    refused.update(3, None, T0)
    outage = SinkOutage("chdb:/x", "down", T0, ())
    lc = Lifecycle(
        Grouping(), silences=[Silence("s1", (Matcher.parse("entity=k1"),), 0, 2 * T0, "me")]
    )
    (silenced,) = lc.observe([detector_alert()], T0)
    (grouped,) = Lifecycle(Grouping()).observe([detector_alert("resolved")], T0)
    return {
        "detector": detector_alert(),
        "detector resolved, grouped": grouped,
        "lifecycle silenced": silenced,
        "pipeline.consumer_lag": dict(lag),
        "pipeline.dead_letter_spike": dict(dlq),
        "pipeline.sink_paused firing": dict(outage.record(resolved=False)),
        "pipeline.sink_paused resolved": dict(outage.record(resolved=True)),
        "pipeline.delivery_refused": dict(refused.record(resolved=False)),
        "pipeline.retention_gap": dict(RetentionGap("t", 2, 100, 250).alert_record(T0, T0 + 1)),
    }


@pytest.mark.parametrize("producer", sorted(every_producer()))
def test_alert_of_every_producer_validates_against_alert_v1_on_the_wire(producer: str) -> None:
    record = every_producer()[producer]
    assert set(record) == set(alert.FIELDS)
    body = json.loads(alert_json(record))  # the route's body
    Draft202012Validator(alert.json_schema()).validate(body)
    for name in alert.TIME_FIELDS:
        assert body[name] is None or TIME.fullmatch(body[name]), (name, body[name])
    assert body["ts"] == format_ms(record["ts"])


def test_alert_schema_is_valid_and_lists_exactly_the_typed_fields() -> None:
    for module in (alert, finding):
        schema = module.json_schema()
        Draft202012Validator.check_schema(schema)
        assert schema["required"] == list(module.FIELDS) == list(schema["properties"])


def test_new_alert_refuses_a_severity_or_status_outside_the_contract() -> None:
    good = detector_alert()
    args = dict(
        detector="d", detector_version="1", model_id="m", entity_type="global", entity="e",
        episode_start_ms=0, status="firing", ts_ms=T0, emitted_at_ms=T0, severity="high",
        score=1.0, threshold=1.0, title="t", summary="", first_seen_ms=T0, last_seen_ms=T0,
        event_count=0,
    )  # fmt: skip
    assert alert.new_alert(**args)["alert_id"] != good["alert_id"]
    with pytest.raises(ValueError, match="severity 'urgent'"):
        alert.new_alert(**{**args, "severity": "urgent"})
    with pytest.raises(ValueError, match="status 'open'"):
        alert.new_alert(**{**args, "status": "open"})


def test_one_time_format_for_epoch_milliseconds_and_store_datetimes() -> None:
    stored = dt.datetime(2026, 12, 7, 21, 30, 0, 123000, tzinfo=dt.UTC)
    assert format_ms(T0) == format_ms(stored) == format_ms(stored.replace(tzinfo=None))
    assert format_ms(T0) == "2026-12-07T21:30:00.123Z"
    wire = finding.to_wire({"ts": stored, "finding_id": finding.finding_id("e1", "d")})
    assert wire["ts"] == "2026-12-07T21:30:00.123Z"
