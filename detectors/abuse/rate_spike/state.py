"""Per-key state and episodes of ``abuse.rate_spike``: its columns, one table per entity type,
and the opening, extending and closing of episodes with their alerts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import numpy as np

from detectors.abuse.population import NONE, Population
from detectors.base import (
    EMPTY,
    F64,
    I64,
    AlertChange,
    DetectorInput,
    Findings,
    KeyedColumns,
    KeySpace,
    Output,
    entity_name,
    json_evidence,
)

COLUMNS: dict[str, tuple[Any, Any]] = {
    "bucket": (np.int64, NONE),  # the key's current bucket index
    "count": (np.int64, 0),  # requests in the current bucket
    "threshold": (np.float64, 0.0),  # fixed when the current bucket opened
    "mean": (np.float64, 0.0),  # EWMA of completed bucket counts (history before the bucket)
    "var": (np.float64, 0.0),
    "n_buckets": (np.int64, 0),  # completed buckets folded in, capped
    "ep_start": (np.int64, NONE),  # open episode's start in event time, NONE when none
    "ep_bucket": (np.int64, NONE),  # last spiking bucket of the open episode
    "ep_count": (np.int64, 0),
    "ep_first": (np.int64, 0),
    "ep_last": (np.int64, 0),
    "ep_peak": (np.float64, 0.0),  # highest count / threshold of the episode
}


@dataclass(slots=True)
class Episode:
    """What an open episode needs beyond its numeric columns; only open episodes have one."""

    entity: str
    model_id: str
    tenant: str
    crossing_ms: int
    samples: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)
    opened_now: bool = False
    touched: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "entity": self.entity,
            "model_id": self.model_id,
            "tenant": self.tenant,
            "crossing_ms": self.crossing_ms,
            "samples": self.samples,
            "evidence": self.evidence,
        }


@dataclass(frozen=True, slots=True)
class Runs:
    """One entity type's rows of a batch cut into runs of (key, bucket), for the episode step."""

    et: str
    table: Table
    batch: DetectorInput
    rows: I64
    order: I64
    ts: I64
    start: I64
    length: I64
    slot: I64
    bucket: I64
    total: I64
    base: I64
    thr: F64
    mean: F64
    var: F64
    high: F64


class Table:
    """All state of one entity type."""

    def __init__(self, weights: list[int], min_weight: int, warm_buckets: int) -> None:
        self.cols = KeyedColumns(COLUMNS)
        self.population = Population(weights, min_weight, warm_buckets)
        self.episodes: dict[int, Episode] = {}
        self.saved: set[int] = set()  # slots whose episode extras are in the store


def rate_findings(
    parts: list[tuple[I64, F64, I64, F64, I64, F64, int]], entity_types: tuple[str, ...]
) -> tuple[Findings, ...]:
    """One finding per flagged event from the per-entity-type parts of ``RateSpike.update``."""
    if not parts or all(p[0].size == 0 for p in parts):
        return ()
    rows = np.concatenate([p[0] for p in parts])
    score = np.concatenate([p[1] for p in parts])
    count = np.concatenate([p[2] for p in parts])
    thr = np.concatenate([p[3] for p in parts])
    start = np.concatenate([p[4] for p in parts])
    mean = np.concatenate([p[5] for p in parts])
    et_idx = np.concatenate([np.full(p[0].size, p[6]) for p in parts])
    # one finding per event: the entity type with the higher score, api_key on a tie
    order = np.lexsort((et_idx, -score, rows))
    keep = order[np.r_[True, rows[order][1:] != rows[order][:-1]]]
    ets = [entity_types[i] for i in et_idx[keep].tolist()]
    evidence = json_evidence(
        [
            {
                "count": c,
                "threshold": t,
                "bucket_start": s,
                "mean": round(m, 3),
                "entity_type": e,
            }
            for c, t, s, m, e in zip(
                count[keep].tolist(),
                thr[keep].tolist(),
                start[keep].tolist(),
                mean[keep].tolist(),
                ets,
                strict=True,
            )
        ]
    )
    label = np.full(keep.size, "rate_spike", dtype=object)
    return (Findings(rows[keep], label, score[keep], evidence),)


