"""The alert outbox: routes deliver alerts from the store, after the checkpoint that stored them.

At a checkpoint the worker ``stage``s the alert records it flushed: one outbox row per new
(alert_id, status, route), written with the sequence number the checkpoint is about to take. The
checkpoint exists once its positions are saved; only then does the worker ``deliver``, so only
alerts of a completed checkpoint leave the process. A process that died before saving the
positions left rows with a sequence above the committed one: ``checkpoint.begin`` deletes them
at start (the replay writes them again); ``Outbox`` loads the rows still undelivered and sends
them again. A SIGKILL during a POST re-sends that delivery, with the same idempotency key; so
does a timeout (the receiver may have it), at most the route's ``max_timeouts`` times in all.

Order per alert: a resolution goes only after its firing was delivered (PagerDuty and
Alertmanager drop a resolve they never saw fire), and a group's notification n after n - 1. An
episode that fired and resolved inside one checkpoint is staged as both, firing first; a
resolution whose firing was never staged for the route (it was silenced) is not sent. The order
holds across retries and restarts: a delivery waits while the one before it is pending or
refused.

A refusal (the receiver answered that it will not take this: a 4xx other than 408/429, or every
allowed attempt timed out) is never a success: the row stays, ``refused``, with the answer's
status and a bounded excerpt, the route's failing state is left as it was, and the refusal is
counted per route (``refused_rows``, ``refused_total``) for ``pipeline.delivery_refused`` and
``inferwatch_deliveries_refused_total``. It is not retried on its own: ``requeue`` (``inferwatch
outbox retry``) makes it pending again once the receiver is fixed.

A route that fails rests for a full-jitter backoff before its next try, so a receiver that is
down costs the checkpoints nothing. At most ``max_pending`` undelivered rows are held in memory;
the rest wait in the table and are read back, oldest first, as the held ones go out.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import orjson
import pyarrow as pa

from schemas.alert import to_wire
from streams.store.store import Store

PENDING, DELIVERED, REFUSED = 0, 1, 2
STATES = {"pending": PENDING, "delivered": DELIVERED, "refused": REFUSED}
Key = tuple[str, str, str]  # (alert or incident id, status or notification number, route)
# the newest version of each row, as ``Row`` fields (``_row``)
ROW_SELECT = (
    "SELECT alert_id, status, route, argMax(payload, version), "
    "argMax(created_seq, version) AS cseq, argMax(delivered, version) AS state, "
    "argMax(delivered_at, version), argMax(attempts, version), argMax(last_error, version), "
    "max(version), argMax(response_status, version), argMax(timeouts, version) FROM outbox"
)


class Outcome(Protocol):
    @property
    def delivered(self) -> bool: ...
    @property
    def permanent(self) -> bool: ...
    @property
    def error(self) -> str: ...
    @property
    def attempts(self) -> int: ...
    @property
    def status(self) -> int: ...
    @property
    def timeouts(self) -> int: ...


class Route(Protocol):
    name: str
    max_timeouts: int  # timed-out attempts of one delivery before it is refused
    grouped: bool  # takes group notifications (incidents) rather than single alerts

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
    response_status: int = 0  # the receiver's last HTTP status (0: none)
    timeouts: int = 0  # attempts that got no answer in time

    @property
    def key(self) -> Key:
        return (self.alert_id, self.status, self.route)

    @property
    def delivery_id(self) -> str:
        """The idempotency key the receiver sees, and the id ``inferwatch outbox`` shows."""
        return f"{self.alert_id}:{self.status}"


def predecessor(key: Key) -> Key | None:
    """The delivery that must reach the route first: a resolution's firing, a group's previous
    notification.

    >>> predecessor(("a1", "resolved", "webhook")), predecessor(("i1", "3", "webhook"))
    (('a1', 'firing', 'webhook'), ('i1', '2', 'webhook'))
    """
    alert_id, status, route = key
    if status == "resolved":
        return (alert_id, "firing", route)
    if status.isdigit() and int(status) > 1:
        return (alert_id, str(int(status) - 1), route)
    return None


def successor(key: Key) -> Key | None:
    alert_id, status, route = key
    if status == "firing":
        return (alert_id, "resolved", route)
    if status.isdigit():
        return (alert_id, str(int(status) + 1), route)
    return None


def alert_json(record: Mapping[str, Any]) -> bytes:
    """The alert v1 JSON a route sends (``schemas/alert.py``): times as RFC 3339 UTC with ``Z``
    and milliseconds, as ``inferwatch alerts --format jsonl`` prints them."""
    return bytes(orjson.dumps(to_wire(record), option=orjson.OPT_SORT_KEYS))


def notification_json(n: Any) -> bytes:
    """A group notification (streams.alerting.lifecycle.Notification) as a route sends it: the
    group,
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


