"""The naive one-object-per-key reference of ``abuse.rate_spike`` for the conformance suite and its
own tests.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

from detectors.abuse.rate_spike.detector import RateSpike
from schemas.batch import EventBatch
from tests.support.conformance import Normal, keep_latest


@dataclass
class _Ep:
    start_ms: int
    crossing_ms: int
    model_id: str
    tenant: str
    first_ms: int
    last_ms: int
    last_bucket: int
    count: int = 0
    samples: list[str] = field(default_factory=list)
    peak: float = 0.0
    peak_thr: float = 0.0


@dataclass
class _Key:
    bucket: int
    count: int = 0
    thr: float = 0.0
    mean: float = 0.0
    var: float = 0.0
    n: int = 0
    ep: _Ep | None = None


@dataclass
class _Pop:
    clock: int | None = None
    first: int | None = None
    high: float = math.inf
    counts: dict[int, dict[int, int]] = field(default_factory=dict)  # bucket -> bin -> keys


class NaiveRateSpike:
    """Deliberately naive: a dict of Python objects, every event on its own, every empty
    bucket folded one at a time."""

    def __init__(self, **params: Any) -> None:
        defaults = inspect.signature(RateSpike).parameters
        p = {name: v.default for name, v in defaults.items()} | params
        self.bucket_ms = p["bucket_s"] * 1000
        self.h = p["history_buckets"]
        self.warmup, self.k, self.ratio = p["warmup_buckets"], p["k_sigma"], p["ratio"]
        self.min_count, self.cold_factor = p["min_count"], p["cold_factor"]
        self.alpha = 2 / (self.h + 1)
        self.cap = max(math.floor(1 / self.alpha), self.warmup)
        beta = 1 - self.alpha
        length = max(2, min(4096, math.ceil(math.log(1e-4) / math.log(beta)))) if beta else 2
        self.weights = [int(2**24 * beta**age) for age in range(length)]
        self.min_weight = math.ceil(p["min_population"] * 2**24)
        self.edges = sorted({math.ceil(2 ** (m / 4)) for m in range(161)})
        self.keys: dict[str, dict[str, _Key]] = {"api_key": {}, "client_ip": {}}
        self.pop = {"api_key": _Pop(), "client_ip": _Pop()}
        self.findings: set[tuple[str, str, float]] = set()
        self.alerts: dict[tuple[Any, ...], tuple[Any, ...]] = {}

    def update(self, batch: EventBatch) -> None:
        for i in range(batch.n):
            verdicts = []
            for et in ("api_key", "client_ip"):
                if et == "api_key":
                    name = key = str(batch.api_key_id[i])
                else:
                    name = str(batch.client_ip[i])
                    key = f"{int(batch.partition[i])}|{name}"
                if name:
                    v = self._event(et, key, name, batch, i)
                    if v is not None:
                        verdicts.append(v)
            if verdicts:
                best = max(verdicts)  # the higher score; api_key first on a tie
                self.findings.add((str(batch.event_id[i]), "rate_spike", round(best, 6)))

    def _event(self, et: str, key: str, name: str, batch: EventBatch, i: int) -> float | None:
        ts = int(batch.ts_ms[i])
        b = ts // self.bucket_ms
        pop = self.pop[et]
        if pop.clock is None or b > pop.clock:
            self._tick(pop, b)
        st = self.keys[et].get(key)
        if st is None:
            st = self.keys[et][key] = _Key(bucket=b)
            st.thr = self._threshold(st, pop.high)
        elif b > st.bucket:
            if st.bucket > pop.clock - len(self.weights):
                bin_ = min(sum(1 for e in self.edges if e <= st.count) - 1, len(self.edges) - 2)
                per_bin = pop.counts.setdefault(st.bucket, {})
                per_bin[bin_] = per_bin.get(bin_, 0) + 1
            self._fold(st, st.count)
            if b - st.bucket - 1 >= self.h:
                st.mean, st.var, st.n = 0.0, 0.0, 0
            else:
                for _ in range(b - st.bucket - 1):
                    self._fold(st, 0)
            st.bucket, st.count = b, 0
            st.thr = self._threshold(st, pop.high)
        st.count += 1
        if st.count <= st.thr:
            return None
        score = st.count / st.thr
        ep = st.ep
        if ep is not None and st.bucket >= ep.last_bucket + 2:
            self._close(et, name, ep)
            ep = st.ep = None
        if ep is None:
            ep = st.ep = _Ep(
                start_ms=st.bucket * self.bucket_ms,
                crossing_ms=ts,
                model_id=str(batch.model_id[i]),
                tenant=str(batch.tenant[i]),
                first_ms=ts,
                last_ms=ts,
                last_bucket=st.bucket,
            )
        ep.count += 1
        ep.first_ms, ep.last_ms = min(ep.first_ms, ts), max(ep.last_ms, ts)
        ep.last_bucket = st.bucket
        if len(ep.samples) < 5:
            ep.samples.append(str(batch.event_id[i]))
        if score > ep.peak:
            ep.peak, ep.peak_thr = score, st.thr
        self._record(et, name, ep, "firing")
        return score

    def _tick(self, pop: _Pop, b: int) -> None:
        pop.clock = b
        for old in [x for x in pop.counts if x <= b - len(self.weights)]:
            del pop.counts[old]
        pop.first = b if pop.first is None else pop.first
        if b - pop.first < 2 * self.warmup:
            pop.high = math.inf
            return
        hist = [0] * (len(self.edges) - 1)
        for bucket, bins in pop.counts.items():
            for bin_, c in bins.items():
                hist[bin_] += self.weights[b - bucket] * c
        total = sum(hist)
        pop.high = math.inf
        if total >= self.min_weight:
            cum = 0
            for i, h in enumerate(hist):
                cum += h
                if cum * 100 >= total * 99:
                    pop.high = float(self.edges[i + 1] - 1)
                    break

    def _fold(self, st: _Key, count: int) -> None:
        a = max(self.alpha, 1 / (st.n + 1))
        d = count - st.mean
        incr = a * d
        st.mean += incr
        st.var = (1 - a) * (st.var + d * incr)
        st.n = min(st.n + 1, self.cap)

    def _threshold(self, st: _Key, high: float) -> float:
        if st.n >= self.warmup:
            raw = max(st.mean + self.k * math.sqrt(st.var + st.mean), self.ratio * st.mean)
        else:
            raw = self.cold_factor * high
        raw = max(raw, self.min_count)
        return raw if math.isinf(raw) else float(math.floor(raw + 1e-6))

    def _record(self, et: str, name: str, ep: _Ep, status: str) -> None:
        resolved = status == "resolved"
        key = ("abuse.rate_spike", ep.model_id, et, name, ep.start_ms)
        state = (
            status,
            (ep.last_bucket + 2) * self.bucket_ms if resolved else ep.crossing_ms,
            ep.count,
            ep.first_ms,
            ep.last_ms,
            tuple(ep.samples),
            round(ep.peak, 6),
            round(ep.peak_thr, 6),
            "high" if ep.peak >= 2 else "medium",
            ep.tenant,
        )
        keep_latest(self.alerts, key, state)

    def _close(self, et: str, name: str, ep: _Ep) -> None:
        self._record(et, name, ep, "resolved")

    def advance(self, watermark_ms: int) -> None:
        for et, keys in self.keys.items():
            for key, state in keys.items():
                ep = state.ep
                if ep is not None and (ep.last_bucket + 2) * self.bucket_ms <= watermark_ms:
                    self._close(et, key.split("|", 1)[1] if et == "client_ip" else key, ep)
                    state.ep = None

    def normal(self) -> Normal:
        return Normal(frozenset(self.findings), dict(self.alerts), frozenset())


NAIVE_REFERENCE = NaiveRateSpike


# small numbers, so that short generated streams cross thresholds, warm up and go cold again
NAIVE_PARAMS: dict[str, Any] = {
    "bucket_s": 10,
    "history_buckets": 4,
    "warmup_buckets": 2,
    "k_sigma": 1.5,
    "ratio": 2.0,
    "min_count": 3,
    "cold_factor": 1.5,
    "min_population": 2.0,
}
