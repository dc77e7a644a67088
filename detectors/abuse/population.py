"""Population histogram of ``abuse.rate_spike``: a decayed, log-spaced histogram of completed
bucket counts of all keys of one entity type; its p99 is the yardstick for keys without history."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors.base import F64, I64

NONE = int(np.iinfo(np.int64).min)
WEIGHT_ONE = 1 << 24  # population weights are integers, so the p99 is exact and order-free
# Lower edges of the population histogram's bins: quarter octaves of request counts, as integers.
EDGES = np.array(sorted({math.ceil(2 ** (m / 4)) for m in range(4 * 40 + 1)}), np.int64)
QUANTILE = (99, 100)


def population_weights(history_buckets: int) -> list[int]:
    """Integer decay weights of completed bucket counts by age in buckets (age < ring length)."""
    beta = 1.0 - 2.0 / (history_buckets + 1)
    length = max(2, min(4096, math.ceil(math.log(1e-4) / math.log(beta)) if beta > 0 else 2))
    return [int(WEIGHT_ONE * beta**age) for age in range(length)]


class Population:
    """Decayed histogram of completed bucket counts of one entity type, as a ring of integer
    counts per bucket index; its p99 is the yardstick for keys without a history."""

    def __init__(self, weights: list[int], min_weight: int, warm_buckets: int) -> None:
        self.weights = np.array(weights, np.int64)
        self.length = len(weights)
        self.min_weight = min_weight
        self.warm_buckets = warm_buckets
        self.first = NONE  # the first bucket this population saw
        self.clock = NONE
        self.high = math.inf
        self.ring = np.zeros((self.length, len(EDGES) - 1), np.int64)
        self.frozen = False

    def freeze(self, high: float) -> None:
        """Hold the p99 at ``high`` from now on: nothing learnt, nothing restored over it."""
        self.high = high
        self.frozen = True

    def add(self, buckets: I64, counts: I64) -> None:
        if self.frozen:
            return
        keep = buckets > self.clock - self.length
        if not keep.any():
            return
        bins = np.minimum(np.searchsorted(EDGES, counts[keep], "right") - 1, len(EDGES) - 2)
        np.add.at(self.ring, (buckets[keep] % self.length, bins), 1)

    def advance_to(self, clock: int) -> None:
        if self.frozen:
            self.clock = clock
            return
        if self.clock != NONE:
            if clock - self.clock >= self.length:
                self.ring[:] = 0
            else:
                self.ring[np.arange(self.clock + 1, clock + 1) % self.length] = 0
        self.clock = clock
        if self.first == NONE:
            self.first = clock
        if clock - self.first < self.warm_buckets:
            # the first buckets after a start are partial or few: their p99 is no yardstick
            self.high = math.inf
            return
        ages = (clock - np.arange(self.length)) % self.length
        hist = (self.weights[ages] @ self.ring).tolist()
        total = sum(hist)
        if total < self.min_weight:
            self.high = math.inf
            return
        cum = 0
        for i, h in enumerate(hist):  # Python ints: exact, no overflow
            cum += h
            if cum * QUANTILE[1] >= total * QUANTILE[0]:
                self.high = float(EDGES[i + 1] - 1)
                return

    def to_json(self) -> dict[str, Any]:
        j, b = np.nonzero(self.ring)
        return {
            "clock": None if self.clock == NONE else self.clock,
            "first": None if self.first == NONE else self.first,
            "high": None if math.isinf(self.high) else self.high,
            "ring": [j.tolist(), b.tolist(), self.ring[j, b].tolist()],
        }

    def from_json(self, state: dict[str, Any]) -> None:
        if self.frozen:
            return
        self.clock = NONE if state["clock"] is None else int(state["clock"])
        self.first = NONE if state.get("first") is None else int(state["first"])
        self.high = math.inf if state["high"] is None else float(state["high"])
        self.ring[:] = 0
        j, b, c = state["ring"]
        self.ring[np.asarray(j, np.int64), np.asarray(b, np.int64)] = c


def population_highs(
    pop: Population,
    bucket: I64,
    open_row: I64,
    has_prev: npt.NDArray[np.bool_],
    p_b: I64,
    p_c: I64,
) -> F64:
    """The population high per row (arrival order). The clock is the running maximum of
    buckets; at each step of it the high is recomputed from the buckets completed by
    earlier events, so it does not depend on how the stream is cut into batches."""
    n = bucket.size
    clock = np.maximum.accumulate(bucket)
    if pop.clock != NONE:
        clock = np.maximum(clock, pop.clock)
    before = np.empty(n, np.int64)
    before[0] = pop.clock
    before[1:] = clock[:-1]
    steps = np.flatnonzero(clock > before)
    folds = np.flatnonzero(has_prev)
    f_order = np.argsort(open_row[folds], kind="stable")
    f_row, f_b, f_c = (x[folds][f_order] for x in (open_row, p_b, p_c))
    cut = np.searchsorted(f_row, steps)
    highs = np.empty(steps.size + 1)
    highs[0] = pop.high
    lo = 0
    for i, (row, hi) in enumerate(zip(steps.tolist(), cut.tolist(), strict=True)):
        pop.add(f_b[lo:hi], f_c[lo:hi])
        lo = hi
        pop.advance_to(int(clock[row]))
        highs[i + 1] = pop.high
    pop.add(f_b[lo:], f_c[lo:])
    return highs[np.searchsorted(steps, np.arange(n), "right")]
