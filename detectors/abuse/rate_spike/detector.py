"""``abuse.rate_spike``: request-rate spikes per api key and per client IP (see RateSpike)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import orjson

from detectors.abuse.population import NONE, WEIGHT_ONE, population_highs, population_weights
from detectors.abuse.rate_spike.state import Episode, RateEpisodes, Runs, Table, rate_findings
from detectors.base import (
    EMPTY,
    F64,
    I64,
    AlertChange,
    DetectorBase,
    DetectorInput,
    KeySpace,
    Output,
    Snapshot,
    segment_starts,
)
from detectors.episodes import restore_episodes, restore_keyed, snapshot_extras
from detectors.registry import register


def _segmented_cummax(values: I64, seg_id: I64) -> I64:
    """Running maximum of ``values`` restarting at each segment (segments are contiguous)."""
    same = seg_id[1:] == seg_id[:-1]
    if not np.any((values[1:] < values[:-1]) & same):
        return values
    distinct, rank = np.unique(values, return_inverse=True)
    width = int(distinct.size)
    acc = np.maximum.accumulate(seg_id * width + rank)
    return distinct[acc - seg_id * width]


@register("abuse.rate_spike")
class RateSpike(RateEpisodes, DetectorBase):
    """A caller's request rate jumps far above its own history, or far above what callers do.

    Counts requests per api key and per client IP (per partition, docs/architecture.md) in
    tumbling event-time buckets of ``bucket_s``. Each bucket's threshold is fixed when it opens,
    from history only:

    - a warm key (``warmup_buckets`` completed buckets, empty ones included) against an EWMA of
      its own counts: ``max(min_count, mean + k_sigma * sqrt(var + mean), ratio * mean)``. The
      ``+ mean`` is a Poisson floor for steady callers; ``ratio * mean`` keeps a heavy, honest
      caller from firing on noise. The EWMA starts as a running average (``alpha = max(2 /
      (history_buckets + 1), 1 / n)``) so a key's first, partial bucket does not dominate it.
    - a cold key against the population: ``max(min_count, cold_factor * high)``, ``high`` the
      p99 of completed bucket counts of all keys, from an exponentially decayed log-spaced
      histogram. Until it holds ``min_population`` decayed samples, and for the first
      ``2 * warmup_buckets`` buckets after the detector starts (the first bucket is partial,
      so its counts are low), cold keys are not judged: a fresh deployment would page on every
      heavy caller in its first minutes. A key idle
      for ``history_buckets`` buckets starts cold again: a nightly job must not page daily.

    Why: callers differ by orders of magnitude, so one fixed count per key is useless; an EWMA
    costs a few numbers per key and follows slow growth. The history spans six hours
    (``history_buckets`` 360) so that callers that burst on a schedule (every 15 minutes, say)
    carry their bursts in their variance; a shorter memory forgets the last burst before the
    next one and pages on an honest batch job. ``min_count`` 10 per minute is the smallest
    spike worth a page: a key that sends one call every two minutes and then ten a minute is
    a 20-fold jump that no honest variance explains (Poisson tail below 1e-8).

    Each event whose running count exceeds its bucket's threshold is a finding (``rate_spike``,
    score ``count / threshold``; flagged for both its key and its IP: one finding, the higher
    score). An episode opens at the first crossing and closes once the watermark passes the
    key's last spiking bucket plus one full bucket; a crossing after such a gap opens a new
    episode even before ``advance`` runs. Events older than their key's current bucket count
    into it. The population clock (largest bucket seen) moves in arrival order, so the same
    events in the same order give the same output however they are cut into batches.

    Parameters: ``bucket_s`` (60), ``history_buckets`` (360, EWMA span), ``warmup_buckets`` (5),
    ``k_sigma`` (6), ``ratio`` (4), ``min_count`` (10 per bucket), ``cold_factor`` (2),
    ``min_population`` (20), ``population_high`` (none: learnt; ``{"api_key": 30.0, ...}``
    freezes the population p99 per entity type, e.g. from an earlier run's baseline file, so
    per-key decisions depend on each key's own events only).

    >>> import dataclasses
    >>> from detectors.base import DetectorInput, KeySpace, entity_keys
    >>> from schemas.batch import empty_batch
    >>> det, ks = RateSpike(), KeySpace()
    >>> def run(ts):
    ...     obj = lambda v: np.full(len(ts), v, object)
    ...     ev = dataclasses.replace(
    ...         empty_batch(), event_id=np.array([f"e{t}" for t in ts], object),
    ...         ts_ms=np.asarray(ts, np.int64), model_id=obj("m"), tenant=obj("t"),
    ...         api_key_id=obj("key_ab12cd34ef"), client_ip=obj(""),
    ...         partition=np.zeros(len(ts), np.int32))
    ...     slots = {et: ks[et].lookup(entity_keys(ev, et), ev.ts_ms, ev.partition)
    ...              for et in det.entity_types}
    ...     return det.update(DetectorInput(ev, slots, ks, watermark_ms=0))
    >>> run(np.arange(0, 600_000, 6_000)).alerts  # ten minutes at 10 calls a minute
    ()
    >>> out = run(600_000 + np.arange(100) * 500)  # then 100 calls in 50 seconds
    >>> alert = out.alerts[0]
    >>> len(out.findings[0].rows), alert.threshold, alert.score, alert.severity
    (60, 40.0, 2.5, 'high')
    >>> print(alert.title)
    Request-rate spike on api key key_ab12…
    >>> [a.status for a in det.advance(780_000).alerts]  # a quiet bucket after the spike
    ['resolved']
    """

    atlas: ClassVar[tuple[str, ...]] = ("AML.T0040",)
    owasp: ClassVar[tuple[str, ...]] = ("LLM10",)
    entity_types: ClassVar[tuple[str, ...]] = ("api_key", "client_ip")

    def __init__(
        self,
        bucket_s: int = 60,
        history_buckets: int = 360,
        warmup_buckets: int = 5,
        k_sigma: float = 6.0,
        ratio: float = 4.0,
        min_count: int = 10,
        cold_factor: float = 2.0,
        min_population: float = 20.0,
        population_high: dict[str, float] | None = None,
    ) -> None:
        checks = {
            "bucket_s": bucket_s >= 1,
            "history_buckets": history_buckets >= 1,
            "warmup_buckets": warmup_buckets >= 0,
            "k_sigma": k_sigma >= 0,
            "ratio": ratio >= 1,
            "min_count": min_count >= 1,
            "cold_factor": cold_factor > 0,
            "min_population": min_population >= 0,
            "population_high": all(
                et in self.entity_types and v > 0 for et, v in (population_high or {}).items()
            ),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"abuse.rate_spike: invalid {', '.join(bad)}; expected bucket_s >= 1, "
                "history_buckets >= 1, warmup_buckets >= 0, k_sigma >= 0, ratio >= 1, "
                "min_count >= 1, cold_factor > 0, min_population >= 0, population_high a "
                f"positive number per entity type of {', '.join(self.entity_types)}"
            )
        self.bucket_s = bucket_s
        self.history_buckets = history_buckets
        self.warmup_buckets = warmup_buckets
        self.k_sigma = k_sigma
        self.ratio = ratio
        self.min_count = min_count
        self.cold_factor = cold_factor
        self.min_population = min_population
        self.population_high = population_high
        self.bucket_ms = bucket_s * 1000
        self.alpha = 2.0 / (history_buckets + 1)
        self.running = math.floor(1.0 / self.alpha)  # folds that use alpha = 1 / n
        self.n_cap = max(self.running, warmup_buckets)
        self.reset()

    def reset(self) -> None:
        weights = population_weights(self.history_buckets)
        min_weight = math.ceil(self.min_population * WEIGHT_ONE)
        warm = 2 * self.warmup_buckets
        self.tables = {et: Table(weights, min_weight, warm) for et in self.entity_types}
        for et, high in (self.population_high or {}).items():
            self.tables[et].population.freeze(high)
        self._model_dirty = False

    # -- per-key arithmetic, vectorised over keys ------------------------------------------

    def _fold(self, mean: F64, var: F64, n: I64, count: I64, gap: I64) -> tuple[F64, F64, I64]:
        """Fold one completed bucket of ``count``, then ``gap - 1`` empty buckets in closed form."""
        a = np.maximum(self.alpha, 1.0 / (n + 1))
        d = count - mean
        incr = a * d
        mean = mean + incr
        var = (1.0 - a) * (var + d * incr)
        n = n + 1
        zeros = gap - 1
        # empty buckets while alpha = 1/n: exact mean and population variance with zeros added
        g1 = np.clip(self.running - n, 0, zeros)
        n1 = n + g1
        part = n / n1
        mean1 = np.where(g1 > 0, mean * part, mean)
        var1 = np.where(g1 > 0, np.maximum(part * (var + mean * mean) - mean1 * mean1, 0.0), var)
        # then with a constant alpha: mean * b^g and b^g * (var + mean^2 * (1 - b^g))
        decay = np.power(1.0 - self.alpha, (zeros - g1).astype(np.float64))
        mean2 = mean1 * decay
        var2 = decay * (var1 + mean1 * mean1 * (1.0 - decay))
        stale = zeros >= self.history_buckets
        return (
            np.where(stale, 0.0, mean2),
            np.where(stale, 0.0, var2),
            np.where(stale, 0, np.minimum(n1 + zeros - g1, self.n_cap)),
        )

    def _threshold(self, mean: F64, var: F64, n: I64, high: F64) -> F64:
        own = np.maximum(mean + self.k_sigma * np.sqrt(var + mean), self.ratio * mean)
        cold = self.cold_factor * high
        thr = np.maximum(np.where(n >= self.warmup_buckets, own, cold), self.min_count)
        return np.floor(thr + 1e-6)  # counts are integers; the margin absorbs rounding

    # -- update ------------------------------------------------------------------------------

    def update(self, batch: DetectorInput) -> Output:
        events = batch.events
        if events.n == 0:
            return EMPTY
        self._model_dirty = True
        parts: list[tuple[I64, F64, I64, F64, I64, F64, int]] = []
        alerts: list[AlertChange] = []
        for order_et, et in enumerate(self.entity_types):
            col = events.api_key_id if et == "api_key" else events.client_ip
            rows = np.flatnonzero(col != "").astype(np.int64)
            if rows.size == 0:
                continue
            table = self.tables[et]
            table.cols.ensure(batch.keyspace[et].capacity)
            res = self._update_type(et, table, batch, rows, alerts)
            parts.append((*res, order_et))
        alerts.sort(key=lambda a: (a.ts_ms, a.entity_type, a.entity, a.status == "resolved"))
        findings = rate_findings(parts, self.entity_types)
        return Output(findings=findings, alerts=tuple(alerts))

    def _update_type(
        self,
        et: str,
        table: Table,
        batch: DetectorInput,
        rows: I64,
        alerts: list[AlertChange],
    ) -> tuple[I64, F64, I64, F64, I64, F64]:
        """All keys of one entity type at once. Returns flagged rows with score, count,
        threshold, bucket start and baseline mean."""
        cols = table.cols.cols
        slots = batch.slots[et][rows]
        ts = batch.events.ts_ms[rows]
        n = rows.size
        bucket = ts // self.bucket_ms
        # events of each key together, in arrival order
        order = np.argsort(slots, kind="stable")
        ss, bs = slots[order], bucket[order]
        seg = segment_starts(ss)
        seg_id = np.repeat(np.arange(seg.size), np.diff(np.append(seg, n)))
        seg_slot = ss[seg]
        prev_b = cols["bucket"][seg_slot]
        # out of order events count into the key's current bucket
        eff = np.maximum(_segmented_cummax(bs, seg_id), prev_b[seg_id])
        brk = np.ones(n, bool)
        brk[1:] = (ss[1:] != ss[:-1]) | (eff[1:] != eff[:-1])
        run_start = np.flatnonzero(brk)
        run_len = np.diff(np.append(run_start, n))
        nrun = run_start.size
        run_id = np.repeat(np.arange(nrun), run_len)
        run_seg = seg_id[run_start]
        run_slot = ss[run_start]
        run_b = eff[run_start]
        first_run = np.searchsorted(run_start, seg)
        rank = np.arange(nrun) - first_run[run_seg]
        cont = (rank == 0) & (run_b == prev_b[run_seg])
        base = np.where(cont, cols["count"][run_slot], 0)
        run_total = base + run_len
        count = np.arange(n) - run_start[run_id] + 1 + base[run_id]
        # the bucket each opening run closes, and its count
        prev_run = np.maximum(np.arange(nrun) - 1, 0)
        p_b = np.where(rank > 0, run_b[prev_run], prev_b[run_seg])
        p_c = np.where(rank > 0, run_total[prev_run], cols["count"][run_slot])
        has_prev = ~cont & (p_b != NONE)
        open_row = order[run_start]  # arrival position of each run's first event
        high = population_highs(table.population, bucket, open_row, has_prev, p_b, p_c)
        r_mean, r_var, r_n, r_thr = self._levels(
            cols, rank, cont, has_prev, run_slot, run_b, p_b, p_c, high[open_row]
        )
        thr = r_thr[run_id]
        flag = count > thr
        last = np.append(first_run[1:], nrun) - 1
        ls = run_slot[last]
        cols["bucket"][ls] = run_b[last]
        cols["count"][ls] = run_total[last]
        cols["threshold"][ls] = r_thr[last]
        cols["mean"][ls] = r_mean[last]
        cols["var"][ls] = r_var[last]
        cols["n_buckets"][ls] = r_n[last]
        table.cols.mark(seg_slot)
        spiking = np.flatnonzero(run_total > r_thr)
        if spiking.size:
            runs = Runs(
                et,
                table,
                batch,
                rows,
                order,
                ts,
                run_start,
                run_len,
                run_slot,
                run_b,
                run_total,
                base,
                r_thr,
                r_mean,
                r_var,
                high,
            )
            self._episodes(runs, spiking, alerts)
        fs = order[flag]
        return (
            rows[fs],
            count[flag] / thr[flag],
            count[flag],
            thr[flag],
            eff[flag] * self.bucket_ms,
            r_mean[run_id[flag]],
        )

    def _levels(
        self,
        cols: dict[str, npt.NDArray[Any]],
        rank: I64,
        cont: npt.NDArray[np.bool_],
        has_prev: npt.NDArray[np.bool_],
        run_slot: I64,
        run_b: I64,
        p_b: I64,
        p_c: I64,
        high: F64,
    ) -> tuple[F64, F64, I64, F64]:
        """History and threshold of every run. A key's runs depend on each other, so go level
        by level (a key's first bucket of the batch, its second, ...), all keys at once."""
        r_mean = cols["mean"][run_slot]
        r_var = cols["var"][run_slot]
        r_n = cols["n_buckets"][run_slot]
        r_thr = cols["threshold"][run_slot]
        by_rank = np.argsort(rank, kind="stable")
        bounds = np.searchsorted(rank[by_rank], np.arange(int(rank.max()) + 2))
        for level in range(bounds.size - 1):
            r = by_rank[bounds[level] : bounds[level + 1]]
            r = r[~cont[r]]
            if r.size == 0:
                continue
            src = r if level == 0 else r - 1
            m, v, k = r_mean[src], r_var[src], r_n[src]  # copies: fancy indexing
            f = has_prev[r]
            if f.any():
                fm, fv, fk = self._fold(m[f], v[f], k[f], p_c[r][f], run_b[r][f] - p_b[r][f])
                m[f], v[f], k[f] = fm, fv, fk
            r_mean[r], r_var[r], r_n[r] = m, v, k
            r_thr[r] = self._threshold(m, v, k, high[r])
        return r_mean, r_var, r_n, r_thr

    # -- state -------------------------------------------------------------------------------

    def evict(self, entity_type: str, slots: I64) -> None:
        table = self.tables[entity_type]
        table.cols.ensure(int(slots.max()) + 1 if slots.size else 0)
        table.cols.clear(slots)
        for slot in slots.tolist():
            table.episodes.pop(slot, None)
            table.saved.discard(slot)  # the eviction deletes the key's rows

    def snapshot(self, keyspace: KeySpace) -> Snapshot:
        # an open episode's extras go with its key (and partition), so they move with it
        extras = snapshot_extras(self.tables, keyspace)
        keyed = tuple(t.cols.snapshot(keyspace[et]) for et, t in self.tables.items())
        model = None
        if self._model_dirty:
            self._model_dirty = False
            state = {et: t.population.to_json() for et, t in self.tables.items()}
            model = orjson.dumps({"version": 2, "types": state})
        return Snapshot(keyed=keyed, model=model, extras=tuple(extras))

    def restore(self, snapshot: Snapshot, keyspace: KeySpace) -> None:
        restore_keyed(self.name, self.tables, snapshot, keyspace)
        if snapshot.model is not None:
            state = orjson.loads(snapshot.model)["types"]
            for et, t in self.tables.items():
                t.population.from_json(state[et])
        restore_episodes(self.name, self.tables, snapshot, keyspace, Episode, self._placeholder)
