"""The alert outbox: routes deliver alerts from the store, after the checkpoint that stored them.

At a checkpoint the worker ``stage``s the alert records it flushed: one outbox row per new
(alert_id, status, route), written with the sequence number the checkpoint is about to take. The
checkpoint exists once its positions are saved; only then does the worker ``deliver``, so only
alerts of a completed checkpoint leave the process. A process that died before saving the
positions left rows with a sequence above the committed one: ``checkpoint.begin`` deletes them
at start (the replay writes them again); ``Outbox`` loads the rows still undelivered and sends
them again. A
SIGKILL during a POST re-sends that delivery, with the same idempotency key.

A route that fails rests for a full-jitter backoff before its next try, so a receiver that is
down costs the checkpoints nothing. At most ``max_pending`` undelivered rows are held in memory;
the rest wait in the table and are read back, oldest first, as the held ones go out.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import orjson
import pyarrow as pa

from streams.store import Store

PENDING, DELIVERED, REFUSED = 0, 1, 2
TIME_FIELDS = ("ts", "emitted_at", "resolved_at", "first_seen", "last_seen")


class Outcome(Protocol):
    @property
    def delivered(self) -> bool: ...
    @property
    def permanent(self) -> bool: ...
    @property
    def error(self) -> str: ...
    @property
    def attempts(self) -> int: ...


class Route(Protocol):
    name: str

    def deliver(self, key: str, payload: bytes, deadline: float | None = None) -> Outcome: ...


@dataclass(frozen=True, slots=True)
class Row:
    alert_id: str
    status: str
    route: str
    payload: bytes
    created_seq: int
    delivered: int = PENDING
    delivered_at_ms: int | None = None
    attempts: int = 0
    last_error: str = ""
    version: int = 1

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.alert_id, self.status, self.route)


def alert_json(record: dict[str, Any]) -> bytes:
    """The alert v1 JSON a route sends: times as RFC 3339 UTC, as ``inferwatch alerts`` prints."""
    out = dict(record)
    for name in TIME_FIELDS:
        ms = out.get(name)
        if ms is not None:
            out[name] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + (
                f".{ms % 1000:03d}Z"
            )
    return bytes(orjson.dumps(out, option=orjson.OPT_SORT_KEYS))


def notification_json(n: Any) -> bytes:
    """A group notification (streams.lifecycle.Notification) as a route sends it: the group,
    its incident, and up to 100 of its alerts as alert v1 JSON."""
    alerts = [orjson.loads(alert_json(dict(a))) for a in n.alerts]
    body = {
        "version": "1",
        "incident_id": n.incident_id,
        "group_key": n.group_key,
        "status": n.status,
        "notification": int(n.key.rsplit(":", 1)[1]),
        "total_alerts": n.total_alerts,
        "truncated_alerts": n.total_alerts - len(alerts),
        "alerts": alerts,
    }
    return bytes(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))


class Backoff:
    """Full-jitter exponential backoff: attempt n waits uniform(0, min(cap, base·2ⁿ)).

    >>> b = Backoff(base_s=0.5, cap_s=4.0, rand=lambda: 1.0)
    >>> [b.next_delay() for _ in range(5)]
    [0.5, 1.0, 2.0, 4.0, 4.0]
    """

    def __init__(
        self, base_s: float = 0.5, cap_s: float = 30.0, rand: Callable[[], float] = random.random
    ) -> None:
        self.base_s, self.cap_s, self._rand = base_s, cap_s, rand
        self.attempts = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * 2.0**self.attempts)
        self.attempts += 1
        return self._rand() * ceiling


class Outbox:
    def __init__(
        self,
        store: Store,
        routes: Sequence[Route],
        budget_s: float = 2.0,
        max_keys: int = 100_000,
        max_pending: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.routes = {r.name: r for r in routes}
        self.budget_s = budget_s
        self.max_keys = max_keys
        self.max_pending = max_pending
        self.spilled = False  # undelivered rows wait in the store beyond max_pending
        self._clock = clock
        self._known: OrderedDict[tuple[str, str, str], None] = OrderedDict()  # bounded cache
        self.pending: dict[tuple[str, str, str], Row] = {}
        # a route that failed rests for a jittered, growing delay before the next try
        self.backoff = {name: Backoff(base_s=1.0, cap_s=60.0) for name in self.routes}
        self.resting_until: dict[str, float] = {}
        self.failing_since: dict[str, tuple[float, str]] = {}  # route -> (clock, first error)
        self._recover()

    def _recover(self) -> None:
        """Load the oldest undelivered rows, up to ``max_pending`` in memory (at start,
        ``checkpoint.begin`` already dropped unfinished ones)."""
        room = self.max_pending - len(self.pending)
        rows = self.store.query(
            "SELECT alert_id, status, route, argMax(payload, version), "
            "argMax(created_seq, version) AS cseq, argMax(attempts, version), "
            "argMax(last_error, version), max(version) FROM outbox"
            " GROUP BY alert_id, status, route HAVING argMax(delivered, version) = 0"
            " ORDER BY cseq, alert_id, status, route LIMIT {n:UInt64}",
            {"n": room + len(self.pending)},
            binary=True,
        ).result_rows
        self.spilled = len(rows) == room + len(self.pending)
        for aid, status, route, payload, cseq, attempts, error, version in rows:
            row = Row(
                _text(aid), _text(status), _text(route), bytes(payload), int(cseq),
                attempts=int(attempts), last_error=_text(error), version=int(version),
            )  # fmt: skip
            if row.route in self.routes and len(self.pending) < self.max_pending:
                self.pending.setdefault(row.key, row)

    def stage(
        self, records: Sequence[dict[str, Any]], seq: int, notifications: Sequence[Any] = ()
    ) -> int:
        """Write outbox rows not staged before: per (alert, status) for a route that takes
        alerts (silenced ones are recorded, not sent), per group notification (incident id,
        its number) for a route that takes incidents; returns how many."""
        if not self.routes or not (records or notifications):
            return 0
        candidates: dict[tuple[str, str, str], tuple[bool, Any]] = {}  # key -> (grouped, what)
        for route in self.routes:
            if getattr(self.routes[route], "grouped", False):
                for n in notifications:
                    key = (n.incident_id, n.key.rsplit(":", 1)[1], route)
                    candidates[key] = (True, n)
            else:
                for rec in records:
                    if rec["status"] != "silenced":
                        key = (rec["alert_id"], rec["status"], route)
                        candidates[key] = (False, rec)
        candidates = {
            k: v for k, v in candidates.items() if k not in self._known and k not in self.pending
        }
        if candidates:
            ids = sorted({k[0] for k in candidates})
            in_store = self.store.query(
                "SELECT DISTINCT alert_id, status, route FROM outbox "
                "WHERE alert_id IN {ids:Array(String)}",
                {"ids": ids},
            ).result_rows
            for r in in_store:
                candidates.pop((r[0], r[1], r[2]), None)
        rows = [
            Row(*k, notification_json(what) if grouped else alert_json(what), seq)
            for k, (grouped, what) in candidates.items()
        ]
        self._write(rows)
        for row in rows:
            if len(self.pending) >= self.max_pending:
                self.spilled = True  # the rest waits in the store, read back as rows go out
                break
            self.pending[row.key] = row
        return len(rows)

    def mark_sent(self, keys: Iterable[tuple[str, str, str]]) -> None:
        """(alert id, status, route) sent outside the outbox: never stage them."""
        for key in keys:
            self._known[key] = None

    def deliver(self) -> int:
        """Send pending rows, oldest first, for at most ``budget_s``; returns how many left."""
        now = self._clock()
        deadline = now + self.budget_s
        changed: list[Row] = []
        resting = {r for r, until in self.resting_until.items() if now < until}
        for row in sorted(self.pending.values(), key=lambda r: (r.created_seq, r.key)):
            if self._clock() >= deadline:
                break
            if row.route in resting:
                continue
            route = self.routes[row.route]
            outcome = route.deliver(f"{row.alert_id}:{row.status}", row.payload, deadline)
            if not outcome.attempts:
                break
            now_ms = int(time.time() * 1000)
            state = DELIVERED if outcome.delivered else REFUSED if outcome.permanent else PENDING
            new = replace(
                row,
                delivered=state,
                delivered_at_ms=now_ms if state == DELIVERED else None,
                attempts=row.attempts + outcome.attempts,
                last_error=outcome.error,
                version=row.version + 1,
            )
            changed.append(new)
            if state == PENDING:
                self.failing_since.setdefault(row.route, (self._clock(), outcome.error))
                self.pending[row.key] = new
                delay = self.backoff[row.route].next_delay()
                self.resting_until[row.route] = self._clock() + delay
                resting.add(row.route)
            else:
                del self.pending[row.key]
                self.backoff[row.route].attempts = 0
                self.failing_since.pop(row.route, None)
        self._write(changed)
        if self.spilled and len(self.pending) < self.max_pending // 2:
            self._recover()
        return len(self.pending)

    def _write(self, rows: Sequence[Row]) -> None:
        if not rows:
            return
        for row in rows:
            self._known[row.key] = None
            self._known.move_to_end(row.key)
        while len(self._known) > self.max_keys:
            self._known.popitem(last=False)

        def col(name: str) -> list[Any]:
            return [getattr(r, name) for r in rows]

        s = pa.string()
        self.store.insert_arrow(
            "outbox",
            pa.table(
                {
                    "alert_id": pa.array(col("alert_id"), s),
                    "status": pa.array(col("status"), s),
                    "route": pa.array(col("route"), s),
                    "payload": pa.array(col("payload"), pa.binary()),
                    "created_seq": pa.array(col("created_seq"), pa.uint64()),
                    "delivered": pa.array(col("delivered"), pa.uint8()),
                    "delivered_at": pa.array(col("delivered_at_ms"), pa.timestamp("ms", tz="UTC")),
                    "attempts": pa.array(col("attempts"), pa.uint32()),
                    "last_error": pa.array(col("last_error"), s),
                    "version": pa.array(col("version"), pa.uint64()),
                }
            ),
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
