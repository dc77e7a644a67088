"""``pipeline.silent_source``: a model, or a gateway (``attributes.gateway``), that has stopped
sending events for several times its usual gap, while the rest of the stream goes on.

A monitor whose input has quietly stopped looks exactly like a monitor with nothing to report;
the SOC must hear about it. Per source the detector keeps its last event time and a
high-water mark ``h`` of the gaps between its events that decays with a half-life of
``half_life_h`` hours of event time, so a source that bursts on a schedule (a nightly batch)
carries its long gaps and a steady one is judged on its recent rhythm. A source is judged
after ``warmup_h`` hours of event time (a day and an hour: a daily job has shown its gap) and
``min_events`` events. It is silent once the stream's event clock (the largest event time seen
so far, minus ``lateness_s``) passes ``last + max(min_silence_s, k · h)``. The alert's time is
that deadline and it resolves at the source's next event.

Why this way: the decision depends only on the events in arrival order, not on how they are cut
into batches (the clock is a running maximum, each source's deadline is fixed by its own last
event); the decayed maximum is one float per source, updated for a whole batch with one prefix
maximum (``u = log2 h + t / H`` obeys ``u_i = max(u_{i-1}, log2 g_i + t_i / H)``). Where it
stops: it needs other events to move event time, so a stream where everything stops at once is
not reported by this detector; the worker's consumer-lag and route alerts are separate.

>>> import numpy as np
>>> from detectors.base import DetectorInput, KeySpace
>>> from schemas.batch import empty_batch
>>> det = SilentSource(min_events=5, min_silence_s=60, warmup_h=0.1)
>>> ts = np.concatenate([np.arange(0, 600_000, 10_000), np.arange(600_000, 1_200_000, 10_000)])
>>> models = np.array(["a"] * 60 + ["b"] * 60, dtype=object)  # "a" stops at 590 s
>>> b = empty_batch()
>>> import dataclasses
>>> b = dataclasses.replace(b, ts_ms=ts.astype(np.int64), model_id=models,
...     attributes=np.full(120, "", dtype=object), event_id=models)
>>> out = det.update(DetectorInput(b, {}, KeySpace(), 0))
>>> [(a.entity, a.status, a.ts_ms) for a in out.alerts]
[('a', 'firing', 690000)]
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import orjson

from detectors.base import (
    EMPTY,
    I64,
    AlertChange,
    DetectorBase,
    DetectorInput,
    KeySpace,
    Output,
    Snapshot,
)

INT64_MIN = -(2**63)


class SilentSource(DetectorBase):
    name: ClassVar[str] = "pipeline.silent_source"
    version = "1"
    atlas: ClassVar[tuple[str, ...]] = ()
    owasp: ClassVar[tuple[str, ...]] = ()
    entity_types: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        k: float = 10.0,
        min_silence_s: float = 600.0,
        min_events: int = 50,
        half_life_h: float = 24.0,
        lateness_s: float = 60.0,
        warmup_h: float = 25.0,
        max_sources: int = 10_000,
    ) -> None:
        bad = [n for n, ok in (("k", k >= 1), ("min_silence_s", min_silence_s > 0),
               ("min_events", min_events >= 2), ("half_life_h", half_life_h > 0),
               ("lateness_s", lateness_s >= 0), ("warmup_h", warmup_h >= 0),
               ("max_sources", max_sources >= 1)) if not ok]  # fmt: skip
        if bad:
            raise ValueError(f"out of range: {', '.join(bad)}")
        self.k, self.min_silence_s, self.min_events = k, min_silence_s, min_events
        self.half_life_h, self.lateness_s, self.warmup_h = half_life_h, lateness_s, warmup_h
        self.max_sources = max_sources  # a flood of made-up model ids must not grow the state
        self.reset()

    def reset(self) -> None:
        # source -> [last_ms, u, n, episode start ms or None, first_ms]
        self._sources: dict[str, list[Any]] = {}
        self._clock_top = INT64_MIN  # largest event time seen
        self._changed = False

    def evict(self, entity_type: str, slots: I64) -> None:
        """Nothing keyed: one row per source."""

    @property
    def _h_ms(self) -> float:
        return self.half_life_h * 3_600_000

    def update(self, batch: DetectorInput) -> Output:
        ev = batch.events
        if ev.n == 0:
            return EMPTY
        ts = ev.ts_ms.astype(np.int64)
        # the event clock after each event, in arrival order: a running maximum
        clock = np.maximum.accumulate(np.maximum(ts, self._clock_top)) - int(self.lateness_s * 1000)
        rows_of = _sources(batch)
        alerts: list[AlertChange] = []
        new = sorted(set(rows_of) - set(self._sources))
        room = max(0, self.max_sources - len(self._sources))
        none = np.zeros(0, np.int64)
        for name in sorted(set(self._sources) | set(new[:room])):
            alerts += self._one(name, rows_of.get(name, none), ts, clock)
        self._clock_top = max(self._clock_top, int(ts.max()))
        self._changed = True
        return Output(alerts=tuple(alerts)) if alerts else EMPTY

    def _one(self, name: str, rows: I64, ts: I64, clock: I64) -> list[AlertChange]:
        """One source over the batch, vectorised: its state after each of its events, then for
        each stretch between them whether the clock passed the deadline."""
        src = self._sources.get(name)
        m = rows.size
        if src is None and m == 0:
            return []
        if m == 0 and src is not None and (src[3] is not None or src[2] < self.min_events):
            return []  # the common case of a quiet batch, without numpy
        t = ts[rows]
        if src is None:
            src = [int(t[0]), float(t[0]) / self._h_ms, 0, None, int(t[0])]
            self._sources[name] = src
        last0, u0, n0, open0, first = src
        # state after each event of the source: last (running max), u, n
        last = np.maximum.accumulate(np.maximum(t, last0))
        prev = np.concatenate([[last0], last[:-1]])
        gap = t - prev
        cand = np.where(gap > 0, np.log2(np.maximum(gap, 1)) + t / self._h_ms, -np.inf)
        u = np.maximum.accumulate(np.maximum(cand, u0))
        n = n0 + np.arange(1, m + 1)
        # stretch k runs from after event k-1 (k = 0: the batch start) to before event k
        s_last = np.concatenate([[last0], last]).astype(np.float64)
        s_u = np.concatenate([[u0], u])
        s_n = np.concatenate([[n0], n])
        starts = np.concatenate([[0], rows + 1])
        ends = np.concatenate([rows, [clock.size]])
        h = np.exp2(s_u - s_last / self._h_ms)
        deadline = s_last + np.maximum(self.min_silence_s * 1000, self.k * h)
        tail = clock[np.maximum(ends - 1, 0)]
        warm = (s_n >= self.min_events) & (s_last - first >= self.warmup_h * 3_600_000)
        fire = (ends > starts) & warm & (tail > deadline)
        if open0 is not None:
            fire[0] = False  # already firing: the source's next event resolves it
        resolve = fire[:m].copy()
        if m and open0 is not None:
            resolve[0] = True
        out: list[AlertChange] = []
        for k in np.flatnonzero(fire | np.concatenate([resolve, [False]])).tolist():
            begun = int(deadline[k]) if fire[k] else open0
            if fire[k]:
                state = [int(s_last[k]), float(s_u[k]), int(s_n[k]), begun]
                out.append(self._alert(name, state, "firing", begun))
            if k < m and resolve[k]:
                state = [int(last[k]), float(u[k]), int(n[k]), begun]
                out.append(self._alert(name, state, "resolved", int(t[k])))
        is_open = int(deadline[m]) if fire[m] else (open0 if m == 0 else None)
        if m:
            src[:4] = [int(last[-1]), float(u[-1]), int(n[-1]), is_open]
        else:
            src[3] = is_open
        return out

    def _alert(self, name: str, src: list[Any], status: str, at_ms: int) -> AlertChange:
        kind, _, entity = name.partition(":")
        start = int(src[3])
        what = "Model" if kind == "model" else "Gateway"
        silent_s = (at_ms - src[0]) / 1000 if status == "firing" else None
        summary = (
            f"{what} {entity} has sent no events since its last at {src[0]} ms (event time)"
            if status == "firing"
            else f"{what} {entity} is sending events again"
        )
        return AlertChange(
            entity_type="model" if kind == "model" else "global",
            entity=entity if kind == "model" else name,
            model_id=entity if kind == "model" else "",
            tenant="",
            status="firing" if status == "firing" else "resolved",
            ts_ms=start,
            episode_start_ms=start,
            first_seen_ms=int(src[0]),
            last_seen_ms=at_ms,
            score=1.0,
            threshold=1.0,
            severity="high",
            title=f"{what} {entity} went silent",
            summary=summary,
            evidence={
                "last_event_ms": int(src[0]),
                "deadline_ms": start,
                "usual_gap_high_ms": round(2.0 ** (src[1] - src[0] / self._h_ms)),
                "events_seen": int(src[2]),
                "silent_s": silent_s,
            },
            event_count=int(src[2]),
            sample_event_ids=(),
            resolved_ms=None if status == "firing" else at_ms,
        )

    def snapshot(self, keyspace: KeySpace) -> Snapshot:
        if not self._changed:
            return Snapshot()
        self._changed = False
        state = {"sources": self._sources, "clock_top": self._clock_top}
        return Snapshot(model=orjson.dumps(state, option=orjson.OPT_SORT_KEYS))

    def restore(self, snapshot: Snapshot, keyspace: KeySpace) -> None:
        if snapshot.model is None:
            return
        state = orjson.loads(snapshot.model)
        self._sources = state["sources"]
        self._clock_top = state["clock_top"]
        self._changed = False


def _sources(batch: DetectorInput) -> dict[str, I64]:
    """Rows of each source in arrival order: ``model:<id>``, or ``gateway:<name>`` for events
    whose ``attributes.gateway`` is set. The pipeline's per-model views already split the
    batch by model; a string sort per batch is the fallback without them."""
    ev = batch.events
    if batch.views:
        by_model = {m: v.rows for m, v in batch.views.items()}
    else:
        models, inv = np.unique(ev.model_id.astype(str), return_inverse=True)
        order = np.argsort(inv, kind="stable")
        cut = np.searchsorted(inv[order], np.arange(models.size + 1))
        by_model = {str(m): order[cut[i] : cut[i + 1]] for i, m in enumerate(models.tolist())}
    out = {f"model:{m}": rows for m, rows in by_model.items()}
    has = np.flatnonzero(np.fromiter(('"gateway"' in a for a in ev.attributes), bool, ev.n))
    gateways: dict[str, list[int]] = {}
    for i in has.tolist():
        gw = orjson.loads(ev.attributes[i]).get("gateway")
        if isinstance(gw, str) and gw:
            gateways.setdefault(f"gateway:{gw}", []).append(i)
    if gateways:
        elsewhere = np.ones(ev.n, bool)
        elsewhere[[i for rows in gateways.values() for i in rows]] = False
        out = {k: rows[elsewhere[rows]] for k, rows in out.items()}
        out.update({k: np.asarray(v, np.int64) for k, v in gateways.items()})
    return {k: rows for k, rows in out.items() if rows.size}
