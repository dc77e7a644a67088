"""Finding v1: one detector's verdict on one event, below the alert level.

Findings are built a batch at a time, as columns (``streams/store/rows.py``), so the definition
here is the field list, the id and the form on the wire: the event's ``ts`` as RFC 3339 UTC with
``Z`` and milliseconds (:func:`to_wire`), as ``finding_v1.schema.json`` describes.

>>> finding_id("e1", "abuse.rate_spike") == finding_id("e1", "abuse.rate_spike")
True
>>> to_wire({"ts": 1796679000123})["ts"]
'2026-12-07T21:30:00.123Z'
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, TypedDict

from schemas.ids import stable_id
from schemas.timestamps import format_ms

SCHEMA_PATH = Path(__file__).with_name("finding_v1.schema.json")
TIME_FIELDS = ("ts",)


class Finding(TypedDict):
    """Finding v1 in the process (``ts`` in epoch milliseconds)."""

    finding_id: str
    event_id: str
    ts: int  # the event's time
    model_id: str
    api_key_id: str
    client_ip: str
    session_id: str
    detector: str
    detector_version: str
    label: str  # e.g. injection, card_number, near_duplicate_query
    score: float
    atlas: list[str]
    owasp: list[str]
    evidence: str  # compact JSON text, already redacted


FIELDS = tuple(Finding.__annotations__)


def finding_id(event_id: str, detector: str) -> str:
    """Deterministic: one finding per (event, detector), whatever the replay."""
    return stable_id("finding", event_id, detector)


def to_wire(finding: Mapping[str, Any]) -> dict[str, Any]:
    """``finding`` as it leaves the process: ``ts`` as RFC 3339 UTC text."""
    out = dict(finding)
    for name in TIME_FIELDS:
        value = out.get(name)
        if value is not None and not isinstance(value, str):
            out[name] = format_ms(value)
    return out


@cache
def json_schema() -> dict[str, Any]:
    """The JSON Schema of finding v1 on the wire."""
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return schema
