"""A run scored against the simulator's truth: which incidents raised the alert they should have,
how late in event time, and which alerts landed on callers that did nothing wrong.

An incident counts as detected when an alert of its detector names its entity (an api key, a
client IP or a model, with the matching ``entity_type``) and crossed its threshold between the
incident's start and 15 minutes after its end, in event time. The delay is that alert's ``ts``
minus the incident's start. Every other alert is either on an incident's entity or on attacker
traffic (an attacker's key, or an address whose events in the alert's episode came mostly from
attacker keys), or it is a false alarm. Only alerts in the truth's event-time span (plus the same
15 minutes) are considered, so an older run kept in the store does not count.

Reads only: deduplicated rows (``FINAL``) from the ``alerts`` and ``events`` tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from streams.sim.simulate import Incident, Truth
from streams.store.store import Store

DETECTION_GRACE_MS = 15 * 60_000
FALSE_ALARM = "false alarm"
RELATED = "related"
_ALERTS_SQL = (
    "SELECT alert_id, toUnixTimestamp64Milli(ts), detector, severity, status, model_id, "
    "entity_type, entity, event_count, score, title, toUnixTimestamp64Milli(first_seen), "
    "toUnixTimestamp64Milli(last_seen) FROM alerts FINAL "
    "WHERE ts >= fromUnixTimestamp64Milli({lo:Int64}, 'UTC') "
    "AND ts <= fromUnixTimestamp64Milli({hi:Int64}, 'UTC') ORDER BY ts, alert_id"
)
# Per candidate alert k (an address, an episode [lo, hi]): events from attacker keys, all events.
_ATTACKER_SHARE_SQL = (
    "SELECT w.k, countIf(has({attackers:Array(String)}, e.api_key_id)), count() FROM ("
    "SELECT arrayJoin(arrayEnumerate({ips:Array(String)})) AS k, {ips:Array(String)}[k] AS ip, "
    "{los:Array(Int64)}[k] AS lo, {his:Array(Int64)}[k] AS hi) AS w "
    "INNER JOIN (SELECT client_ip, api_key_id, toUnixTimestamp64Milli(ts) AS t FROM events FINAL "
    "WHERE has({ips:Array(String)}, client_ip)) AS e ON e.client_ip = w.ip "
    "WHERE e.t >= w.lo AND e.t <= w.hi GROUP BY w.k"
)


@dataclass(frozen=True, slots=True)
class AlertRow:
    alert_id: str
    ts_ms: int
    detector: str
    severity: str
    status: str
    model_id: str
    entity_type: str
    entity: str
    event_count: int
    score: float
    title: str
    first_seen_ms: int
    last_seen_ms: int


@dataclass(frozen=True, slots=True)
class IncidentResult:
    incident: Incident
    alerts: tuple[AlertRow, ...]  # the alerts that detect it, earliest first

    @property
    def detected(self) -> bool:
        return bool(self.alerts)

    @property
    def delay_ms(self) -> int | None:
        """Event time from the incident's start to the first alert that detects it."""
        return self.alerts[0].ts_ms - self.incident.start_ts_ms if self.alerts else None


@dataclass(frozen=True, slots=True)
class Evaluation:
    incidents: tuple[IncidentResult, ...]
    alerts: tuple[AlertRow, ...]  # every alert considered, by ts
    verdicts: dict[str, str]  # alert id -> incident id, RELATED or FALSE_ALARM
    benign_callers: int
    benign_alerted: tuple[str, ...]  # benign api keys that are the entity of some alert

    @property
    def detected(self) -> int:
        return sum(r.detected for r in self.incidents)

    @property
    def false_alarms(self) -> tuple[AlertRow, ...]:
        return tuple(a for a in self.alerts if self.verdicts[a.alert_id] == FALSE_ALARM)

    @property
    def related(self) -> tuple[AlertRow, ...]:
        return tuple(a for a in self.alerts if self.verdicts[a.alert_id] == RELATED)


def detects(alert: AlertRow, incident: Incident) -> bool:
    """Whether ``alert`` counts as detecting ``incident`` (see the module docstring)."""
    return (
        alert.detector == incident.detector
        and alert.entity_type == incident.entity_type
        and alert.entity == incident.entity
        and incident.start_ts_ms <= alert.ts_ms <= incident.end_ts_ms + DETECTION_GRACE_MS
    )


def load_alerts(store: Store, lo_ms: int, hi_ms: int) -> list[AlertRow]:
    rows = store.query(_ALERTS_SQL, {"lo": lo_ms, "hi": hi_ms}).result_rows
    return [
        AlertRow(
            str(r[0]),
            int(r[1]),
            str(r[2]),
            str(r[3]),
            str(r[4]),
            str(r[5]),
            str(r[6]),
            str(r[7]),
            int(r[8]),
            float(r[9]),
            str(r[10]),
            int(r[11]),
            int(r[12]),
        )
        for r in rows
    ]


def evaluate(store: Store, truth: Truth) -> Evaluation:
    """Score the alerts in ``store`` against ``truth``."""
    alerts = load_alerts(store, truth.start_ts_ms, truth.end_ts_ms + DETECTION_GRACE_MS)
    results = tuple(
        IncidentResult(inc, tuple(a for a in alerts if detects(a, inc))) for inc in truth.incidents
    )
    verdicts: dict[str, str] = {}
    for result in results:
        for a in result.alerts:
            verdicts.setdefault(a.alert_id, result.incident.incident_id)
    involved = {(i.entity_type, i.entity) for i in truth.incidents}
    involved |= {("api_key", k) for k in truth.attackers}
    rest = [a for a in alerts if a.alert_id not in verdicts]
    addresses = [
        a
        for a in rest
        if a.entity_type == "client_ip" and (a.entity_type, a.entity) not in involved
    ]
    attacker_traffic = _mostly_attackers(store, addresses, truth.attackers)
    for a in rest:
        related = (a.entity_type, a.entity) in involved or a.alert_id in attacker_traffic
        verdicts[a.alert_id] = RELATED if related else FALSE_ALARM
    benign = set(truth.benign_callers)
    alerted = sorted({a.entity for a in alerts if a.entity_type == "api_key"} & benign)
    return Evaluation(results, tuple(alerts), verdicts, len(benign), tuple(alerted))


def _mostly_attackers(store: Store, alerts: list[AlertRow], attackers: list[str]) -> set[str]:
    """Ids of the address alerts whose events in the episode came mostly from attacker keys."""
    if not alerts or not attackers:
        return set()
    params = {
        "attackers": attackers,
        "ips": [a.entity for a in alerts],
        "los": [a.first_seen_ms for a in alerts],
        "his": [a.last_seen_ms for a in alerts],
    }
    rows = store.query(_ATTACKER_SHARE_SQL, params).result_rows
    return {alerts[int(k) - 1].alert_id for k, bad, total in rows if 2 * int(bad) > int(total)}
