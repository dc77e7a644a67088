"""The analyst's workflow in the store: silences, allow-list entries and incident changes
(acknowledge, assign, close with a verdict).

Each operation is one function on a :class:`Store`. ``inferwatch silence|allow|incidents`` call
them directly when no worker owns the store; when one does, they travel as commands through the
worker's local API and the worker calls the same functions at its next checkpoint, then applies
the change to its lifecycle (streams/alerting/lifecycle.py), so the running worker and the tables
never
disagree. Rows are versioned (ReplacingMergeTree) and read with FINAL; an expiry is a new
version with ``ends_at`` = now, so the history stays readable.
"""

from __future__ import annotations

import datetime as dt
import difflib
import getpass
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from streams.alerting.lifecycle import AllowEntry, Matcher, Silence
from streams.store.store import Store

VERDICTS = ("true_positive", "false_positive", "benign_expected")
INCIDENT_STATUSES = ("open", "acknowledged", "resolved", "closed")
ENTITY_TYPES = ("api_key", "client_ip", "session", "tenant", "model")
LATEST_END_MS = 4_102_444_800_000  # 2100-01-01, the last time an event may carry
_MS = pa.timestamp("ms", tz="UTC")


def operator(env: Mapping[str, str]) -> str:
    """Who is acting: ``INFERWATCH_OPERATOR`` of ``env`` (read at start), else the OS user."""
    return env.get("INFERWATCH_OPERATOR") or getpass.getuser()


def now_ms() -> int:
    return int(time.time() * 1000)


def _version() -> int:
    return time.time_ns() // 1000


def _id(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12]


# --- checks: an analyst's command is refused with what was expected, before it is applied ---


