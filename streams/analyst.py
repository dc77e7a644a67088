"""The analyst's workflow in the store: silences, allow-list entries and incident changes
(acknowledge, assign, close with a verdict).

Each operation is one function on a :class:`Store`. ``inferwatch silence|allow|incidents`` call
them directly when no worker owns the store; when one does, they travel as commands through the
worker's local API and the worker calls the same functions at its next checkpoint, then applies
the change to its lifecycle (streams/lifecycle.py), so the running worker and the tables never
disagree. Rows are versioned (ReplacingMergeTree) and read with FINAL; an expiry is a new
version with ``ends_at`` = now, so the history stays readable.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import os
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from streams.lifecycle import AllowEntry, Matcher, Silence
from streams.store import Store

VERDICTS = ("true_positive", "false_positive", "benign_expected")
INCIDENT_STATUSES = ("open", "acknowledged", "resolved", "closed")
_MS = pa.timestamp("ms", tz="UTC")


def operator() -> str:
    """Who is acting: ``INFERWATCH_OPERATOR``, else the OS user."""
    return os.environ.get("INFERWATCH_OPERATOR") or getpass.getuser()


def now_ms() -> int:
    return int(time.time() * 1000)


def _version() -> int:
    return time.time_ns() // 1000


def _id(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12]


# --- silences -------------------------------------------------------------------------------


def new_silence(
    matchers: Sequence[str],
    ends_ms: int,
    author: str,
    comment: str = "",
    starts_ms: int | None = None,
    silence_id: str | None = None,
) -> Silence:
    """A checked silence of alerts matching every one of ``matchers``, from ``starts_ms`` (now)
    until ``ends_ms``; ValueError says what is wrong."""
    parsed = tuple(Matcher.parse(m) for m in matchers)
    if not parsed:
        raise ValueError("a silence needs at least one matcher, e.g. detector=abuse.rate_spike")
    start = now_ms() if starts_ms is None else starts_ms
    if ends_ms <= max(start, now_ms()):
        raise ValueError("a silence must end in the future and after it starts")
    sid = silence_id or _id(sorted(matchers), start, ends_ms, author)
    return Silence(sid, parsed, start, ends_ms, author, comment)


def add_silence(store: Store, silence: Silence) -> Silence:
    _write_silence(store, silence)
    return silence


def _write_silence(store: Store, s: Silence) -> None:
    store.insert_arrow(
        "silences",
        pa.table(
            {
                "silence_id": [s.silence_id],
                "matchers": pa.array([[str(m) for m in s.matchers]], pa.list_(pa.string())),
                "starts_at": pa.array([s.starts_ms], _MS),
                "ends_at": pa.array([s.ends_ms], _MS),
                "author": [s.author],
                "comment": [s.comment],
                "created_at": pa.array([now_ms()], _MS),
                "version": pa.array([_version()], pa.uint64()),
            }
        ),
    )


def silences(store: Store, include_expired: bool = False) -> list[Silence]:
    rows = store.query(
        "SELECT silence_id, matchers, toUnixTimestamp64Milli(starts_at), "
        "toUnixTimestamp64Milli(ends_at), author, comment FROM silences FINAL "
        + ("" if include_expired else "WHERE ends_at > now64(3) ")
        + "ORDER BY starts_at"
    ).result_rows
    return [
        Silence(i, tuple(Matcher.parse(m) for m in ms), int(a), int(b), au, c)
        for i, ms, a, b, au, c in rows
    ]


def expire_silence(store: Store, silence_id: str) -> Silence:
    found = [s for s in silences(store, True) if s.silence_id == silence_id]
    if not found:
        raise ValueError(f"no silence {silence_id!r}; `inferwatch silence list` shows them")
    s = found[0]
    expired = Silence(s.silence_id, s.matchers, s.starts_ms, min(s.ends_ms, now_ms()), s.author,
                      s.comment)  # fmt: skip
    _write_silence(store, expired)
    return expired


# --- allow-list -----------------------------------------------------------------------------


def new_allow(
    entity_type: str,
    entity: str,
    model_id: str,
    ends_ms: int,
    author: str,
    reason: str = "",
    allow_id: str | None = None,
) -> AllowEntry:
    """A checked entry: alerts of ``entity`` (on ``model_id``, or every model when empty) are
    expected until ``ends_ms``: recorded as silenced, not notified; findings are kept."""
    types = ("api_key", "client_ip", "session", "tenant", "model")
    if entity_type not in types:
        raise ValueError(f"entity type {entity_type!r}: expected one of {', '.join(types)}")
    if not entity:
        raise ValueError("an allow-list entry needs an entity")
    if ends_ms <= now_ms():
        raise ValueError("an allow-list entry must expire in the future")
    aid = allow_id or _id(entity_type, entity, model_id, ends_ms, author)
    return AllowEntry(aid, entity_type, entity, model_id, ends_ms, author, reason)


def add_allow(store: Store, entry: AllowEntry) -> AllowEntry:
    _write_allow(store, entry)
    return entry


def _write_allow(store: Store, a: AllowEntry) -> None:
    store.insert_arrow(
        "allow_list",
        pa.table(
            {
                "allow_id": [a.allow_id],
                "entity_type": [a.entity_type],
                "entity": [a.entity],
                "model_id": [a.model_id],
                "ends_at": pa.array([a.ends_ms], _MS),
                "author": [a.author],
                "reason": [a.reason],
                "created_at": pa.array([now_ms()], _MS),
                "version": pa.array([_version()], pa.uint64()),
            }
        ),
    )


def allow_entries(store: Store, include_expired: bool = False) -> list[AllowEntry]:
    rows = store.query(
        "SELECT allow_id, entity_type, entity, model_id, toUnixTimestamp64Milli(ends_at), "
        "author, reason FROM allow_list FINAL "
        + ("" if include_expired else "WHERE ends_at > now64(3) ")
        + "ORDER BY created_at"
    ).result_rows
    return [AllowEntry(i, et, e, m, int(end), au, r) for i, et, e, m, end, au, r in rows]


def expire_allow(store: Store, allow_id: str) -> AllowEntry:
    found = [a for a in allow_entries(store, True) if a.allow_id == allow_id]
    if not found:
        raise ValueError(f"no allow-list entry {allow_id!r}; `inferwatch allow list` shows them")
    a = found[0]
    expired = AllowEntry(a.allow_id, a.entity_type, a.entity, a.model_id,
                         min(a.ends_ms, now_ms()), a.author, a.reason)  # fmt: skip
    _write_allow(store, expired)
    return expired


# --- incidents ------------------------------------------------------------------------------

INCIDENT_COLUMNS = (
    "incident_id", "group_key", "title", "severity", "status", "verdict", "verdict_by",
    "verdict_at", "alert_ids", "entities", "first_seen", "last_seen", "assignee", "notes",
)  # fmt: skip


def incidents_table(records: Sequence[dict[str, Any]]) -> pa.Table:
    """Incident v1 rows; ``entities`` as ``type:id`` strings."""

    def col(name: str) -> list[Any]:
        return [r.get(name) for r in records]

    version = _version()
    return pa.table(
        {
            "incident_id": col("incident_id"),
            "group_key": col("group_key"),
            "title": col("title"),
            "severity": [r.get("severity") or "info" for r in records],
            "status": col("status"),
            "verdict": pa.array(col("verdict"), pa.string()),
            "verdict_by": pa.array(col("verdict_by"), pa.string()),
            "verdict_at": pa.array(col("verdict_at"), _MS),
            "alert_ids": pa.array(col("alert_ids"), pa.list_(pa.string())),
            "entities": pa.array([_entities(r) for r in records], pa.list_(pa.string())),
            "first_seen": pa.array(col("first_seen"), _MS),
            "last_seen": pa.array(col("last_seen"), _MS),
            "assignee": pa.array(col("assignee"), pa.string()),
            "notes": [r.get("notes") or "" for r in records],
            "version": pa.array([version + i for i in range(len(records))], pa.uint64()),
        }
    )


def _entities(record: dict[str, Any]) -> list[str]:
    return [e if isinstance(e, str) else f"{e[0]}:{e[1]}" for e in record["entities"]]


def list_incidents(store: Store, status: str | None = None) -> list[dict[str, Any]]:
    where = "WHERE status = {s:String} " if status else ""
    result = store.query(
        f"SELECT {', '.join(INCIDENT_COLUMNS)} FROM incidents FINAL {where}ORDER BY last_seen DESC",
        {"s": status} if status else None,
    )
    return [dict(zip(INCIDENT_COLUMNS, row, strict=True)) for row in result.result_rows]


def get_incident(store: Store, incident_id: str) -> dict[str, Any]:
    result = store.query(
        f"SELECT {', '.join(INCIDENT_COLUMNS)} FROM incidents FINAL "
        "WHERE incident_id = {i:String}",
        {"i": incident_id},
    ).result_rows
    if not result:
        raise ValueError(f"no incident {incident_id!r}; `inferwatch incidents list` shows them")
    return dict(zip(INCIDENT_COLUMNS, result[0], strict=True))


def incident_change(action: str, author: str, value: str = "", note: str = "") -> dict[str, Any]:
    """The fields an analyst's ``action`` (ack, assign, close, note) sets."""
    if action == "ack":
        change: dict[str, Any] = {"status": "acknowledged"}
    elif action == "assign":
        if not value:
            raise ValueError("assign needs an assignee")
        change = {"assignee": value}
    elif action == "close":
        if value not in VERDICTS:
            raise ValueError(f"verdict {value!r}: expected one of {', '.join(VERDICTS)}")
        change = {"status": "closed", "verdict": value, "verdict_by": author,
                  "verdict_at": now_ms()}  # fmt: skip
    elif action == "note":
        change = {}
    else:
        raise ValueError(f"unknown action {action!r}")
    if note:
        change["note"] = f"{author}: {note}"
    return change


def update_incident(store: Store, incident_id: str, change: dict[str, Any]) -> dict[str, Any]:
    """Write the incident again with ``change`` applied (a ``note`` is appended to notes)."""
    inc = get_incident(store, incident_id)
    note = change.get("note")
    inc.update({k: v for k, v in change.items() if k != "note"})
    if note:
        inc["notes"] = "\n".join(x for x in (inc.get("notes"), note) if x)
    for name in ("first_seen", "last_seen", "verdict_at"):
        if isinstance(inc.get(name), dt.datetime):
            inc[name] = int(inc[name].replace(tzinfo=dt.UTC).timestamp() * 1000)
    store.insert_arrow("incidents", incidents_table([inc]))
    return inc
