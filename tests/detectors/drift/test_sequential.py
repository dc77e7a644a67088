"""Page-Hinkley equals river's, value for value; the two-sided CUSUM equals a naive one."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from river import drift

from detectors.drift.sequential import Cusum, PageHinkley

values = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@st.composite
def series(draw: st.DrawFn) -> np.ndarray:
    """A few series at once, with level shifts so that detections and resets happen."""
    steps = draw(st.integers(1, 300))
    cols = draw(st.integers(1, 4))
    base = np.array(draw(st.lists(values, min_size=steps * cols, max_size=steps * cols)))
    x = base.reshape(steps, cols) / 100
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, steps))
        x[at:, draw(st.integers(0, cols - 1))] += draw(st.floats(-50, 50))
    return x


@settings(max_examples=200, deadline=None)
@given(
    series(),
    st.integers(1, 40),
    st.floats(0, 1),
    st.floats(0.5, 60),
    st.sampled_from([1.0, 1 - 0.0001, 0.99, 0.9]),
    st.integers(1, 4),
)
def test_page_hinkley_matches_river_within_1e9(
    x: np.ndarray, min_instances: int, delta: float, threshold: float, alpha: float, blocks: int
) -> None:
    ours = PageHinkley(x.shape[1], min_instances, delta, threshold, alpha)
    theirs = [
        drift.PageHinkley(min_instances, delta, threshold, alpha, mode="both")
        for _ in range(x.shape[1])
    ]
    got = np.concatenate([ours.update(part) for part in np.array_split(x, blocks)])
    for t in range(x.shape[0]):
        for j, ph in enumerate(theirs):
            ph.update(float(x[t, j]))
            assert got[t, j] == ph.drift_detected, (t, j)
    for j, ph in enumerate(theirs):  # the final state, statistic by statistic
        assert ours.sum_increase[j] == pytest.approx(ph._sum_increase, abs=1e-9)
        assert ours.sum_decrease[j] == pytest.approx(ph._sum_decrease, abs=1e-9)
        assert ours.mean[j] == pytest.approx(ph._x_mean.get(), abs=1e-9)
        assert ours.min_increase[j] == pytest.approx(ph._min_increase, abs=1e-9)
        assert ours.max_decrease[j] == pytest.approx(ph._max_decrease, abs=1e-9)


def test_page_hinkley_detects_the_shift_river_detects() -> None:
    rng = np.random.default_rng(12345)
    x = np.r_[rng.integers(0, 2, 1000), rng.integers(4, 8, 1000)].astype(float)
    fired = np.flatnonzero(PageHinkley(1).update(x[:, None])[:, 0])
    ph, river_fired = drift.PageHinkley(), []
    for i, v in enumerate(x.tolist()):
        ph.update(v)
        if ph.drift_detected:
            river_fired.append(i)
    assert fired.tolist() == river_fired and fired[0] > 1000


class NaiveCusum:
    """One value at a time, one series: the textbook tabular CUSUM, restarting after a signal."""

    def __init__(self, k: float, h: float) -> None:
        self.k, self.h, self.hi, self.lo = k, h, 0.0, 0.0

    def step(self, x: float) -> bool:
        self.hi = max(0.0, self.hi + x - self.k)
        self.lo = max(0.0, self.lo - x - self.k)
        if self.hi > self.h or self.lo > self.h:
            self.hi = self.lo = 0.0
            return True
        return False


@settings(max_examples=200, deadline=None)
@given(series(), st.floats(0, 3), st.floats(0.1, 20), st.integers(1, 4))
def test_cusum_matches_a_naive_per_value_reference(
    x: np.ndarray, k: float, h: float, blocks: int
) -> None:
    ks = k * (1 + np.arange(x.shape[1]))  # a different allowance per series
    ours = Cusum(x.shape[1], k=ks, h=h)
    got = np.concatenate([ours.update(part) for part in np.array_split(x, blocks)])
    naive = [NaiveCusum(float(kj), h) for kj in ks]
    for t in range(x.shape[0]):
        for j, ref in enumerate(naive):
            assert got[t, j] == ref.step(float(x[t, j])), (t, j)
    for j, ref in enumerate(naive):
        assert math.isclose(ours.upper[j], ref.hi, abs_tol=1e-9)
        assert math.isclose(ours.lower[j], ref.lo, abs_tol=1e-9)