def select_rows(
    store: Store, having: str, params: dict[str, Any], limit: int | None = None
) -> list[Row]:
    """Rows (newest version) whose latest state matches ``having``, in delivery order."""
    sql = (
        f"{ROW_SELECT} GROUP BY alert_id, status, route HAVING {having}"
        " ORDER BY cseq, alert_id, status, route"
    )
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return [_row(r) for r in store.query(sql, params, binary=True).result_rows]


def row_states(store: Store, keys: Iterable[Key]) -> dict[Key, int]:
    """The latest state of each of ``keys`` that the store holds."""
    wanted = set(keys)
    if not wanted:
        return {}
    rows = store.query(
        "SELECT alert_id, status, route, argMax(delivered, version) FROM outbox "
        "WHERE alert_id IN {ids:Array(String)} GROUP BY alert_id, status, route",
        {"ids": sorted({k[0] for k in wanted})},
    ).result_rows
    return {k: int(r[3]) for r in rows if (k := (r[0], r[1], r[2])) in wanted}


def chain(delivery_id: str) -> list[str]:
    """A delivery id and the ids that must reach the route before it.

    >>> chain("a1:resolved"), chain("i1:3"), chain("a1:firing")
    (['a1:firing', 'a1:resolved'], ['i1:1', 'i1:2', 'i1:3'], ['a1:firing'])
    """
    head, _, status = delivery_id.rpartition(":")
    if status == "resolved":
        return [f"{head}:firing", delivery_id]
    if status.isdigit() and 1 <= int(status) <= 10_000:
        return [f"{head}:{n}" for n in range(1, int(status) + 1)]
    return [delivery_id]


