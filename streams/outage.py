"""What the worker does while its store is down (DESIGN.md section 6, sink outage).

A checkpoint's writes are retried as a whole (every table is idempotent and the state rows are
built once, :class:`streams.checkpoint.Prepared`), after a delay drawn with full jitter from an
exponential backoff, so many workers do not hammer a recovering store in step. While it waits
the worker pauses its partitions and keeps polling, so it keeps its group membership and reads
nothing more: memory stays what the unwritten checkpoint holds. The outage itself is an alert,
``pipeline.sink_paused``, sent straight to the routes (the outbox lives in the store that is down)
and written to the store once it is back, firing and then resolved.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson

from detectors.base import AlertChange
from streams import records
from streams.outbox import Backoff, Outbox, Route, alert_json
from streams.store import Store

SINK_PAUSED_DETECTOR = "pipeline.sink_paused"


class SinkOutage:
    """One outage of the store (or, with ``route=True``, of an alert route): its alert, and
    the direct notifications of its routes."""

    def __init__(
        self,
        store_name: str,
        error: str,
        ts_ms: int,
        routes: Sequence[Route],
        route: bool = False,
    ) -> None:
        self.store_name = store_name
        self.route = route
        self.first_error = error
        self.last_error = error
        self.started_ms = int(time.time() * 1000)
        self.started_s = time.monotonic()
        self.ts_ms = ts_ms  # event time: the watermark when the outage began
        self.routes = routes
        self.failures = 1
        self.backoff = Backoff()
        self.notified: set[tuple[str, str, str]] = set()  # (alert id, status, route) sent

    def record(self, resolved: bool) -> dict[str, Any]:
        secs = time.monotonic() - self.started_s
        change = AlertChange(
            entity_type="global",
            entity=self.store_name,
            model_id="",
            tenant="",
            status="resolved" if resolved else "firing",
            ts_ms=self.ts_ms,
            episode_start_ms=self.started_ms,
            first_seen_ms=self.ts_ms,
            last_seen_ms=self.ts_ms,
            score=float(self.failures),
            threshold=1.0,
            severity="high",
            title=(
                f"Deliveries to the alert route {self.store_name} are failing"
                if self.route
                else f"Writes to the store {self.store_name} are failing; ingestion is paused"
            ),
            summary=(
                (
                    f"The worker cannot deliver alerts to {self.store_name} ({self.first_error})."
                    " They wait in the outbox and are retried with backoff; detection goes on, "
                    "but nobody is paged until the route is back."
                    if self.route
                    else f"The worker cannot write to {self.store_name} ({self.first_error}). It "
                    "keeps its partitions paused and retries with backoff; nothing is committed "
                    "or lost, but detection is blind until the store is back."
                )
                + (f" It came back after {secs:.1f} s." if resolved else "")
            ),
            evidence={
                "store": self.store_name,
                "first_error": self.first_error,
                "last_error": self.last_error,
                "failed_attempts": self.failures,
                "paused_s": round(secs, 3),
                "started_ms": self.started_ms,
            },
            event_count=0,
            sample_event_ids=(),
            resolved_ms=self.ts_ms if resolved else None,
        )
        now_ms = int(time.time() * 1000)
        return records.alert_record(change, SINK_PAUSED_DETECTOR, "1", (), (), now_ms)

    def notify(self, resolved: bool, budget_s: float = 2.0) -> dict[str, Any]:
        """Send the alert to every route now (not through the store's outbox); returns it."""
        rec = self.record(resolved)
        payload = alert_json(rec)
        deadline = time.monotonic() + budget_s
        for route in self.routes:
            key = (rec["alert_id"], rec["status"], route.name)
            if key in self.notified:
                continue
            outcome = route.deliver(f"{rec['alert_id']}:{rec['status']}", payload, deadline)
            if outcome.delivered:
                self.notified.add(key)
        return rec


class RouteHealth:
    """A route failing for ``alert_after_s`` raises ``pipeline.sink_paused`` for it, written to
    the store (the route itself gets it from the outbox once it is back); the first delivery
    that goes through again resolves it."""

    def __init__(self, alert_after_s: float = 30.0) -> None:
        self.alert_after_s = alert_after_s
        self.outages: dict[str, SinkOutage] = {}

    def restore(self, store: Store) -> None:
        """Route outages still firing in the store (raised before a restart), so that the
        route's recovery resolves them under the same alert id."""
        rows = store.query(
            "SELECT entity, evidence, toUnixTimestamp64Milli(ts) FROM alerts FINAL "
            "WHERE detector = {d:String} AND status = 'firing' AND startsWith(entity, 'route:')",
            {"d": SINK_PAUSED_DETECTOR},
        ).result_rows
        for entity, evidence, ts in rows:
            ev = orjson.loads(evidence)
            outage = SinkOutage(entity, ev.get("first_error", ""), int(ts), (), route=True)
            outage.started_ms = int(ev["started_ms"])
            self.outages[entity.removeprefix("route:")] = outage

    def check(self, outbox: Outbox, ts_ms: int) -> list[dict[str, Any]]:
        """Alert records (firing or resolved) for routes whose state changed."""
        now = time.monotonic()
        out = []
        for name in outbox.routes:
            failing = outbox.failing_since.get(name)
            outage = self.outages.get(name)
            if outage is None and failing and now - failing[0] >= self.alert_after_s:
                outage = self.outages[name] = SinkOutage(
                    f"route:{name}", failing[1], ts_ms, (), route=True
                )
                out.append(outage.record(resolved=False))
            elif outage is not None and failing is None:
                out.append(self.outages.pop(name).record(resolved=True))
        return out
