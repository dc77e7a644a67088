"""Two-sample drift statistics on fixed-bin histograms, vectorised over anything but the bins.

Every function takes histograms with the bins on the last axis: ``reference`` (..., bins) and
``current`` (..., bins), broadcast against each other, so one call computes a statistic for every
feature of every window at once. Bins are the reference's quantile bins
(:mod:`detectors.drift.bins`); a padded bin has zero counts on both sides and adds nothing.

Null distributions are the tests' asymptotic ones, two-sample (the reference is a sample too):

- Kolmogorov–Smirnov: the Kolmogorov limit at ``(√n_eff + 0.12 + 0.11/√n_eff)·D`` (Stephens'
  finite-sample correction), ``n_eff = n·m/(n+m)``. On bins, D is the largest gap between the
  two cumulative histograms at the bin edges, which is what ``scipy.stats.ks_2samp`` returns for
  the binned values; it is conservative for continuous data.
- chi-square homogeneity on the 2 × bins table, ``bins_used − 1`` degrees of freedom.
- location: the mean of the reference's normal scores (van der Waerden) in reference-sd units,
  ``d``, with standard error ``√(1/n + 1/m)``.

An effect-size floor turns each into a test of "the change is larger than the floor" rather than
"there is any change": the location test's null is ``|d| ≤ floor`` (an interval null, so a
seasonal wobble below the floor is not significant however many events see it), KS and JS
subtract or gate on their floor. Benjamini–Hochberg then corrects across features.

>>> ref = np.array([25, 25, 25, 25]); cur = np.array([10, 20, 30, 40])
>>> round(float(ks_stat(ref, cur)), 6), round(float(js_distance(ref, cur)), 4)
(0.2, 0.2005)
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy import special

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B8 = npt.NDArray[np.bool_]
Counts = npt.NDArray[np.int64] | npt.NDArray[np.float64]


PSI_EPSILON = 1e-4  # floor on bin proportions in the PSI


def psi_rows(reference_counts: Counts, current_counts: Counts, epsilon: float = PSI_EPSILON) -> F64:
    """PSI of each histogram in ``current_counts`` (..., channels, bins) against the matching
    row of ``reference_counts`` (channels, bins); NaN for a histogram without events."""
    r = np.maximum(reference_counts / reference_counts.sum(axis=-1, keepdims=True), epsilon)
    total = current_counts.sum(axis=-1, keepdims=True)
    c = np.maximum(current_counts / np.maximum(total, 1), epsilon)
    value = np.sum((c - r) * np.log(c / r), axis=-1)
    out: F64 = np.where(total[..., 0] > 0, value, np.nan)
    return out


def _props(counts: Counts) -> F64:
    total = np.sum(counts, axis=-1, keepdims=True, dtype=np.float64)
    return np.asarray(counts, np.float64) / np.maximum(total, 1.0)


def ks_stat(reference: Counts, current: Counts) -> F64:
    """Largest gap between the cumulative proportions (two-sample KS on binned values)."""
    gap = np.cumsum(_props(current) - _props(reference), axis=-1)
    out: F64 = np.max(np.abs(gap), axis=-1)
    return out


def ks_stat_cdf(reference_cdf: F64, current: Counts) -> F64:
    """:func:`ks_stat` with the reference's cumulative proportions computed once."""
    out: F64 = np.max(np.abs(np.cumsum(_props(current), axis=-1) - reference_cdf), axis=-1)
    return out


def ks_pvalue(d: F64, n: F64, m: F64, floor: float = 0.0) -> F64:
    """Asymptotic two-sample KS p-value of ``d - floor`` (Stephens' correction)."""
    n_eff = np.asarray(n, np.float64) * m / np.maximum(n + m, 1.0)
    root = np.sqrt(n_eff)
    y = (root + 0.12 + 0.11 / np.maximum(root, 1e-9)) * np.maximum(d - floor, 0.0)
    out: F64 = np.where(n_eff > 0, special.kolmogorov(y), 1.0)
    return out


def js_distance(reference: Counts, current: Counts) -> F64:
    """Jensen–Shannon distance, base 2 (as ``scipy.spatial.distance.jensenshannon(p, q, 2)``)."""
    p, q = _props(reference), _props(current)
    mid = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kp = np.where(p > 0, p * np.log2(p / np.where(mid > 0, mid, 1.0)), 0.0)
        kq = np.where(q > 0, q * np.log2(q / np.where(mid > 0, mid, 1.0)), 0.0)
    div = np.maximum((kp.sum(axis=-1) + kq.sum(axis=-1)) / 2, 0.0)
    out: F64 = np.sqrt(div)
    return out


def wasserstein(reference: Counts, current: Counts, centers: F64, scale: F64 | float = 1.0) -> F64:
    """Earth mover's distance between the histograms with all mass at ``centers`` (..., bins,
    increasing), divided by ``scale`` (the reference sd gives it in reference-sd units)."""
    gap = np.abs(np.cumsum(_props(current) - _props(reference), axis=-1))[..., :-1]
    width = np.diff(centers, axis=-1)
    out: F64 = np.sum(gap * np.where(np.isfinite(width), width, 0.0), axis=-1) / scale
    return out


