"""The read-only, parameterised queries the CLI (and the worker's local API) run on the store.

Every query reads deduplicated rows (``FINAL``), so a replay or a retried flush never shows a
row twice. Queries are named: the local API accepts a name and parameters, never SQL text.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson

from schemas.timestamps import format_ms
from streams.alerting.outbox_commands import deliveries
from streams.store.store import Store

ALERT_COLUMNS = (
    "alert_id, schema_version, ts, emitted_at, detector, detector_version, severity, status, "
    "resolved_at, model_id, tenant, entity_type, entity, linked_entities, score, threshold, "
    "title, summary, atlas, owasp, evidence, first_seen, last_seen, event_count, "
    "sample_event_ids, incident_id, runbook"
)
FINDING_COLUMNS = (
    "finding_id, event_id, ts, model_id, api_key_id, client_ip, session_id, detector, "
    "detector_version, label, score, atlas, owasp, evidence"
)
JSON_TEXT_FIELDS = ("linked_entities", "evidence")
DEAD_LETTER_COLUMNS = (
    "received_at, reason, source, source_partition, source_offset, gap_to, event_id, field, "
    "detail, raw_bytes, fingerprint, stored_fingerprint, structure"
)


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> int | None:
    """Seconds of ``30m``, ``2h``, ``7d`` (or ``45s``); None if ``text`` is not one."""
    if text[-1:] in DURATION_UNITS and text[:-1].isdigit():
        return int(text[:-1]) * DURATION_UNITS[text[-1]]
    return None


def parse_since(text: str | None, now: dt.datetime | None = None) -> dt.datetime | None:
    """``30m``, ``2h``, ``7d``, or an RFC 3339 time; None means no bound.

    >>> parse_since("2h", dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)).isoformat()
    '2026-01-01T10:00:00+00:00'
    >>> parse_since("yesterday")
    Traceback (most recent call last):
    ...
    ValueError: --since 'yesterday': expected a duration like 30m, 2h, 7d or an RFC 3339 time
    """
    if not text:
        return None
    now = now or dt.datetime.now(dt.UTC)
    seconds = duration_s(text)
    if seconds is not None:
        return now - dt.timedelta(seconds=seconds)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--since {text!r}: expected a duration like 30m, 2h, 7d or an RFC 3339 time"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _rows(store: Store, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    result = store.query(sql, params)
    names = result.column_names
    out = []
    for row in result.result_rows:
        rec = dict(zip(names, row, strict=True))
        for key in JSON_TEXT_FIELDS:
            if isinstance(rec.get(key), str) and rec[key]:
                rec[key] = orjson.loads(rec[key])
        out.append(rec)
    return out


def alerts(
    store: Store,
    since: str | None = None,
    detector: str | None = None,
    status: str | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Alerts newest first (by event time of the crossing)."""
    where, params = _filters(since, detector)
    if status:
        where.append("status = {status:String}")
        params["status"] = status
    sql = (
        f"SELECT {ALERT_COLUMNS} FROM alerts FINAL WHERE {' AND '.join(where) or '1'} "
        "ORDER BY ts DESC, alert_id LIMIT {limit:UInt32}"
    )
    return _rows(store, sql, {**params, "limit": limit})