class Outbox:
    def __init__(
        self,
        store: Store,
        routes: Sequence[Route],
        budget_s: float = 2.0,
        max_keys: int = 100_000,
        max_pending: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        rest_base_s: float = 1.0,
        committed_seq: int | None = None,
    ) -> None:
        self.store = store
        # rows above it belong to a checkpoint that never completed (a worker's start deletes
        # them; the CLI, which does not, leaves them to that start)
        self.committed_seq = committed_seq
        self.routes = {r.name: r for r in routes}
        self.budget_s = budget_s
        self.max_keys = max_keys
        self.max_pending = max_pending
        self.spilled = False  # undelivered rows wait in the store beyond max_pending
        self._clock = clock
        self._known: OrderedDict[Key, None] = OrderedDict()  # bounded cache
        self.pending: dict[Key, Row] = {}
        # refused rows that a pending row waits behind (a resolution behind its firing)
        self.held: set[Key] = set()
        # a route that failed rests for a jittered, growing delay before the next try
        self.backoff = {name: Backoff(base_s=rest_base_s, cap_s=60.0) for name in self.routes}
        self.resting_until: dict[str, float] = {}
        self.failing_since: dict[str, tuple[float, str]] = {}  # route -> (clock, first error)
        self.refused_rows: dict[str, int] = {}  # route -> rows refused now (in the store)
        self.refused_total = dict.fromkeys(self.routes, 0)  # refusals by this process
        self.last_refusal: dict[str, Row] = {}  # route -> its newest refusal here
        self._count_refused()
        self._recover()

    def _count_refused(self) -> None:
        rows = self.store.query(
            "SELECT route, count() FROM (SELECT route, argMax(delivered, version) AS state "
            "FROM outbox GROUP BY alert_id, status, route) WHERE state = {r:UInt8} GROUP BY route",
            {"r": REFUSED},
        ).result_rows
        self.refused_rows = {str(route): int(n) for route, n in rows}

    def _recover(self) -> None:
        """Load the oldest undelivered rows, up to ``max_pending`` in memory (at a worker's
        start ``checkpoint.begin`` already dropped unfinished ones)."""
        room = self.max_pending - len(self.pending)
        limit = room + len(self.pending)
        having, params = "state = {p:UInt8}", {"p": PENDING}
        if self.committed_seq is not None:
            having += " AND cseq <= {c:UInt64}"
            params["c"] = self.committed_seq
        rows = select_rows(self.store, having, params, limit)
        self.spilled = len(rows) == limit
        loaded = []
        for row in rows:
            if row.route in self.routes and len(self.pending) < self.max_pending:
                if row.key not in self.pending:
                    loaded.append(row)
                self.pending.setdefault(row.key, row)
        self._hold_behind_refused(loaded)

    def _hold_behind_refused(self, rows: Sequence[Row]) -> None:
        before = [p for r in rows if (p := predecessor(r.key)) and p not in self.pending]
        self.held |= {k for k, state in row_states(self.store, before).items() if state == REFUSED}

    def stage(
        self, records: Sequence[Mapping[str, Any]], seq: int, notifications: Sequence[Any] = ()
    ) -> int:
        """Write outbox rows not staged before: per (alert, status) for a route that takes
        alerts, per group notification (incident id, its number) for a route that takes
        incidents; returns how many. ``records`` are in order: an alert that fired and resolved
        since the last checkpoint comes as its firing record, then its resolved one. Silenced
        records are not sent, and neither is a resolution whose firing never was."""
        if not self.routes or not (records or notifications):
            return 0
        candidates: dict[Key, tuple[bool, Any]] = {}  # key -> (grouped, what), in order
        for route in self.routes:
            if self.routes[route].grouped:
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
        before_them = [p for k in candidates if (p := predecessor(k)) is not None]
        in_store = row_states(self.store, [*candidates, *before_them])
        staged = self._known.keys() | self.pending.keys() | in_store.keys()
        rows = []
        for k, (grouped, what) in candidates.items():
            if k in in_store:
                continue
            before = predecessor(k)
            if not grouped and before is not None and before not in staged:
                continue  # its firing was silenced, or came before this route existed
            if before is not None and in_store.get(before) == REFUSED:
                self.held.add(before)
            rows.append(Row(*k, notification_json(what) if grouped else alert_json(what), seq))
            staged.add(k)
        self._write(rows)
        for row in rows:
            if self.spilled or len(self.pending) >= self.max_pending:
                self.spilled = True  # the rest waits in the store, read back in order
                break
            self.pending[row.key] = row
        return len(rows)

    def mark_sent(self, keys: Iterable[Key]) -> None:
        """(alert id, status, route) sent outside the outbox: never stage them."""
        for key in keys:
            self._known[key] = None

    def deliver(self) -> int:
        """Send pending rows, oldest first, for at most ``budget_s`` (an attempt started in
        time gets the route's whole timeout); returns how many are left."""
        now = self._clock()
        deadline = now + self.budget_s
        changed: list[Row] = []
        resting = {r for r, until in self.resting_until.items() if now < until}
        for row in sorted(self.pending.values(), key=lambda r: (r.created_seq, r.key)):
            if self._clock() >= deadline:
                break
            before = predecessor(row.key)
            if row.route in resting or before in self.pending or before in self.held:
                continue
            route = self.routes[row.route]
            outcome = route.deliver(row.delivery_id, row.payload, deadline)
            if not outcome.attempts:
                break
            new = self._outcome(row, outcome, route.max_timeouts)
            changed.append(new)
            if outcome.timeouts or new.delivered == PENDING:  # down or too slow: rest
                self.failing_since.setdefault(row.route, (self._clock(), outcome.error))
                delay = self.backoff[row.route].next_delay()
                self.resting_until[row.route] = self._clock() + delay
                resting.add(row.route)
            if new.delivered == PENDING:
                self.pending[row.key] = new
                continue
            del self.pending[row.key]
            if new.delivered == DELIVERED:
                self.backoff[row.route].attempts = 0
                self.failing_since.pop(row.route, None)
            else:
                self._refused(new)
        self._write(changed)
        if self.spilled and len(self.pending) < self.max_pending // 2:
            self._recover()
        return len(self.pending)

    def _outcome(self, row: Row, outcome: Outcome, max_timeouts: int) -> Row:
        timeouts = row.timeouts + outcome.timeouts
        error = outcome.error
        if outcome.delivered:
            state = DELIVERED
        elif outcome.permanent:
            state = REFUSED
        elif outcome.timeouts and timeouts >= max_timeouts:
            state = REFUSED
            error += f"; {timeouts} timed-out attempts, the most allowed"
        else:
            state = PENDING
        return replace(
            row,
            delivered=state,
            delivered_at_ms=int(time.time() * 1000) if state == DELIVERED else None,
            attempts=row.attempts + outcome.attempts,
            last_error=error,
            version=row.version + 1,
            response_status=outcome.status,
            timeouts=timeouts,
        )

    def _refused(self, row: Row) -> None:
        """Kept and counted, never taken for a delivery; what waits behind it stays waiting."""
        self.refused_rows[row.route] = self.refused_rows.get(row.route, 0) + 1
        self.refused_total[row.route] = self.refused_total.get(row.route, 0) + 1
        self.last_refusal[row.route] = row
        after = successor(row.key)
        if after is not None and after in self.pending:
            self.held.add(row.key)

    def requeue(
        self, ids: Sequence[str] = (), route: str | None = None, all_refused: bool = False
    ) -> list[Row]:
        """Make refused deliveries pending again (``inferwatch outbox retry``): those with a
        delivery id in ``ids`` (with the refused ones they wait behind), else every one of
        ``route``, else with ``all_refused`` all. Returns the rows made pending, in delivery
        order; an empty selection does nothing."""
        if not (ids or route or all_refused):
            return []
        having: list[str] = ["state = {r:UInt8}"]
        params: dict[str, Any] = {"r": REFUSED}
        if route:
            having.append("route = {route:String}")
            params["route"] = route
        if ids:
            having.append("concat(alert_id, ':', status) IN {ids:Array(String)}")
            params["ids"] = sorted({c for i in ids for c in chain(i)})
        rows = select_rows(self.store, " AND ".join(having), params)
        new = [
            replace(r, delivered=PENDING, delivered_at_ms=None, last_error="",
                    version=r.version + 1, response_status=0, timeouts=0)
            for r in rows
        ]  # fmt: skip
        self._write(new)
        for row in new:
            self.refused_rows[row.route] = max(0, self.refused_rows.get(row.route, 0) - 1)
            self.held.discard(row.key)
            if row.route not in self.routes:
                continue  # sent by the next worker that has the route
            if self.spilled or len(self.pending) >= self.max_pending:
                self.spilled = True
            else:
                self.pending[row.key] = row
        return new

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
                    "response_status": pa.array(col("response_status"), pa.uint16()),
                    "timeouts": pa.array(col("timeouts"), pa.uint32()),
                }
            ),
        )


def _row(r: Sequence[Any]) -> Row:
    aid, status, route, payload, cseq, state, at, attempts, error, version, code, timeouts = r
    at_ms = None
    if at is not None:
        at = at if at.tzinfo else at.replace(tzinfo=dt.UTC)
        at_ms = int(at.timestamp() * 1000)
    return Row(
        _text(aid), _text(status), _text(route), bytes(payload), int(cseq), int(state), at_ms,
        int(attempts), _text(error), int(version), int(code), int(timeouts),
    )  # fmt: skip


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