def one_line(value: object, what: str, required: bool = True) -> str:
    """``value`` if it is one line of printable text (non-empty when ``required``)."""
    if not isinstance(value, str):
        raise ValueError(f"{what}: expected text, got {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"{what} is empty")
    if not value.isprintable():
        raise ValueError(f"{what} {value!r}: expected one line of printable text")
    return value


def time_ms(value: object, what: str) -> int:
    """``value`` as milliseconds since the epoch, no later than 2100-01-01."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what}: expected milliseconds since the epoch, got {value!r}")
    if not 0 <= value <= LATEST_END_MS:
        raise ValueError(f"{what} {value}: expected a time between 1970 and 2100-01-01")
    return value


def unknown(kind: str, given: str, known: Sequence[str], listing: str) -> ValueError:
    """The error for an id that does not exist: the closest existing one, and how to list."""
    close = difflib.get_close_matches(given, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"no {kind} {given!r}{hint} (`{listing}` shows them)")


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
    if isinstance(matchers, str) or not all(isinstance(m, str) for m in matchers):
        raise ValueError(f"matchers: expected a list of LABEL=VALUE texts, got {matchers!r}")
    parsed = tuple(Matcher.parse(m) for m in matchers)
    if not parsed:
        raise ValueError("a silence needs at least one matcher, e.g. detector=abuse.rate_spike")
    start = now_ms() if starts_ms is None else time_ms(starts_ms, "starts")
    if time_ms(ends_ms, "ends") <= max(start, now_ms()):
        raise ValueError("a silence must end in the future and after it starts")
    one_line(author, "author")
    one_line(comment, "comment", required=False)
    sid = _new_id(silence_id, "silence id") or _id(sorted(matchers), start, ends_ms, author)
    return Silence(sid, parsed, start, ends_ms, author, comment)


def _new_id(given: str | None, what: str) -> str | None:
    if given is None:
        return None
    one_line(given, what)
    if len(given) > 64:
        raise ValueError(f"{what} {given[:64]!r}...: expected at most 64 characters")
    return given


def check_new_silence(store: Store, silence: Silence) -> Silence:
    """``silence`` if its id is free (an id names one silence), else ValueError."""
    if any(s.silence_id == silence.silence_id for s in silences(store, True)):
        raise ValueError(f"silence {silence.silence_id!r} exists; choose another id")
    return silence


def add_silence(store: Store, silence: Silence) -> Silence:
    _write_silence(store, check_new_silence(store, silence))
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


def find_silence(store: Store, silence_id: object) -> Silence:
    """The stored silence ``silence_id``; ValueError naming the closest one if there is none."""
    one_line(silence_id, "silence id")
    stored = silences(store, True)
    for s in stored:
        if s.silence_id == silence_id:
            return s
    assert isinstance(silence_id, str)
    if silence_id.startswith("config-"):
        raise ValueError(
            f"silence {silence_id!r} comes from the configuration file ([[silences]]): "
            "change its ends there and restart the worker"
        )
    listing = "inferwatch silence list --all"
    raise unknown("silence", silence_id, [s.silence_id for s in stored], listing)


def expire_silence(store: Store, silence_id: str) -> Silence:
    s = find_silence(store, silence_id)
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
    if entity_type not in ENTITY_TYPES:
        raise ValueError(f"entity type {entity_type!r}: expected one of {', '.join(ENTITY_TYPES)}")
    if not isinstance(entity, str) or not entity:
        raise ValueError("an allow-list entry needs an entity")
    if not isinstance(model_id, str):
        raise ValueError(f"model: expected a model id, got {model_id!r}")
    if time_ms(ends_ms, "ends") <= now_ms():
        raise ValueError("an allow-list entry must expire in the future")
    one_line(author, "author")
    one_line(reason, "reason", required=False)
    aid = _new_id(allow_id, "allow id") or _id(entity_type, entity, model_id, ends_ms, author)
    return AllowEntry(aid, entity_type, entity, model_id, ends_ms, author, reason)


def check_new_allow(store: Store, entry: AllowEntry) -> AllowEntry:
    """``entry`` if its id is free, else ValueError."""
    if any(a.allow_id == entry.allow_id for a in allow_entries(store, True)):
        raise ValueError(f"allow-list entry {entry.allow_id!r} exists; choose another id")
    return entry


def add_allow(store: Store, entry: AllowEntry) -> AllowEntry:
    _write_allow(store, check_new_allow(store, entry))
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


def find_allow(store: Store, allow_id: object) -> AllowEntry:
    """The stored entry ``allow_id``; ValueError naming the closest one if there is none."""
    one_line(allow_id, "allow id")
    stored = allow_entries(store, True)
    for a in stored:
        if a.allow_id == allow_id:
            return a
    assert isinstance(allow_id, str)
    listing = "inferwatch allow list --all"
    raise unknown("allow-list entry", allow_id, [a.allow_id for a in stored], listing)


def expire_allow(store: Store, allow_id: str) -> AllowEntry:
    a = find_allow(store, allow_id)
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
    one_line(incident_id, "incident id")
    result = store.query(
        f"SELECT {', '.join(INCIDENT_COLUMNS)} FROM incidents FINAL "
        "WHERE incident_id = {i:String}",
        {"i": incident_id},
    ).result_rows
    if not result:
        known = store.query(
            "SELECT DISTINCT incident_id FROM incidents ORDER BY incident_id LIMIT 100000"
        ).result_rows
        listing = "inferwatch incidents list"
        raise unknown("incident", incident_id, [r[0] for r in known], listing)
    return dict(zip(INCIDENT_COLUMNS, result[0], strict=True))


def incident_change(action: str, author: str, value: str = "", note: str = "") -> dict[str, Any]:
    """The fields an analyst's ``action`` (ack, assign, close, note) sets; ValueError if a
    value is not what it must be (an assignee and a note are one line of text)."""
    one_line(author, "author")
    one_line(note, "note", required=False)
    if action == "ack":
        change: dict[str, Any] = {"status": "acknowledged"}
    elif action == "assign":
        if not isinstance(value, str) or not value.strip():
            raise ValueError("assign needs an assignee (--to NAME)")
        change = {"assignee": one_line(value, "assignee")}
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


# what a change may set, and the check of each value
_CHANGE_FIELDS: dict[str, Callable[[object], object]] = {
    "status": lambda v: _choice(v, "status", INCIDENT_STATUSES),
    "verdict": lambda v: _choice(v, "verdict", VERDICTS),
    "verdict_by": lambda v: one_line(v, "verdict_by"),
    "verdict_at": lambda v: time_ms(v, "verdict_at"),
    "assignee": lambda v: one_line(v, "assignee"),
    "note": lambda v: one_line(v, "note"),
}


def _choice(value: object, what: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{what} {value!r}: expected one of {', '.join(allowed)}")
    return str(value)


def check_change(change: object) -> dict[str, Any]:
    """``change`` if it is what :func:`incident_change` makes (the local API receives it as
    JSON); ValueError names the first bad field."""
    if not isinstance(change, dict) or not change:
        raise ValueError(f"change: expected an object of fields, got {change!r}")
    unknown_fields = sorted(set(change) - set(_CHANGE_FIELDS))
    if unknown_fields:
        raise ValueError(
            f"change: unknown field {unknown_fields[0]!r}; expected {', '.join(_CHANGE_FIELDS)}"
        )
    for name, value in change.items():
        _CHANGE_FIELDS[name](value)
    return change


def update_incident(store: Store, incident_id: str, change: dict[str, Any]) -> dict[str, Any]:
    """Write the incident again with ``change`` applied (a ``note`` is appended to notes)."""
    check_change(change)
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
