"""Alert lifecycle: severity, silences, allow-lists and Alertmanager-style grouping into
incidents, on an injected clock.

What it does. Detectors already deduplicate: one alert id per (detector, model, entity type,
entity, episode start), firing while the condition holds, resolved when it clears. This module
decides what a person sees of those alerts:

- **Severity** from the detector's own severity, how far the score crossed its threshold (three
  times or more: one level up) and the model's criticality in the inventory (low: one down,
  critical: one up), between info and critical: ``schemas.alert.severity``, the one place that
  decides it.
- **Suppression.** An alert matching an active silence (matchers on its labels, with an end
  time and an author) or an active allow-list entry (entity type, entity, optionally model) is
  recorded with status ``silenced`` and ``evidence.suppressed_by``, and is not notified; its
  findings are untouched. When the silence expires, a still-firing alert is notified.
- **Grouping** like Alertmanager's: alerts with equal ``group_by`` labels form a group; the
  first notification of a group waits ``group_wait`` (more alerts join it meanwhile); later
  changes (new alerts, resolutions) go out at most once per ``group_interval``; an unchanged
  group with firing alerts is re-sent every ``repeat_interval``. A group whose alerts are all
  resolved and notified ends. Each group lifetime is one incident.
- **Deterministic ids.** ``incident_id`` hashes the group labels and the event time of the
  group's first alert; a notification's idempotency key is ``<incident_id>:<n>``, n counting
  the group's notifications. Given the same alerts and the same clock (the watermark in a
  replay), a replay gives the same ids and the same notifications.

Why here and pure: grouping is policy over alert records, not detection, and it must replay
exactly; so it takes records and a clock in, and gives records and notifications out; the
worker stores and delivers them (side effects live in streams/, see docs/architecture.md).

>>> lc = Lifecycle(Grouping(group_wait_ms=30_000))
>>> a = {"alert_id": "a1", "detector": "abuse.rate_spike", "model_id": "fraud", "status": "firing",
...      "entity_type": "api_key", "entity": "k1", "severity": "medium", "score": 2.0,
...      "threshold": 1.0, "ts": 1_000, "evidence": {}}
>>> rec = lc.observe([a], now_ms=1_000)[0]
>>> lc.due(20_000), [(n.key == rec["incident_id"] + ":1", n.status) for n in lc.due(31_000)]
([], [(True, 'firing')])
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from schemas.alert import SEVERITIES, severity

LABELS = ("detector", "model_id", "entity_type", "entity", "tenant", "severity")
MAX_ALERTS_PER_NOTIFICATION = 100  # the rest are counted, as Alertmanager's max_alerts


@dataclass(frozen=True)
class Grouping:
    group_by: tuple[str, ...] = ("detector", "model_id")
    group_wait_ms: int = 30_000
    group_interval_ms: int = 300_000
    repeat_interval_ms: int = 4 * 3_600_000

    def __post_init__(self) -> None:
        bad = [k for k in self.group_by if k not in LABELS]
        if bad:
            raise ValueError(f"group_by {bad}: not alert labels; use any of {', '.join(LABELS)}")
        if min(self.group_wait_ms, self.group_interval_ms, self.repeat_interval_ms) < 0:
            raise ValueError("group_wait, group_interval and repeat_interval must be >= 0")


@dataclass(frozen=True)
class Matcher:
    """``label`` ``=``, ``!=``, ``=~`` (regex, whole value) or ``!~`` ``value``."""

    label: str
    op: str
    value: str

    @staticmethod
    def parse(text: str) -> Matcher:
        """``detector=abuse.rate_spike``, ``entity=~key-.*``, ``model_id!=chat``."""
        # spaces around the parts are trimmed; any other character is part of the value, so
        # an entity holding a tab or a newline can be silenced too
        m = re.fullmatch(r" *([a-z_]+) *(=~|!~|!=|=) *(.*?) *", text, re.DOTALL)
        if m is None:
            raise ValueError(f"matcher {text!r}: expected LABEL=VALUE, !=, =~ or !~")
        label, op, value = m.groups()
        if label not in LABELS:
            raise ValueError(f"matcher {text!r}: unknown label {label!r}; use {', '.join(LABELS)}")
        if op in ("=~", "!~"):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"matcher {text!r}: bad regular expression ({exc})") from None
        return Matcher(label, op, value)

    def matches(self, alert: Mapping[str, Any]) -> bool:
        v = str(alert.get(self.label, ""))
        if self.op == "=":
            return v == self.value
        if self.op == "!=":
            return v != self.value
        hit = re.fullmatch(self.value, v) is not None
        return hit if self.op == "=~" else not hit

    def __str__(self) -> str:
        return f"{self.label}{self.op}{self.value}"


@dataclass(frozen=True)
class Silence:
    silence_id: str
    matchers: tuple[Matcher, ...]
    starts_ms: int
    ends_ms: int
    author: str
    comment: str = ""

    def active(self, now_ms: int) -> bool:
        return self.starts_ms <= now_ms < self.ends_ms

    def matches(self, alert: Mapping[str, Any]) -> bool:
        return all(m.matches(alert) for m in self.matchers)


@dataclass(frozen=True)
class AllowEntry:
    """An entity whose alerts are expected (a pen test, a known batch job), until ``ends_ms``."""

    allow_id: str
    entity_type: str
    entity: str
    model_id: str  # "" for every model
    ends_ms: int
    author: str
    reason: str = ""

    def matches(self, alert: Mapping[str, Any], now_ms: int) -> bool:
        return (
            now_ms < self.ends_ms
            and alert.get("entity_type") == self.entity_type
            and alert.get("entity") == self.entity
            and self.model_id in ("", alert.get("model_id"))
        )


@dataclass(frozen=True)
class Notification:
    """One message to the routes about one group; ``key`` is its idempotency key."""

    key: str
    incident_id: str
    group_key: str
    status: str  # firing if any alert of the group fires, else resolved
    alerts: tuple[Mapping[str, Any], ...]
    total_alerts: int
    at_ms: int


@dataclass
class _Group:
    key: str
    labels: dict[str, str]
    incident_id: str
    first_ms: int
    alerts: dict[str, dict[str, Any]] = field(default_factory=dict)  # alert id -> latest
    next_ms: int = 0  # when it may notify next
    last_sent_ms: int | None = None
    sent: int = 0
    changed: bool = True


def incident_id(group_key: str, first_ms: int) -> str:
    return hashlib.sha256(f"{group_key}|{first_ms}".encode()).hexdigest()[:16]


class Lifecycle:
    """Alerts in, suppressed or grouped alerts and due notifications out, on ``now_ms``."""

    def __init__(
        self,
        grouping: Grouping | None = None,
        criticality: Mapping[str, str] | None = None,
        silences: Sequence[Silence] = (),
        allow: Sequence[AllowEntry] = (),
    ) -> None:
        self.grouping = grouping or Grouping()
        self.criticality = dict(criticality or {})
        self.silences = list(silences)
        self.allow = list(allow)
        self.groups: dict[str, _Group] = {}
        self.suppressed: dict[str, dict[str, Any]] = {}  # firing alerts held back, by id
        self.incidents: dict[str, dict[str, Any]] = {}  # open ones, by id
        self.changed_incidents: set[str] = set()
        self.released: list[dict[str, Any]] = []  # records un-silenced by ``due``, to store
        self.member: dict[str, str] = {}  # alert id -> its group's key, while in a group

    def _group_key(self, alert: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
        labels = {k: str(alert.get(k, "")) for k in self.grouping.group_by}
        return "{" + ",".join(f"{k}={v!r}" for k, v in labels.items()) + "}", labels

    def suppressor(self, alert: Mapping[str, Any], now_ms: int) -> str | None:
        """Why ``alert`` is not notified now: ``silence:<id>`` or ``allow:<id>``, else None."""
        for s in self.silences:
            if s.active(now_ms) and s.matches(alert):
                return f"silence:{s.silence_id}"
        for a in self.allow:
            if a.matches(alert, now_ms):
                return f"allow:{a.allow_id}"
        return None

    def observe(self, alerts: Iterable[Mapping[str, Any]], now_ms: int) -> list[dict[str, Any]]:
        """The records to store for ``alerts`` (alert v1 dicts): severity set, suppressed ones
        ``silenced``, grouped ones with their ``incident_id``."""
        out = []
        for alert in alerts:
            rec = dict(alert)
            rec["severity"] = severity(
                str(rec.get("severity", "medium")),
                float(rec.get("score", 0.0)),
                float(rec.get("threshold", 0.0)),
                self.criticality.get(str(rec.get("model_id", ""))),
            )
            why = self.suppressor(rec, now_ms)
            if why is not None and rec.get("status") != "resolved":
                self.suppressed[rec["alert_id"]] = rec
                rec = {**rec, "status": "silenced"}
                rec["evidence"] = {**dict(rec.get("evidence") or {}), "suppressed_by": why}
                out.append(rec)
                continue
            self.suppressed.pop(rec["alert_id"], None)
            if why is not None and rec["alert_id"] not in self.member:
                out.append(rec)  # resolved while suppressed: recorded, never notified
                continue
            out.append(self._join(rec, now_ms))
        return out

    def _join(self, rec: dict[str, Any], now_ms: int) -> dict[str, Any]:
        key, labels = self._group_key(rec)
        group = self.groups.get(key)
        if group is None:
            # a resolved alert opens a group too, so it still reaches someone (the worker passes
            # an episode that fired and cleared inside one checkpoint as both records, firing
            # first, so that one opens the group at its firing)
            first = int(rec.get("ts", now_ms))
            group = _Group(key, labels, incident_id(key, first), first)
            group.next_ms = now_ms + self.grouping.group_wait_ms
            self.groups[key] = group
        rec["incident_id"] = group.incident_id
        before = group.alerts.get(rec["alert_id"])
        if before is None or before.get("status") != rec.get("status"):
            group.changed = True
        group.alerts[rec["alert_id"]] = rec
        self.member[rec["alert_id"]] = key
        self._incident(group, [rec], now_ms)  # stored at once, before any notification
        return rec

    def _release(self, now_ms: int) -> list[dict[str, Any]]:
        """Suppressed alerts whose silence or allow-list entry has ended join their groups."""
        freed = [a for a in self.suppressed.values() if self.suppressor(a, now_ms) is None]
        out = []
        for a in freed:
            del self.suppressed[a["alert_id"]]
            rec = dict(a)
            rec["evidence"] = {
                k: v for k, v in dict(rec.get("evidence") or {}).items() if k != "suppressed_by"
            }
            out.append(self._join(rec, now_ms))
        self.released += out
        return out

    def due(self, now_ms: int) -> list[Notification]:
        """Notifications due at ``now_ms``; call after ``observe`` with a clock that only moves
        forward. Alerts released from expired silences are notified with their group."""
        self._release(now_ms)
        g = self.grouping
        out = []
        for key in sorted(self.groups):
            group = self.groups[key]
            if now_ms < group.next_ms:
                continue
            firing = any(a.get("status") == "firing" for a in group.alerts.values())
            repeat = (
                firing
                and group.last_sent_ms is not None
                and now_ms - group.last_sent_ms >= g.repeat_interval_ms
            )
            if group.changed or repeat:
                out.append(self._notify(group, now_ms, firing))
                group.last_sent_ms, group.changed = now_ms, False
                group.next_ms = now_ms + g.group_interval_ms
                sent = list(group.alerts.values())
                # resolved alerts are sent once, then leave the group
                group.alerts = {k: a for k, a in group.alerts.items() if a["status"] == "firing"}
                for a in sent:
                    if a["status"] != "firing":
                        self.member.pop(a["alert_id"], None)
                self._incident(group, sent, now_ms)
            if not group.alerts:
                del self.groups[key]  # all resolved and notified: the incident ends
        return out

    def _notify(self, group: _Group, now_ms: int, firing: bool) -> Notification:
        group.sent += 1
        alerts = sorted(group.alerts.values(), key=lambda a: (a.get("ts", 0), a["alert_id"]))
        return Notification(
            key=f"{group.incident_id}:{group.sent}",
            incident_id=group.incident_id,
            group_key=group.key,
            status="firing" if firing else "resolved",
            alerts=tuple(alerts[:MAX_ALERTS_PER_NOTIFICATION]),
            total_alerts=len(alerts),
            at_ms=now_ms,
        )

    def _incident(self, group: _Group, sent: list[dict[str, Any]], now_ms: int) -> None:
        """The incident v1 record of ``group`` after a notification (resolved once empty)."""
        inc = self.incidents.get(group.incident_id) or {
            "incident_id": group.incident_id,
            "group_key": group.key,
            "title": " ".join(f"{v}" for v in group.labels.values()) or "all alerts",
            "first_seen": group.first_ms,
            "alert_ids": [],
            "entities": [],
        }
        ids, entities = set(inc["alert_ids"]), {tuple(e) for e in inc["entities"]}
        for a in sent:
            ids.add(a["alert_id"])
            entities.add((str(a.get("entity_type", "")), str(a.get("entity", ""))))
        levels = [SEVERITIES.index(a["severity"]) for a in sent]
        status = inc.get("status", "open")  # an analyst's acknowledged or closed stays
        if not group.alerts:
            status = "closed" if status == "closed" else "resolved"
        elif status not in ("acknowledged", "closed"):
            status = "open"
        inc.update(
            alert_ids=sorted(ids), entities=sorted(entities), last_seen=now_ms, status=status
        )
        if levels:
            inc["severity"] = SEVERITIES[
                max([*levels, SEVERITIES.index(inc.get("severity", "info"))])
            ]
        self.incidents[group.incident_id] = inc
        self.changed_incidents.add(group.incident_id)

    def analyst(self, incident_id: str, **fields: Any) -> bool:
        """Apply an analyst's change (status, verdict, assignee, notes) to an open incident so
        the lifecycle's next write keeps it; False if the incident is not open here."""
        inc = self.incidents.get(incident_id)
        if inc is None:
            return False
        inc.update(fields)
        return True

    def take_released(self) -> list[dict[str, Any]]:
        out, self.released = self.released, []
        return out

    def state_bytes(self) -> bytes:
        """Groups, held-back alerts and open incidents (silences and allow-lists live in their
        own tables)."""
        groups = [{**vars(g)} for g in self.groups.values()]
        state = {"groups": groups, "suppressed": self.suppressed, "incidents": self.incidents}
        return bytes(orjson.dumps(state))

    def restore(self, blob: bytes) -> None:
        state = orjson.loads(blob)
        self.groups = {g["key"]: _Group(**g) for g in state["groups"]}
        self.member = {a: k for k, g in self.groups.items() for a in g.alerts}
        self.suppressed = state["suppressed"]
        self.incidents = state["incidents"]

    def take_incidents(self) -> list[dict[str, Any]]:
        """Incident records changed since the last call (to store)."""
        out = [self.incidents[i] for i in sorted(self.changed_incidents)]
        self.changed_incidents.clear()
        for inc in out:
            if inc["status"] in ("resolved", "closed") and inc["incident_id"] not in {
                g.incident_id for g in self.groups.values()
            }:
                del self.incidents[inc["incident_id"]]
        return out
