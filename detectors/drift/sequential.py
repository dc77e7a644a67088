"""Sequential change detectors on series of window statistics, vectorised across series.

Both keep one state column per series (a feature's per-hop statistic, say) and take a block
``(steps, series)`` at a time: one numpy step per time step over all series, never one Python
call per value. They are the online complement to the windowed tests of
:mod:`detectors.drift.features.windows`: a small persistent shift accumulates here hop after hop.

- :class:`PageHinkley` is river's ``drift.PageHinkley`` (0.26) column by column, the same
  floating-point operations in the same order (a property test holds it to 1e-9): a running mean,
  faded cumulative deviations with tolerance ``delta``, a detection when either one leaves its
  extreme by more than ``threshold`` after ``min_instances`` values, and a reset of that series
  at its next value.
- :class:`Cusum` is the two-sided tabular CUSUM (Page 1954) on values already centred on their
  in-control mean: ``S⁺ = max(0, S⁺ + x − k)``, ``S⁻ = max(0, S⁻ − x − k)``, a detection when
  either exceeds ``h``, after which both restart from 0.

>>> ph = PageHinkley(1, min_instances=5, threshold=3.0)
>>> ph.update(np.r_[np.zeros(20), np.full(10, 2.0)][:, None])[:, 0].nonzero()[0].tolist()
[21]
>>> cs = Cusum(2, k=0.5, h=4.0)
>>> cs.update(np.array([[1.5, -1.5]] * 5)).nonzero()
(array([4, 4]), array([0, 1]))
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
B8 = npt.NDArray[np.bool_]


class PageHinkley:
    """Two-sided ("both") Page-Hinkley per series, river's arithmetic (module doc)."""

    def __init__(
        self,
        series: int,
        min_instances: int = 30,
        delta: float = 0.005,
        threshold: float = 50.0,
        alpha: float = 1 - 0.0001,
    ) -> None:
        self.series = series
        self.min_instances = min_instances
        self.delta = delta
        self.threshold = threshold
        self.alpha = alpha
        self.reset()

    def reset(self) -> None:
        s = self.series
        self.n = np.zeros(s)
        self.mean = np.zeros(s)
        self.sum_increase = np.zeros(s)
        self.sum_decrease = np.zeros(s)
        self.min_increase = np.full(s, np.inf)
        self.max_decrease = np.full(s, -1.0)
        self.detected = np.zeros(s, bool)

    def _restart(self, rows: B8) -> None:
        self.n[rows] = 0.0
        self.mean[rows] = 0.0
        self.sum_increase[rows] = 0.0
        self.sum_decrease[rows] = 0.0
        self.min_increase[rows] = np.inf
        self.max_decrease[rows] = -1.0
        self.detected[rows] = False

    def update(self, x: F64) -> B8:
        """Feed ``x`` (steps, series); whether each series detected a change at each step."""
        x = np.asarray(x, np.float64)
        out = np.zeros(x.shape, bool)
        for t in range(x.shape[0]):
            if self.detected.any():
                self._restart(self.detected.copy())
            v = x[t]
            self.n += 1.0
            self.mean += (1.0 / self.n) * (v - self.mean)
            dev = v - self.mean
            self.sum_increase = self.alpha * self.sum_increase + dev - self.delta
            self.sum_decrease = self.alpha * self.sum_decrease + dev + self.delta
            self.min_increase = np.minimum(self.min_increase, self.sum_increase)
            self.max_decrease = np.maximum(self.max_decrease, self.sum_decrease)
            ready = self.n >= self.min_instances
            up = self.sum_increase - self.min_increase
            down = self.max_decrease - self.sum_decrease
            fired = (up > self.threshold) | (down > self.threshold)
            self.detected = np.where(ready, fired, self.detected)
            out[t] = self.detected
        return out


class Cusum:
    """Two-sided CUSUM per series with allowance ``k`` and decision interval ``h`` (module doc);
    ``k`` and ``h`` are scalars or one value per series."""

    def __init__(self, series: int, k: F64 | float = 0.5, h: F64 | float = 5.0) -> None:
        self.series = series
        self.k = np.broadcast_to(np.asarray(k, np.float64), (series,)).copy()
        self.h = np.broadcast_to(np.asarray(h, np.float64), (series,)).copy()
        self.reset()

    def reset(self) -> None:
        self.upper = np.zeros(self.series)
        self.lower = np.zeros(self.series)

    def update(self, x: F64) -> B8:
        """Feed ``x`` (steps, series); whether each series detected a change at each step."""
        x = np.asarray(x, np.float64)
        out = np.zeros(x.shape, bool)
        for t in range(x.shape[0]):
            self.upper = np.maximum(0.0, self.upper + x[t] - self.k)
            self.lower = np.maximum(0.0, self.lower - x[t] - self.k)
            fired = (self.upper > self.h) | (self.lower > self.h)
            self.upper[fired] = 0.0
            self.lower[fired] = 0.0
            out[t] = fired
        return out
