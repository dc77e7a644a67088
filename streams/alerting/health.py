"""Alerts on the pipeline's own health, checked at every checkpoint (issue 5, item 4):

- ``pipeline.consumer_lag``: the source's consumer lag (messages behind, all partitions) has
  stayed above ``lag_events`` for ``lag_s`` seconds of wall clock; resolved once it is below.
  Detection is late by that much: the SOC's view is stale.
- ``pipeline.dead_letter_spike``: the share of rejected messages since the last checkpoint is at
  least ``dlq_share`` and ``dlq_factor`` times its usual share (an average over earlier
  checkpoints), with at least ``dlq_min`` rejects; resolved when a checkpoint's share is back
  under half that bar. A producer that broke its schema, or someone feeding garbage.

Retention gaps (``pipeline.retention_gap``), a store or route outage (``pipeline.sink_paused``)
and a silent model or gateway (``pipeline.silent_source``, a detector) are raised elsewhere.
Both alerts here are per source; an open one is restored from the alerts table at start, so it
resolves under the same id after a restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from detectors.base import AlertChange
from schemas.alert import Alert
from streams.store import rows as records
from streams.store.store import Store

LAG = "pipeline.consumer_lag"
DLQ = "pipeline.dead_letter_spike"


class PipelineHealth:
    def __init__(
        self,
        source: str,
        lag_events: int = 1_000_000,
        lag_s: float = 300.0,
        dlq_share: float = 0.05,
        dlq_factor: float = 10.0,
        dlq_min: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.lag_events, self.lag_s = lag_events, lag_s
        self.dlq_share, self.dlq_factor, self.dlq_min = dlq_share, dlq_factor, dlq_min
        self._clock = clock
        self._lag_since: float | None = None
        self.usual_share: float | None = None  # rejects per message, over earlier checkpoints
        self.open: dict[str, dict[str, Any]] = {}  # detector -> the open episode

    def restore(self, store: Store) -> None:
        rows = store.query(
            "SELECT detector, evidence, toUnixTimestamp64Milli(ts) FROM alerts FINAL "
            "WHERE detector IN {d:Array(String)} AND status = 'firing' AND entity = {e:String}",
            {"d": [LAG, DLQ], "e": self.source},
        ).result_rows
        for det, evidence, ts in rows:
            ev = orjson.loads(evidence)
            self.open[det] = {"started_ms": int(ev["started_ms"]), "ts_ms": int(ts),
                              "at_firing": ev}  # fmt: skip

    def check(
        self, lag: Mapping[int, int], rejected: int, messages: int, ts_ms: int
    ) -> list[Alert]:
        """Alert records (firing or resolved) whose state changed; ``rejected`` of ``messages``
        since the last check; ``ts_ms`` the watermark, for the alerts' event time."""
        out = []
        total = sum(lag.values())
        now = self._clock()
        if total > self.lag_events:
            self._lag_since = self._lag_since if self._lag_since is not None else now
        else:
            self._lag_since = None
        lagging = self._lag_since is not None and now - self._lag_since >= self.lag_s
        evidence = {"lag_messages": total, "threshold": self.lag_events, "for_s": self.lag_s,
                    "partitions": {str(p): n for p, n in sorted(lag.items())}}  # fmt: skip
        out += self._episode(LAG, lagging, not lagging and total <= self.lag_events, evidence,
                             ts_ms, float(total), float(self.lag_events))  # fmt: skip
        if messages:
            share = rejected / messages
            usual = self.usual_share if self.usual_share is not None else 0.0
            bar = max(self.dlq_share, self.dlq_factor * usual)
            spike = rejected >= self.dlq_min and share >= bar
            evidence = {"rejected": rejected, "messages": messages, "share": round(share, 4),
                        "usual_share": round(usual, 5), "bar": round(bar, 4)}  # fmt: skip
            out += self._episode(DLQ, spike, share < bar / 2, evidence, ts_ms, share, bar)
            if not spike and DLQ not in self.open:
                self.usual_share = share if self.usual_share is None else (
                    0.9 * self.usual_share + 0.1 * share)  # fmt: skip
        return out

    def _episode(
        self, det: str, firing: bool, clear: bool, evidence: dict[str, Any], ts_ms: int,
        score: float, threshold: float,
    ) -> list[Alert]:  # fmt: skip
        ep = self.open.get(det)
        if firing and ep is None:
            ep = self.open[det] = {"started_ms": int(time.time() * 1000), "ts_ms": ts_ms,
                                   "at_firing": evidence}  # fmt: skip
            return [self._record(det, ep, "firing", evidence, ts_ms, score, threshold)]
        if ep is not None and clear:
            del self.open[det]
            evidence = {**evidence, "at_firing": ep.get("at_firing", {})}
            return [self._record(det, ep, "resolved", evidence, ts_ms, score, threshold)]
        return []

    def _record(
        self, det: str, ep: dict[str, Any], status: str, evidence: dict[str, Any], ts_ms: int,
        score: float, threshold: float,
    ) -> Alert:  # fmt: skip
        lag = det == LAG
        title = (f"Consumer lag on {self.source} is high: detection is running behind" if lag
                 else f"Rejected messages on {self.source} spiked")  # fmt: skip
        summary = (
            f"{evidence['lag_messages']:,} messages behind (threshold {self.lag_events:,} for "
            f"{self.lag_s:g} s)." if lag else
            f"{evidence['rejected']:,} of {evidence['messages']:,} messages rejected since the "
            f"last checkpoint ({evidence['share']:.1%}; usual {evidence['usual_share']:.2%}). "
            "See inferwatch's dead_letters table for reasons."
        )  # fmt: skip
        change = AlertChange(
            entity_type="global",
            entity=self.source,
            model_id="",
            tenant="",
            status="firing" if status == "firing" else "resolved",
            ts_ms=ep["ts_ms"],
            episode_start_ms=ep["started_ms"],
            first_seen_ms=ep["ts_ms"],
            last_seen_ms=max(ts_ms, ep["ts_ms"]),
            score=score,
            threshold=threshold,
            severity="high" if lag else "medium",
            title=title,
            summary=summary,
            evidence={**evidence, "started_ms": ep["started_ms"]},
            event_count=0,
            sample_event_ids=(),
            resolved_ms=max(ts_ms, ep["ts_ms"]) if status == "resolved" else None,
        )
        return records.alert_record(change, det, "1", (), (), int(time.time() * 1000))
