"""The outbox as an analyst reaches it: the ``outbox`` query (``inferwatch outbox list``, also
through the worker's local API) and the ``outbox_retry`` command that the worker applies at its
next checkpoint (``inferwatch outbox retry`` while a worker owns the store)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson

from streams.alerting.outbox import (
    DELIVERED,
    PENDING,
    STATES,
    Outbox,
    predecessor,
    row_states,
    select_rows,
)
from streams.store.store import Store


def deliveries(
    store: Store,
    status: str | None = None,
    route: str | None = None,
    delivery_id: str | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Outbox rows in delivery order (``inferwatch outbox list``): their state, the receiver's
    last answer, and for a pending one what it waits behind."""
    if status is not None and status not in STATES:
        raise ValueError(f"--status {status!r}: expected one of {', '.join(STATES)}")
    having: list[str] = ["1"]
    params: dict[str, Any] = {}
    if status is not None:
        having.append("state = {state:UInt8}")
        params["state"] = STATES[status]
    if route:
        having.append("route = {route:String}")
        params["route"] = route
    if delivery_id:
        having.append("concat(alert_id, ':', status) = {id:String}")
        params["id"] = delivery_id
    rows = select_rows(store, " AND ".join(having), params, limit)
    states = row_states(
        store, (p for r in rows if r.delivered == PENDING and (p := predecessor(r.key)))
    )
    names = {v: k for k, v in STATES.items()}
    out = []
    for r in rows:
        alert = orjson.loads(r.payload) if r.payload[:1] == b"{" else {}
        before = predecessor(r.key)
        note = ""
        if r.delivered == PENDING and before in states and states[before] != DELIVERED:
            assert before is not None
            note = f"waits for {before[0]}:{before[1]} ({names[states[before]]})"
        out.append(
            {
                "id": r.delivery_id,
                "route": r.route,
                "state": names[r.delivered],
                "detector": str(alert.get("detector", "")),
                "entity": str(alert.get("entity", alert.get("group_key", ""))),
                "attempts": r.attempts,
                "timeouts": r.timeouts,
                "response_status": r.response_status,
                "response": r.last_error,
                "delivered_at": None
                if r.delivered_at_ms is None
                else dt.datetime.fromtimestamp(r.delivered_at_ms / 1000, dt.UTC),
                "note": note,
            }
        )
    return out


MAX_RETRY_IDS = 10_000


def check_retry(worker: Any, args: dict[str, Any]) -> None:
    """The arguments of the ``outbox_retry`` command (the worker's local API), before it is
    accepted: a selection, and values of the right types."""
    ids, route, every = args.get("ids", []), args.get("route"), args.get("all_refused", False)
    if not (isinstance(ids, list) and len(ids) <= MAX_RETRY_IDS):
        raise ValueError(f"ids: expected a list of at most {MAX_RETRY_IDS} delivery ids")
    if not all(isinstance(i, str) and i.count(":") >= 1 for i in ids):
        raise ValueError("ids: expected delivery ids ALERT_ID:STATUS")
    if route is not None and not isinstance(route, str):
        raise ValueError("route: expected a route name")
    if not isinstance(every, bool):
        raise ValueError("all_refused: expected true or false")
    if not (ids or route or every):
        raise ValueError("expected ids, route or all_refused")


def retry_command(worker: Any, args: dict[str, Any]) -> None:
    """Apply ``outbox_retry`` on the worker's thread, at its checkpoint: the rows become
    pending and go out in the delivery that follows. A selection that matches nothing (the
    rows went out meanwhile) does nothing."""
    outbox = worker.outbox if worker.outbox is not None else Outbox(worker.store, [])
    outbox.requeue(args.get("ids", []), args.get("route"), bool(args.get("all_refused")))