def findings(
    store: Store, since: str | None = None, detector: str | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    where, params = _filters(since, detector)
    sql = (
        f"SELECT {FINDING_COLUMNS} FROM findings FINAL WHERE {' AND '.join(where) or '1'} "
        "ORDER BY ts DESC, finding_id LIMIT {limit:UInt32}"
    )
    return _rows(store, sql, {**params, "limit": limit})


def _filters(since: str | None, detector: str | None) -> tuple[list[str], dict[str, Any]]:
    where: list[str] = []
    params: dict[str, Any] = {}
    bound = parse_since(since)
    if bound is not None:
        where.append("ts >= {since:DateTime64(3, 'UTC')}")
        params["since"] = bound
    if detector:
        where.append("detector = {detector:String}")
        params["detector"] = detector
    return where, params


def dead_letters(
    store: Store, since: str | None = None, reason: str | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    """Rejected messages as stored (redacted, streams/worker/dead_letters.py), newest first by the
    time
    they were received; ``raw`` is left out."""
    from schemas.batch import REJECT_REASONS

    where: list[str] = []
    params: dict[str, Any] = {"limit": limit}
    bound = parse_since(since)
    if bound is not None:
        where.append("received_at >= {since:DateTime64(3, 'UTC')}")
        params["since"] = bound
    if reason:
        known = (*REJECT_REASONS, "retention_gap")
        if reason not in known:
            raise ValueError(f"--reason {reason!r}: expected one of {', '.join(known)}")
        where.append("reason = {reason:String}")
        params["reason"] = reason
    sql = (
        f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters FINAL WHERE {' AND '.join(where) or '1'} "
        "ORDER BY received_at DESC, source, source_partition, source_offset, reason "
        "LIMIT {limit:UInt32}"
    )
    return _rows(store, sql, params)


def counts(store: Store) -> dict[str, int]:
    """Deduplicated row counts of the main tables (the demo's and the tests' summary)."""
    out = {}
    for table in ("events", "findings", "alerts", "window_metrics", "dead_letters"):
        out[table] = int(store.query(f"SELECT count() FROM {table} FINAL").result_rows[0][0])
    return out


def incidents(
    store: Store, status: str | None = None, incident_id: str | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    """Incidents, most recent first; with ``incident_id``, that one with its alerts."""
    from streams.alerting import analyst

    if incident_id:
        inc = analyst.get_incident(store, incident_id)
        inc["alerts"] = _rows(
            store,
            "SELECT alert_id, detector, status, severity, entity_type, entity, title "
            "FROM alerts FINAL WHERE incident_id = {i:String} ORDER BY ts",
            {"i": incident_id},
        )
        return [inc]
    if status is not None and status not in analyst.INCIDENT_STATUSES:
        raise ValueError(
            f"--status {status!r}: expected one of {', '.join(analyst.INCIDENT_STATUSES)}"
        )
    return analyst.list_incidents(store, status)[:limit]


def silences(store: Store, scope: str = "active") -> list[dict[str, Any]]:
    """Silences (``scope`` active or all)."""
    from streams.alerting import analyst

    return [
        {"silence_id": s.silence_id, "matchers": " ".join(map(str, s.matchers)),
         "starts": iso_ms(s.starts_ms), "ends": iso_ms(s.ends_ms), "author": s.author,
         "comment": s.comment}
        for s in analyst.silences(store, include_expired=_all(scope))
    ]  # fmt: skip


def allow_list(store: Store, scope: str = "active") -> list[dict[str, Any]]:
    """Allow-list entries (``scope`` active or all)."""
    from streams.alerting import analyst

    return [
        {"allow_id": a.allow_id, "entity_type": a.entity_type, "entity": a.entity,
         "model_id": a.model_id or "*", "ends": iso_ms(a.ends_ms), "author": a.author,
         "reason": a.reason}
        for a in analyst.allow_entries(store, include_expired=_all(scope))
    ]  # fmt: skip


def _all(scope: str) -> bool:
    if scope not in ("active", "all"):
        raise ValueError(f"scope {scope!r}: expected active or all")
    return scope == "all"


def iso_ms(ms: int) -> str:
    """A stored epoch-millisecond time as the CLI prints it (``schemas.timestamps.format_ms``)."""
    return format_ms(ms)


def references(
    store: Store, model: str | None = None, version: str | None = None
) -> list[dict[str, Any]]:
    """Each (model, version)'s reference state: frozen (with its source: auto, or operator for
    a file or a time range) from ``model_references``; building (events of the target,
    callers, the callers over their share) from the builders the last checkpoint saved."""
    from detectors.models.reference import Reference
    from detectors.models.reference_store import building_of
    from streams.worker.checkpoint import REFERENCE_PRECEDENCE, REFERENCES, load_blob

    out: dict[tuple[str, str], dict[str, Any]] = {}
    blob = load_blob(store, REFERENCES)
    for b in building_of(blob) if blob else []:
        out[(b.model_id, b.model_version)] = {
            "model_id": b.model_id, "model_version": b.model_version, "state": "building",
            "source": "", "events": b.n, "target": b.target, "callers": b.callers,
            "capped_callers": [name for name, _ in b.capped], "events_seen": b.seen,
            "largest_share": round(b.largest_share, 4), "allowed_share": round(b.allowed_share, 4),
            "first_event": _iso(b.first_ts_ms), "last_event": _iso(b.last_ts_ms),
            "created_at": None, "detail": b.reason,
        }  # fmt: skip
    first = REFERENCE_PRECEDENCE  # the reference in force: an operator's, then the newest
    rows = store.query(
        f"SELECT model_id, model_version, argMax(source, {first}), argMax(data, {first}), "
        f"argMax(created_at, {first}) FROM model_references GROUP BY model_id, model_version",
        binary=True,
    ).result_rows
    for _, _, source, data, created in rows:
        ref = Reference.from_bytes(bytes(data))
        src = _text(source)
        out[(ref.model_id, ref.model_version)] = {
            "model_id": ref.model_id, "model_version": ref.model_version, "state": "frozen",
            "source": "auto" if src == "auto" else f"operator ({src})", "events": ref.n_events,
            "target": ref.n_events, "callers": ref.callers,
            "capped_callers": list(ref.capped_callers), "events_seen": ref.events_seen,
            "largest_share": round(ref.max_caller_events / max(ref.n_events, 1), 4),
            "allowed_share": None, "first_event": _iso(ref.first_ts_ms),
            "last_event": _iso(ref.last_ts_ms), "created_at": created,
            "detail": f"score type {ref.score_type}, {len(ref.feature_names)} features, "
            f"channels {', '.join(ref.channels) or '-'}",
        }  # fmt: skip
    return [
        row
        for key, row in sorted(out.items())
        if (model is None or key[0] == model) and (version is None or key[1] == version)
    ]


def _iso(ms: int) -> str | None:
    return None if ms == -(2**63) else iso_ms(ms)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


QUERIES = {
    "alerts": alerts,
    "findings": findings,
    "dead_letters": dead_letters,
    "counts": counts,
    "incidents": incidents,
    "silences": silences,
    "allow_list": allow_list,
    "outbox": deliveries,
    "references": references,
}
