"""The compiled geometry kernels against the numpy expressions they replace, on arbitrary data
(the per-caller pass is checked against the naive reference in
``tests/detectors/extraction/test_query_pattern.py``)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from detectors.query import kernels
from detectors.query.sketch import SW_A, SW_MU, SW_SIGMA, shapiro_z

finite = st.floats(-1e6, 1e6, allow_nan=False, width=64)
values = st.one_of(finite, st.just(np.nan), st.just(np.inf), st.just(-np.inf))


@settings(max_examples=200, deadline=None)
@given(
    knots=st.lists(st.lists(finite, min_size=1, max_size=20, unique=True), min_size=1, max_size=4),
    rows=st.integers(1, 30),
    data=st.data(),
)
def test_kernels_normal_scores_equal_numpy_interp(
    knots: list[list[float]], rows: int, data: st.DataObject
) -> None:
    xp = [np.sort(np.array(k)) for k in knots]
    fp = [np.sort(data.draw(hnp.arrays(np.float64, k.size, elements=finite))) for k in xp]
    x = data.draw(hnp.arrays(np.float64, (rows, len(xp)), elements=values))
    # a few queries exactly on the knots
    x[0, :] = [k[0] for k in xp]
    out = np.empty(x.shape)
    width = [1 << int(np.ceil(np.log2(k.size))) for k in xp]  # padded as build_sketch pads
    pads = [np.full(w - k.size, np.inf) for k, w in zip(xp, width, strict=True)]
    knots = np.concatenate([v for k, p in zip(xp, pads, strict=True) for v in (k, p)])
    knot_z = np.concatenate([v for f, p in zip(fp, pads, strict=True) for v in (f, p)])
    start, size = np.cumsum([0, *width]), np.array([k.size for k in xp])
    kernels.normal_scores(x, knots, knot_z, start, size, out)
    for j in range(len(xp)):
        want = np.interp(x[:, j], xp[j], fp[j])
        want[np.isnan(x[:, j])] = 0.0
        np.testing.assert_array_equal(out[:, j], want)


@settings(max_examples=200, deadline=None)
@given(
    z=hnp.arrays(np.float64, st.tuples(st.integers(1, 20), st.just(5)), elements=finite),
    anchors=hnp.arrays(np.float64, st.tuples(st.integers(1, 10), st.just(5)), elements=finite),
    radius=st.floats(0, 3e6),
)
def test_kernels_beyond_equals_nearest_anchor_distance(
    z: np.ndarray, anchors: np.ndarray, radius: float
) -> None:
    out = np.empty(z.shape[0], bool)
    kernels.beyond(z, anchors, radius**2, out)
    d2 = ((z[:, None, :] - anchors[None, :, :]) ** 2).sum(axis=2).min(axis=1)
    clear = np.abs(d2 - radius**2) > 1e-9 * max(1.0, radius**2)  # ties: rounding may differ
    np.testing.assert_array_equal(out[clear], (d2 > radius**2)[clear])


@settings(max_examples=100, deadline=None)
@given(
    z=hnp.arrays(np.float64, st.tuples(st.integers(1, 20), st.just(6)), elements=finite),
    seed=st.integers(0, 1000),
)
def test_kernels_project_equals_rounded_product(z: np.ndarray, seed: int) -> None:
    proj = np.random.default_rng(seed).standard_normal((6, 8))
    out = np.empty((z.shape[0], 8), np.int8)
    kernels.project(z, proj, 16.0, out)
    y = z @ proj * 16.0
    want = np.clip(np.rint(y), -127, 127)
    clear = np.abs(y - np.floor(y) - 0.5) > 1e-6 * np.maximum(1.0, np.abs(y))  # not a .5 tie
    np.testing.assert_array_equal(out[clear], want[clear])


@settings(max_examples=200, deadline=None)
@given(d=hnp.arrays(np.uint8, 64))
def test_kernels_shapiro_equals_the_vectorised_test(d: np.ndarray) -> None:
    got = kernels._shapiro(d, SW_A, SW_MU, SW_SIGMA)
    want = float(shapiro_z(d[None, :])[0])
    assert got == want or abs(got - want) <= 1e-12 * abs(want)