def chi2_homogeneity(reference: Counts, current: Counts) -> tuple[F64, F64]:
    """Chi-square statistic of the 2 × bins table and its degrees of freedom (bins used − 1),
    as ``scipy.stats.chi2_contingency(..., correction=False)`` on the bins either side uses."""
    r = np.asarray(reference, np.float64)
    c = np.asarray(current, np.float64)
    col = r + c
    nr, nc = r.sum(axis=-1, keepdims=True), c.sum(axis=-1, keepdims=True)
    total = np.maximum(nr + nc, 1.0)
    er, ec = col * nr / total, col * nc / total
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(er > 0, (r - er) ** 2 / er, 0.0)
        terms += np.where(ec > 0, (c - ec) ** 2 / ec, 0.0)
    dof = np.maximum((col > 0).sum(axis=-1) - 1, 0).astype(np.float64)
    stat: F64 = terms.sum(axis=-1)
    return stat, dof


def chi2_pvalue(stat: F64, dof: F64) -> F64:
    out: F64 = np.where(dof > 0, special.chdtrc(np.maximum(dof, 1.0), stat), 1.0)
    return out


def location_d(current: Counts, scores: F64, ref_mean: F64, ref_sd: F64) -> F64:
    """Shift of the current mean normal score from the reference's, in reference-sd units."""
    mean = np.sum(_props(current) * scores, axis=-1)
    out: F64 = (mean - ref_mean) / np.where(ref_sd > 0, ref_sd, np.inf)
    return out


def location_pvalue(d: F64, n: F64, m: F64, floor: float) -> F64:
    """p-value of ``|d|`` under the interval null ``|shift| <= floor``: the probability, at a
    true shift of exactly ``floor``, of a ``|d|`` at least this large."""
    se = np.sqrt(1.0 / np.maximum(n, 1.0) + 1.0 / m)
    a = np.abs(d)
    out: F64 = special.ndtr(-(a - floor) / se) + special.ndtr(-(a + floor) / se)
    return np.where(n > 0, out, 1.0)


def saddlepoint_pvalue(
    d: F64, n: F64, m: F64, floor: float, scores: F64, probs: F64, mean: F64, sd: F64
) -> F64:
    """:func:`location_pvalue` without the normal approximation: the tail of a mean of ``n``
    draws from the reference's own score distribution (``scores``/``probs``, one row per
    entry) by the Lugannani–Rice saddlepoint formula, with the reference's sampling error
    folded in as in the two-sample normal case. A sparse count feature (most events 0) has a
    far heavier right tail than the normal's, which would otherwise raise alarms at random.
    Entries are 1-d; each row of ``scores``/``probs`` is its column's bins."""
    live = probs > 0
    lo = np.where(live, scores, np.inf).min(axis=1)
    hi = np.where(live, scores, -np.inf).max(axis=1)
    ordered = np.sort(np.where(live, scores, np.inf), axis=1)
    with np.errstate(invalid="ignore"):  # inf - inf past the live scores
        gaps = np.diff(ordered, axis=1)
    gap = np.where(np.isfinite(gaps) & (gaps > 0), gaps, np.inf).min(axis=1)
    step = np.where(np.isfinite(gap), gap / 2 / n, 0.0)  # continuity correction on a lattice
    excess = np.maximum(np.abs(d) * sd - floor * sd - step, 0.0)
    x = mean + np.sign(d) * excess  # the boundary of the null, moved half a step back
    pad = 1e-6 * np.maximum(hi - lo, 1e-12)
    x = np.clip(x, lo + pad, hi - pad)
    t = _newton((x - mean) / np.maximum(sd * sd, 1e-12), x, scores, probs)
    k0, _, k2 = _cumulants(t, scores, probs)
    w = np.sign(t) * np.sqrt(np.maximum(2.0 * n * (t * x - k0), 0.0))
    u = t * np.sqrt(n * np.maximum(k2, 1e-300))
    shrink = np.sqrt((1.0 / n) / (1.0 / n + 1.0 / m))
    w, u = w * shrink, u * shrink
    with np.errstate(divide="ignore", invalid="ignore"):
        upper = special.ndtr(-w) + np.exp(-w * w / 2) / np.sqrt(2 * np.pi) * (1 / u - 1 / w)
    tail = np.where(d >= 0, upper, 1.0 - upper)
    tail = np.where(np.abs(w) < 1e-6, 0.5, tail)
    out: F64 = np.clip(np.nan_to_num(tail, nan=1.0), 0.0, 1.0)
    return out


