"""What the worker does while its store is down (docs/architecture.md, sink outage).

A checkpoint's writes are retried as a whole (every table is idempotent and the state rows are
built once, :class:`streams.worker.checkpoint.Prepared`), after a delay drawn with full jitter from
an
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
from schemas.alert import Alert
from streams.alerting.outbox import Backoff, Outbox, Route, alert_json
from streams.store import rows as records
from streams.store.store import Store

SINK_PAUSED_DETECTOR = "pipeline.sink_paused"
DELIVERY_REFUSED_DETECTOR = "pipeline.delivery_refused"


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

    def record(self, resolved: bool) -> Alert:
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

    def notify(self, resolved: bool, budget_s: float = 2.0) -> Alert:
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


class RefusedDeliveries:
    """One episode of ``pipeline.delivery_refused`` for a route: firing while any of its
    deliveries stays refused in the outbox, resolved once none does (``outbox retry`` went
    through). Its start is the wall clock of the first refusal, so it survives restarts."""

    def __init__(self, route: str, ts_ms: int, started_ms: int | None = None) -> None:
        self.route = route
        self.ts_ms = ts_ms
        self.started_ms = int(time.time() * 1000) if started_ms is None else started_ms
        self.refused = 0
        self.last_status = 0
        self.last_error = ""
        self.last_delivery = ""

    def update(self, refused: int, last: Any | None, ts_ms: int) -> None:
        self.refused = refused
        self.ts_ms = max(self.ts_ms, ts_ms)
        if last is not None:
            self.last_status, self.last_error = last.response_status, last.last_error
            self.last_delivery = last.delivery_id

    def record(self, resolved: bool) -> Alert:
        name = self.route
        change = AlertChange(
            entity_type="global",
            entity=f"route:{name}",
            model_id="",
            tenant="",
            status="resolved" if resolved else "firing",
            ts_ms=self.ts_ms,
            episode_start_ms=self.started_ms,
            first_seen_ms=self.ts_ms,
            last_seen_ms=self.ts_ms,
            score=1.0,  # the count is evidence, not a degree: it does not raise the severity
            threshold=1.0,
            severity="high",
            title=f"The alert route {name} refuses deliveries",
            summary=(
                f"The receiver of route {name} refused {self.refused} deliveries (last: "
                f"{self.last_error or 'no answer'}). "
                "They are kept in the outbox and not retried on their own, so nobody is paged "
                "for them: fix the receiver (its URL, credentials, or the body it expects), "
                "then `inferwatch outbox retry --route " + name + "`; `inferwatch outbox list "
                "--status refused` shows them."
                + (" All of them went through since." if resolved else "")
            ),
            evidence={
                "route": name,
                "refused": self.refused,
                "last_status": self.last_status,
                "last_error": self.last_error,
                "last_delivery": self.last_delivery,
                "started_ms": self.started_ms,
            },
            event_count=self.refused,  # more refusals: a newer version of the open alert
            sample_event_ids=(),
            resolved_ms=self.ts_ms if resolved else None,
        )
        now_ms = int(time.time() * 1000)
        return records.alert_record(change, DELIVERY_REFUSED_DETECTOR, "1", (), (), now_ms)


class RouteHealth:
    """A route failing for ``alert_after_s`` raises ``pipeline.sink_paused`` for it, written to
    the store (the route itself gets it from the outbox once it is back); the first delivery
    that goes through again resolves it. A route with refused deliveries raises
    ``pipeline.delivery_refused`` (:class:`RefusedDeliveries`)."""

    def __init__(self, alert_after_s: float = 30.0) -> None:
        self.alert_after_s = alert_after_s
        self.outages: dict[str, SinkOutage] = {}
        self.refusals: dict[str, RefusedDeliveries] = {}

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
        rows = store.query(
            "SELECT entity, evidence, toUnixTimestamp64Milli(ts) FROM alerts FINAL "
            "WHERE detector = {d:String} AND status = 'firing' AND startsWith(entity, 'route:')",
            {"d": DELIVERY_REFUSED_DETECTOR},
        ).result_rows
        for entity, evidence, ts in rows:
            ev = orjson.loads(evidence)
            name = entity.removeprefix("route:")
            refusals = RefusedDeliveries(name, int(ts), int(ev["started_ms"]))
            refusals.refused = int(ev.get("refused", 0))
            refusals.last_status = int(ev.get("last_status", 0))
            refusals.last_error = str(ev.get("last_error", ""))
            refusals.last_delivery = str(ev.get("last_delivery", ""))
            self.refusals[name] = refusals

    def check(self, outbox: Outbox, ts_ms: int) -> list[Alert]:
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
            out.extend(self._refusals(outbox, name, ts_ms))
        return out

    def _refusals(self, outbox: Outbox, name: str, ts_ms: int) -> list[Alert]:
        refused = outbox.refused_rows.get(name, 0)
        episode = self.refusals.get(name)
        if episode is None and refused:
            episode = self.refusals[name] = RefusedDeliveries(name, ts_ms)
        elif episode is None or (episode.refused == refused and refused):
            return []
        episode.update(refused, outbox.last_refusal.get(name), ts_ms)
        if refused:
            return [episode.record(resolved=False)]
        return [self.refusals.pop(name).record(resolved=True)]