class RateEpisodes:
    """The episode half of :class:`detectors.abuse.rate_spike.detector.RateSpike`: a loop over the
    few spiking
    runs and open episodes, not over keys or events."""

    name: ClassVar[str]
    bucket_s: int
    bucket_ms: int
    tables: dict[str, Table]
    _model_dirty: bool

    def _episodes(self, runs: Runs, spiking: I64, alerts: list[AlertChange]) -> None:
        """Open, extend and close episodes for the runs (key, bucket) that spiked: a loop over
        the few spiking runs, not over keys or events."""
        table, cols, events = runs.table, runs.table.cols.cols, runs.batch.events
        for r in spiking.tolist():
            slot = int(runs.slot[r])
            b = int(runs.bucket[r])
            thr = float(runs.thr[r])
            if cols["ep_start"][slot] != NONE and b >= cols["ep_bucket"][slot] + 2:
                self._close(runs.et, table, slot, alerts)
            # counts rise within a run, so its flagged events are its tail
            first = int(runs.start[r]) + max(0, int(thr) - int(runs.base[r]))
            end = int(runs.start[r] + runs.length[r])
            flagged = runs.rows[runs.order[first:end]]
            f_ts = runs.ts[runs.order[first:end]]
            ep = table.episodes.get(slot)
            if cols["ep_start"][slot] == NONE:
                cross = int(flagged[0])
                ep = table.episodes[slot] = Episode(
                    self._name(runs.et, runs.batch.keyspace, slot),
                    str(events.model_id[cross]),
                    str(events.tenant[cross]),
                    int(events.ts_ms[cross]),
                    opened_now=True,
                )
                cols["ep_start"][slot] = b * self.bucket_ms
                cols["ep_first"][slot] = f_ts.min()
                cols["ep_last"][slot] = f_ts.max()
            elif ep is None:  # restored rows without their model-level extras
                ep = table.episodes[slot] = self._placeholder(runs.et, runs.batch.keyspace, slot)
            ep.touched = True
            cols["ep_bucket"][slot] = b
            cols["ep_count"][slot] += flagged.size
            cols["ep_first"][slot] = min(int(cols["ep_first"][slot]), int(f_ts.min()))
            cols["ep_last"][slot] = max(int(cols["ep_last"][slot]), int(f_ts.max()))
            if len(ep.samples) < 5:
                ep.samples.extend(str(e) for e in events.event_id[flagged[: 5 - len(ep.samples)]])
            peak = float(runs.total[r]) / thr
            if peak > cols["ep_peak"][slot]:
                cols["ep_peak"][slot] = peak
                pop_high = float(runs.high[runs.order[end - 1]])
                ep.evidence = {
                    "count": int(runs.total[r]),
                    "threshold": thr,
                    "mean": round(float(runs.mean[r]), 3),
                    "std": round(math.sqrt(float(runs.var[r])), 3),
                    "bucket_s": self.bucket_s,
                    "bucket_start_ms": b * self.bucket_ms,
                    "population_high": None if math.isinf(pop_high) else pop_high,
                }
        for slot, ep in table.episodes.items():
            if ep.touched:
                alerts.append(self._alert(runs.et, table, slot, "firing"))
                ep.touched = ep.opened_now = False

    @staticmethod
    def _name(et: str, keyspace: KeySpace, slot: int) -> str:
        return entity_name(et, str(keyspace[et].keys_of(np.array([slot]))[0]))

    def _placeholder(self, et: str, keyspace: KeySpace, slot: int) -> Episode:
        start = int(self.tables[et].cols.cols["ep_start"][slot])
        return Episode(self._name(et, keyspace, slot), "", "", start)

    def _close(self, et: str, table: Table, slot: int, alerts: list[AlertChange]) -> None:
        ep = table.episodes.get(slot)
        if ep is not None and ep.opened_now:  # opened and closed in one batch: say it fired
            alerts.append(self._alert(et, table, slot, "firing"))
        alerts.append(self._alert(et, table, slot, "resolved"))
        table.episodes.pop(slot, None)
        cols = table.cols.cols
        for name in ("ep_start", "ep_bucket", "ep_count", "ep_first", "ep_last", "ep_peak"):
            cols[name][slot] = COLUMNS[name][1]
        table.cols.mark(np.array([slot]))

    def _alert(self, et: str, table: Table, slot: int, status: str) -> AlertChange:
        cols = table.cols.cols
        ep = table.episodes[slot]
        who = "api key" if et == "api_key" else "client IP"
        shown = ep.entity if et != "api_key" or len(ep.entity) <= 12 else ep.entity[:8] + "…"
        peak = float(cols["ep_peak"][slot])
        ev = ep.evidence
        start_ms = int(cols["ep_start"][slot])
        when = datetime.fromtimestamp(ev.get("bucket_start_ms", start_ms) / 1000, UTC)
        basis = (
            f"baseline {ev.get('mean', 0.0):.1f} ± {ev.get('std', 0.0):.1f} per bucket"
            if ev.get("population_high") is None
            else f"a new caller; population p99 {ev['population_high']:.0f} per bucket"
        )
        count = int(cols["ep_count"][slot])
        summary = (
            f"{ev.get('count', '?')} requests from {who} {ep.entity} in the {self.bucket_s} s "
            f"bucket starting {when:%Y-%m-%d %H:%M:%S}Z against a threshold of "
            f"{ev.get('threshold', 0.0):.0f} ({basis}); {count} requests over the threshold."
        )
        resolved = status == "resolved"
        clear_ms = (int(cols["ep_bucket"][slot]) + 2) * self.bucket_ms
        return AlertChange(
            entity_type=et,
            entity=ep.entity,
            model_id=ep.model_id,
            tenant=ep.tenant,
            status="resolved" if resolved else "firing",
            ts_ms=ep.crossing_ms,
            resolved_ms=clear_ms if resolved else None,
            episode_start_ms=start_ms,
            first_seen_ms=int(cols["ep_first"][slot]),
            last_seen_ms=int(cols["ep_last"][slot]),
            score=peak,
            threshold=float(ev.get("threshold", 0.0)),
            severity="high" if peak >= 2 else "medium",
            title=f"Request-rate spike on {who} {shown}",
            summary=summary,
            evidence=dict(ev),
            event_count=count,
            sample_event_ids=tuple(ep.samples),
            detector=self.name,
        )

    def advance(self, watermark_ms: int) -> Output:
        """Close the episodes whose last spiking bucket is a full bucket behind the watermark."""
        alerts: list[AlertChange] = []
        for et, table in self.tables.items():
            if not table.episodes:
                continue
            slots = np.fromiter(table.episodes, np.int64, len(table.episodes))
            due = slots[(table.cols.cols["ep_bucket"][slots] + 2) * self.bucket_ms <= watermark_ms]
            for slot in np.sort(due).tolist():
                self._close(et, table, slot, alerts)
        if not alerts:
            return EMPTY
        self._model_dirty = True
        alerts.sort(key=lambda a: (a.ts_ms, a.entity_type, a.entity))
        return Output(alerts=tuple(alerts))