def _newton(t: F64, x: F64, scores: F64, probs: F64, steps: int = 60) -> F64:
    """``t`` after ``steps`` damped Newton steps towards ``K'(t) = x``, row by row. A row whose
    steps reach a fixed point or a 2-cycle (the last bit flipping back and forth) stops there,
    with the value the remaining steps would leave: the same result, in a few steps."""
    out, rows = t.copy(), np.arange(t.size)
    before = np.full(t.size, np.nan)  # each row's value one step back
    for i in range(steps):
        _, k1, k2 = _cumulants(t, scores[rows], probs[rows])
        step = (k1 - x[rows]) / np.maximum(k2, 1e-300)
        after = np.clip(t - np.clip(step, -5.0, 5.0), -500.0, 500.0)
        fixed, cycle = after == t, after == before
        if (steps - i - 1) % 2:  # an odd number of steps left ends a 2-cycle on ``t``
            out[rows[cycle]] = t[cycle]
        else:
            out[rows[cycle]] = after[cycle]
        out[rows[fixed]] = after[fixed]
        going = ~(fixed | cycle)
        rows, before, t = rows[going], t[going], after[going]
        if rows.size == 0:
            break
    out[rows] = t
    return out


def _cumulants(t: F64, scores: F64, probs: F64) -> tuple[F64, F64, F64]:
    """K(t), K'(t), K''(t) of the score distribution of each row (stable log-sum-exp)."""
    a = np.where(probs > 0, t[:, None] * scores, -np.inf)
    top = a.max(axis=1)
    e = probs * np.exp(a - top[:, None])
    m0 = e.sum(axis=1)
    m1 = (e * scores).sum(axis=1) / m0
    m2 = (e * scores * scores).sum(axis=1) / m0 - m1 * m1
    k0: F64 = np.log(m0) + top
    return k0, m1, np.maximum(m2, 0.0)


def bh_reject(p: F64, q: float) -> B8:
    """Benjamini–Hochberg at level ``q`` along the last axis: which hypotheses are rejected.

    >>> bh_reject(np.array([0.001, 0.2, 0.013, 0.9]), 0.05).tolist()
    [True, False, True, False]
    """
    m = p.shape[-1]
    if m == 0:
        return np.zeros(p.shape, bool)
    if p.ndim == 2:  # only rows with a p-value <= q can reject anything: sort just those
        rows = np.flatnonzero(p.min(axis=1) <= q)
        out2: B8 = np.zeros(p.shape, bool)
        if rows.size:
            out2[rows] = _bh(p[rows], q)
        return out2
    return _bh(p, q)


def _bh(p: F64, q: float) -> B8:
    m = p.shape[-1]
    order = np.argsort(p, axis=-1, kind="stable")
    ranked = np.take_along_axis(p, order, axis=-1)
    ok = ranked <= q * np.arange(1, m + 1) / m
    k = np.where(ok.any(axis=-1), m - np.argmax(ok[..., ::-1], axis=-1), 0)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(m), p.shape), axis=-1)
    out: B8 = rank < k[..., None]
    return out


def normal_quantile(p: float) -> float:
    """Standard normal quantile (``z`` with ``P(Z <= z) = p``)."""
    return float(special.ndtri(p))


def cusum_threshold(k: float, arl: float) -> float:
    """Decision interval ``h`` of a one-sided CUSUM on N(0, 1) increments with allowance ``k``
    for an in-control average run length ``arl`` (Siegmund's approximation,
    ``ARL ≈ (exp(2k·b) − 2k·b − 1) / (2k²)`` with ``b = h + 1.166``), solved by bisection.

    >>> round(cusum_threshold(0.5, 930.0), 1)  # the textbook h = 5 for k = 0.5
    5.0
    """

    def run_length(h: float) -> float:
        b = 2 * k * (h + 1.166)
        return (math.exp(b) - b - 1) / (2 * k * k)

    lo, hi = 0.0, 1.0
    while run_length(hi) < arl:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if run_length(mid) < arl else (lo, mid)
    return hi


def permutation_check(
    codes: npt.NDArray[np.uint8],
    bins: int,
    n_window: int,
    n_perm: int,
    level: float,
    seed: int,
) -> F64:
    """Per column, how often a random split of the reference rows ``codes`` (rows, columns)
    into a window of ``n_window`` and the rest exceeds the asymptotic KS critical value at
    ``level``, divided by ``level``: about 1 where the asymptotic null holds, below 1 where
    binning or ties make it conservative. Deterministic in ``seed``."""
    rows, cols = codes.shape
    if rows <= n_window or cols == 0:
        return np.ones(cols)
    rng = np.random.default_rng(seed)
    offsets = np.arange(cols) * bins
    total = np.zeros((cols, bins), np.int64)
    np.add.at(total, (np.arange(cols)[None, :].repeat(rows, 0), codes), 1)
    hits = np.zeros(cols)
    for _ in range(n_perm):
        take = rng.choice(rows, n_window, replace=False)
        flat = (codes[take].astype(np.int64) + offsets).ravel()
        window = np.bincount(flat, minlength=cols * bins).reshape(cols, bins)
        rest = total - window
        d = ks_stat(rest, window)
        p = ks_pvalue(d, np.full(cols, float(n_window)), np.full(cols, float(rows - n_window)))
        hits += p <= level
    out: F64 = hits / n_perm / level
    return out
