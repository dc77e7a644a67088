"""Alert v1: its fields, the one constructor every producer uses, the one severity decision, and
its form when it leaves the process.

In the process an alert is an :class:`Alert` (a dict, as it flows through the lifecycle, the
buffers and the outbox) whose times are epoch milliseconds. On the wire (a route's body,
``inferwatch alerts --format jsonl``) every time is RFC 3339 UTC with ``Z`` and milliseconds
(:func:`to_wire`); ``alert_v1.schema.json`` describes that form. Epoch values stay only in
evidence fields whose names end in ``_ms``.

>>> a = new_alert(detector="abuse.rate_spike", detector_version="1", model_id="fraud",
...               entity_type="api_key", entity="k1", episode_start_ms=1796679000000,
...               status="firing", ts_ms=1796679000123, emitted_at_ms=1796679001000,
...               severity="medium", score=4.0, threshold=1.0, title="t", summary="s",
...               first_seen_ms=1796679000000, last_seen_ms=1796679000123, event_count=3)
>>> to_wire(a)["ts"], severity(a["severity"], a["score"], a["threshold"], "critical")
('2026-12-07T21:30:00.123Z', 'critical')
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any, TypedDict

from schemas.ids import stable_id
from schemas.timestamps import format_ms

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("alert_v1.schema.json")
SEVERITIES = ("info", "low", "medium", "high", "critical")
STATUSES = ("firing", "resolved", "silenced")
ENTITY_TYPES = ("api_key", "client_ip", "tenant", "model", "feature", "session", "global")
TIME_FIELDS = ("ts", "emitted_at", "resolved_at", "first_seen", "last_seen")
CRITICALITY_SHIFT = {"low": -1, "medium": 0, "high": 0, "critical": 1}
RUNBOOK_BASE = "https://inferwatch.invalid/runbooks/"  # replaced by config in the routes issue


class LinkedEntity(TypedDict):
    type: str
    id: str


class Alert(TypedDict):
    """Alert v1 in the process (times in epoch milliseconds)."""

    alert_id: str
    schema_version: int
    ts: int  # event time at which the decision crossed its threshold
    emitted_at: int  # wall clock
    detector: str
    detector_version: str
    severity: str  # one of SEVERITIES
    status: str  # one of STATUSES
    resolved_at: int | None
    model_id: str
    tenant: str
    entity_type: str  # one of ENTITY_TYPES
    entity: str
    linked_entities: list[LinkedEntity]
    score: float
    threshold: float
    title: str
    summary: str
    atlas: list[str]
    owasp: list[str]
    evidence: dict[str, Any]
    first_seen: int
    last_seen: int
    event_count: int
    sample_event_ids: list[str]
    incident_id: str
    runbook: str


FIELDS = tuple(Alert.__annotations__)


def alert_id(detector: str, model_id: str, entity_type: str, entity: str, start_ms: int) -> str:
    """Hashes (detector, model, entity type, entity, episode start in event time): a replay with
    another interleaving of partitions gives the same id."""
    return stable_id("alert", detector, model_id, entity_type, entity, start_ms)


def new_alert(
    *,
    detector: str,
    detector_version: str,
    model_id: str,
    entity_type: str,
    entity: str,
    episode_start_ms: int,
    status: str,
    ts_ms: int,
    emitted_at_ms: int,
    severity: str,
    score: float,
    threshold: float,
    title: str,
    summary: str,
    first_seen_ms: int,
    last_seen_ms: int,
    event_count: int,
    tenant: str = "",
    resolved_ms: int | None = None,
    evidence: Mapping[str, Any] | None = None,
    linked_entities: Iterable[tuple[str, str]] = (),
    sample_event_ids: Iterable[str] = (),
    atlas: Iterable[str] = (),
    owasp: Iterable[str] = (),
) -> Alert:
    """One alert v1 record. ``severity`` is the producer's own (the lifecycle then decides the
    one a person sees, :func:`severity`); a resolved alert's ``resolved_at`` is ``resolved_ms``,
    else its ``ts``. A value outside the contract is a bug: ValueError."""
    if severity not in SEVERITIES:
        raise ValueError(f"alert severity {severity!r}: expected one of {', '.join(SEVERITIES)}")
    if status not in STATUSES:
        raise ValueError(f"alert status {status!r}: expected one of {', '.join(STATUSES)}")
    return {
        "alert_id": alert_id(detector, model_id, entity_type, entity, episode_start_ms),
        "schema_version": SCHEMA_VERSION,
        "ts": ts_ms,
        "emitted_at": emitted_at_ms,
        "detector": detector,
        "detector_version": detector_version,
        "severity": severity,
        "status": status,
        "resolved_at": (resolved_ms or ts_ms) if status == "resolved" else None,
        "model_id": model_id,
        "tenant": tenant,
        "entity_type": entity_type,
        "entity": entity,
        "linked_entities": [{"type": t, "id": i} for t, i in linked_entities],
        "score": float(score),
        "threshold": float(threshold),
        "title": title,
        "summary": summary,
        "atlas": list(atlas),
        "owasp": list(owasp),
        "evidence": dict(evidence or {}),
        "first_seen": first_seen_ms,
        "last_seen": last_seen_ms,
        "event_count": int(event_count),
        "sample_event_ids": list(sample_event_ids),
        "incident_id": "",
        "runbook": RUNBOOK_BASE + detector,
    }


def severity(base: str, score: float, threshold: float, criticality: str | None) -> str:
    """The severity a person sees: the producer's, +1 for a crossing of three times the
    threshold, shifted by the model's criticality in the inventory (low: one down, critical: one
    up), between info and critical.

    >>> severity("medium", 4.0, 1.0, "critical"), severity("low", 1.1, 1.0, "low")
    ('critical', 'info')
    """
    level = SEVERITIES.index(base) if base in SEVERITIES else 2
    if threshold > 0 and score >= 3 * threshold:
        level += 1
    level += CRITICALITY_SHIFT.get(criticality or "medium", 0)
    return SEVERITIES[max(0, min(level, len(SEVERITIES) - 1))]


def to_wire(alert: Mapping[str, Any]) -> dict[str, Any]:
    """``alert`` as it leaves the process: every time field as RFC 3339 UTC text (``Z``,
    milliseconds); epoch milliseconds or datetimes (as the store returns them) are accepted."""
    out = dict(alert)
    for name in TIME_FIELDS:
        value = out.get(name)
        if value is not None and not isinstance(value, str):
            out[name] = format_ms(value)
    return out


@cache
def json_schema() -> dict[str, Any]:
    """The JSON Schema of alert v1 on the wire."""
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return schema
