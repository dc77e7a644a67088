"""Per-model query geometry for ``extraction.query_pattern``, built once from a model's reference.

A query (one row of a model's feature matrix, numeric features, vector entries and category
codes on the model's stable index) is turned into:

- **normal scores** ``z``: each feature through the reference's empirical CDF (mid-ranks, so
  ties and discrete features behave) and the standard normal quantile. Every feature then has
  the same scale whatever its units or tails; a value beyond the reference's range saturates at
  about +-3.5. Missing values score 0 (the median).
- a **quantised projection** ``q``: ``z`` through a fixed Gaussian random projection to
  ``PROJ_DIM`` (8) dimensions, scaled and rounded to int8 (Johnson-Lindenstrauss: distances
  between far-apart queries survive; two distinct natural queries land within a tenth of their
  usual distance with probability ~1e-7). 8 bytes per stored query instead of 256 for a raw
  64-dim float32 vector.
- an **exact hash** (32 bits of the raw values) that tells a byte-identical repeat (a retry, a
  re-scored record, a test fixture) from a near-duplicate (a perturbation too small to survive
  the quantisation).
- a **lane hash** (8 lanes of 4 bits, feature ``j`` in lane ``j % 8``): two queries that
  differ in ``k`` raw values differ in at most ``k`` lanes, so a lattice over a few features
  of one base record keeps most lanes of the base (models with at least 8 features).
- an **off-manifold distance**: Euclidean distance in ``z`` to the nearest of up to 256 anchor
  rows of the reference; a query is off-manifold when it is farther than the ``1 - OFF_RATE``
  quantile of the same distance for the reference rows that are not anchors (null rate 1%).

Thresholds are calibrated on the reference itself, which is the model's benign traffic by
construction: the near-duplicate radius is a quarter of the 1st percentile of a natural query's
distance to the nearest of 32 other natural queries; the PRADA threshold is the null
distribution of the Shapiro-Wilk statistic for streams of natural queries, plus a margin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import special, stats

from detectors.base import DetectorInput
from detectors.models.reference import Reference
from detectors.query import kernels

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
I8 = npt.NDArray[np.int8]
U32 = npt.NDArray[np.uint32]

PROJ_DIM = 8
Q_SCALE = 16.0  # int8 units per standard deviation of a projected coordinate
RING = 32  # recent queries kept per key
DISTS = 64  # minimum distances kept per key for the normality test
OFF_RATE = 0.01
MIN_REFERENCE_ROWS = 64
_ANCHORS = 256
_SEED = 0x51EC
_KNOTS = 129  # knots of each feature's normal-score map


def shapiro_coefficients(n: int) -> F64:
    """Royston's (1992) approximation of the Shapiro-Wilk coefficients for samples of ``n``
    (the algorithm behind ``scipy.stats.shapiro``, AS R94), ascending order."""
    m = special.ndtri((np.arange(1, n + 1) - 0.375) / (n + 0.25))
    u = 1.0 / np.sqrt(n)
    c = m / np.sqrt(m @ m)
    an = c[-1] + np.polyval([-2.706056, 4.434685, -2.071190, -0.147981, 0.221157, 0.0], u)
    an1 = c[-2] + np.polyval([-3.582633, 5.682633, -1.752461, -0.293762, 0.042981, 0.0], u)
    phi = (m @ m - 2 * m[-1] ** 2 - 2 * m[-2] ** 2) / (1 - 2 * an**2 - 2 * an1**2)
    a = m / np.sqrt(phi)
    a[-1], a[-2], a[0], a[1] = an, an1, -an, -an1
    out: F64 = a
    return out


SW_A = shapiro_coefficients(DISTS)
_LN = float(np.log(DISTS))  # Royston's normalisation of ln(1 - W) for samples of DISTS
SW_MU = 0.0038915 * _LN**3 - 0.083751 * _LN**2 - 0.31082 * _LN - 1.5861
SW_SIGMA = float(np.exp(0.0030302 * _LN**2 - 0.082676 * _LN - 0.4803))


def shapiro_z(x: npt.NDArray[Any]) -> F64:
    """Shapiro-Wilk W of every row of ``x`` (rows of ``DISTS`` values), as Royston's normal
    score of ``ln(1 - W)``: large means far from normal. A constant row scores +inf.

    >>> rng = np.random.default_rng(0)
    >>> z = shapiro_z(np.stack([rng.normal(size=64), rng.exponential(size=64) ** 3]))
    >>> bool(z[0] < 2 < z[1])
    True
    """
    s = np.sort(np.asarray(x, np.float64), axis=1)
    centred = s - s.mean(axis=1, keepdims=True)
    ss = (centred * centred).sum(axis=1)
    num = (s * SW_A).sum(axis=1) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(ss > 0, num / ss, 0.0)
    with np.errstate(divide="ignore"):
        out: F64 = (np.log(np.maximum(1.0 - np.minimum(w, 1.0), 0.0)) - SW_MU) / SW_SIGMA
    return np.where(ss > 0, out, np.inf)


def binomial_thresholds(n_max: int, rate: float, alpha: float, floor: float, k_min: int) -> I64:
    """Smallest count that is both improbable for ``n`` queries at the null ``rate`` (upper
    tail below ``alpha``) and at least ``floor * n`` and ``k_min``; index ``n`` (0..n_max)."""
    n = np.arange(n_max + 1)
    tail = stats.binom.isf(alpha, n, rate) + 1
    thr = np.maximum(np.maximum(tail, np.ceil(floor * n)), k_min)
    out: I64 = np.asarray(thr, np.int64)
    return out


def exact_hash(rows: F64) -> U32:
    """32-bit hash of each row's raw values (NaN and -0.0 normalised)."""
    x = np.where(np.isnan(rows), np.inf, rows) + 0.0
    bits = np.ascontiguousarray(x, np.float64).view(np.uint64)
    mult = (np.arange(bits.shape[1], dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | 1
    h = np.bitwise_xor.reduce((bits ^ (bits >> np.uint64(29))) * mult, axis=1)
    h = h ^ np.uint64(bits.shape[1])
    h = (h ^ (h >> np.uint64(31))) * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(32))
    out: U32 = (h & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return out


def lane_hash(rows: F64) -> U32:
    """Lane hash of each row's raw values (:func:`detectors.query.kernels.lane_hashes`); models with
    fewer features than lanes get ``NO_LANES`` (a lattice over a few of them fixes nothing)."""
    out: U32 = np.full(rows.shape[0], kernels.NO_LANES, np.uint32)
    if rows.shape[1] >= kernels.LANES:
        x = np.where(np.isnan(rows), np.inf, rows) + 0.0
        kernels.lane_hashes(np.ascontiguousarray(x, np.float64).view(np.uint64), out)
    return out


@dataclass(frozen=True, eq=False)
class ModelSketch:
    """Normal-score maps, projection, anchors and null calibration of one model version."""

    feature_names: tuple[str, ...]
    knots: F64  # per feature, its distinct reference values ascending, padded with +inf to
    knot_z: F64  # a power of two, one feature after the other; and their normal scores
    knot_start: I64  # feature j's (padded) knots are knots[knot_start[j]:knot_start[j + 1]]
    knot_size: I64  # and the first knot_size[j] of them are real
    projection: F64  # (features, PROJ_DIM)
    anchors: F64  # (a, features) normal scores of anchor rows
    anchor_sq: F64
    off_threshold: float  # distance beyond which a query is off-manifold
    near_radius: float  # in int8 units of the projection
    prada_z: float  # Royston z of W beyond which the distances are not normal
    score_type: str
    score_labels: tuple[str, ...]
    margin_low: float  # 5% quantile of the reference's answer margins (nan: label-only)
    class_prior: F64  # (8,) share of reference answers per class bucket

    def normal_scores(self, x: F64) -> F64:
        out: F64 = np.empty(x.shape)
        kernels.normal_scores(x, self.knots, self.knot_z, self.knot_start, self.knot_size, out)
        return out

    def project(self, z: F64) -> I8:
        out: I8 = np.empty((z.shape[0], PROJ_DIM), np.int8)
        kernels.project(z, self.projection, Q_SCALE, out)
        return out

    def off_manifold(self, z: F64) -> npt.NDArray[np.bool_]:
        """Whether each query is farther than ``off_threshold`` from every anchor."""
        out = np.empty(z.shape[0], bool)
        kernels.beyond(z, self.anchors, self.off_threshold**2, out)
        return out

    def off_distance(self, z: F64) -> F64:
        # |z|^2 is the same for every anchor: add it after the minimum (one pass fewer)
        g = z @ (-2.0 * self.anchors.T)
        g += self.anchor_sq
        d2 = g.min(axis=1) + np.einsum("ij,ij->i", z, z)
        out: F64 = np.sqrt(np.maximum(d2, 0.0))
        return out


def margins(scores: F64, score_type: str) -> F64:
    """Answer margin per row: top-1 minus top-2 score (probability or logit); with one score
    column, its distance from the decision point; NaN for label-only answers."""
    if scores.shape[1] == 0:
        return np.full(scores.shape[0], np.nan)
    if scores.shape[1] == 1:
        col = scores[:, 0]
        out1: F64 = np.abs(2.0 * col - 1.0) if score_type == "probability" else np.abs(col)
        return out1
    s = np.where(np.isnan(scores), -np.inf, scores)
    top = -np.sort(-s, axis=1)[:, :2]
    with np.errstate(invalid="ignore", over="ignore"):  # +-1e308 apart: an infinite margin
        out: F64 = np.where(np.isfinite(top[:, 1]), top[:, 0] - top[:, 1], np.nan)
    return out


def class_buckets(scores: F64) -> I64:
    """Class bucket (0..7) of the top answer per row; -1 without scores."""
    if scores.shape[1] == 0:
        return np.full(scores.shape[0], -1, np.int64)
    s = np.where(np.isnan(scores), -np.inf, scores)
    top = np.argmax(s, axis=1)
    return np.where(np.isfinite(s.max(axis=1)), top % 8, -1).astype(np.int64)


def _min_dists(q: I8, hist: I8) -> F64:
    """Distance of each row of ``q`` (t, P) to the nearest row of ``hist`` (t, R, P)."""
    diff = hist.astype(np.int32) - q.astype(np.int32)[:, None, :]
    out: F64 = np.sqrt((diff * diff).sum(axis=2).min(axis=1))
    return out


def build_sketch(ref: Reference) -> ModelSketch | None:
    """The sketch of one reference, or None when it has too few rows or no features."""
    x = np.asarray(ref.sample_features, np.float64)
    k, d = x.shape
    if k < MIN_REFERENCE_ROWS or d == 0:
        return None
    lo, hi = special.ndtri(0.5 / k), special.ndtri(1 - 0.5 / k)
    knots, knot_z = [], []
    for j in range(d):
        col = np.sort(x[:, j][~np.isnan(x[:, j])])
        if col.size == 0:
            knots.append(np.array([0.0]))
            knot_z.append(np.array([0.0]))
            continue
        vals, first = np.unique(col, return_index=True)
        last = np.append(first[1:], col.size)
        mid = (first + last) / 2.0 / col.size  # mid-rank of each distinct value
        if vals.size > _KNOTS:  # keep the map cheap: knots at evenly spaced mid-ranks
            keep = np.unique(np.linspace(0, vals.size - 1, _KNOTS).round().astype(np.int64))
            vals, mid = vals[keep], mid[keep]
        knots.append(vals)
        knot_z.append(np.clip(special.ndtri(np.clip(mid, 1e-9, 1 - 1e-9)), lo, hi))
    rng = np.random.default_rng([_SEED, d])
    proj = rng.standard_normal((d, PROJ_DIM)) / np.sqrt(d)
    sizes = np.array([k.size for k in knots])
    width = 1 << np.ceil(np.log2(sizes)).astype(np.int64)  # padded to a power of two
    pad = [np.full(w - k.size, np.inf) for k, w in zip(knots, width.tolist(), strict=True)]
    sketch = ModelSketch(
        ref.feature_names,
        np.concatenate([v for k, p in zip(knots, pad, strict=True) for v in (k, p)]),
        np.concatenate([v for z, p in zip(knot_z, pad, strict=True) for v in (z, p)]),
        np.cumsum(np.r_[0, width]), sizes, proj, np.zeros((0, d)), np.zeros(0),
        np.inf, 1.0, np.inf, ref.score_type, ref.score_labels, np.nan, np.zeros(8),
    )  # fmt: skip
    z = sketch.normal_scores(x)
    order = rng.permutation(k)
    n_anchor = min(_ANCHORS, k // 2)
    anchors, calib = z[order[:n_anchor]], z[order[n_anchor:]]
    sketch = _with(sketch, anchors=anchors, anchor_sq=(anchors * anchors).sum(axis=1))
    off = float(np.quantile(sketch.off_distance(calib), 1 - OFF_RATE))
    # the test stops at the first anchor within the radius: try the most central ones first
    d2 = (calib * calib).sum(axis=1)[:, None] - 2.0 * calib @ anchors.T + sketch.anchor_sq
    central = np.argsort(-(d2 <= off * off).sum(axis=0), kind="stable")
    anchors = np.ascontiguousarray(anchors[central])
    sketch = _with(sketch, anchors=anchors, anchor_sq=sketch.anchor_sq[central])
    q = sketch.project(z)
    near, prada = _null_calibration(q, rng)
    scores = np.asarray(ref.sample_scores, np.float64)
    m = margins(scores, ref.score_type)
    m = m[np.isfinite(m)]
    low = float(np.quantile(m, 0.05)) if m.size else np.nan
    buckets = class_buckets(scores)
    buckets = buckets[buckets >= 0]
    prior = np.bincount(buckets, minlength=8)[:8].astype(np.float64)
    prior = prior / prior.sum() if prior.sum() else prior
    return _with(
        sketch, off_threshold=off, near_radius=near, prada_z=prada, margin_low=low,
        class_prior=prior,
    )  # fmt: skip


def _with(s: ModelSketch, **changes: object) -> ModelSketch:
    import dataclasses

    return dataclasses.replace(s, **changes)  # type: ignore[arg-type]


def _null_calibration(q: I8, rng: np.random.Generator) -> tuple[float, float]:
    """Near-duplicate radius and PRADA threshold from streams of natural (reference) queries."""
    k = q.shape[0]
    trials = 512
    pick = rng.integers(0, k, (trials, RING + 1))
    mins = _min_dists(q[pick[:, 0]], q[pick[:, 1:]])
    near = max(1.0, 0.25 * float(np.quantile(mins, 0.01)))
    streams = 256
    rows = rng.integers(0, k, (streams, RING + DISTS))
    ring_idx = np.arange(DISTS)[:, None] + np.arange(RING)[None, :]  # predecessors of each
    cur = rows[:, RING:]
    hist = rows[:, ring_idx]  # (streams, DISTS, RING)
    d = _min_dists(q[cur.reshape(-1)], q[hist.reshape(-1, RING)]).reshape(streams, DISTS)
    same = (rows[:, RING:, None] == hist).any(axis=2)  # exact repeats are not recorded
    d = np.where(same, np.nan, d)
    ok = ~np.isnan(d).any(axis=1)
    z = shapiro_z(np.minimum(np.rint(2 * d[ok]), 255)) if ok.any() else np.zeros(1)
    z = z[np.isfinite(z)]
    base = float(np.quantile(z, 0.99)) if z.size else 3.0
    return near, max(4.0, base + 1.5)


class Queries:
    """Per batch row: the query's projection, hashes and per-query flags (``ok`` rows only)."""

    def __init__(self, n: int) -> None:
        self.ok = np.zeros(n, bool)
        self.q = np.zeros((n, PROJ_DIM), np.int8)
        self.h = np.zeros(n, np.uint32)
        self.lanes = np.full(n, kernels.NO_LANES, np.uint32)
        self.off = np.zeros(n, bool)
        self.low = np.zeros(n, bool)
        self.bucket = np.full(n, -1, np.int64)
        self.near = np.ones(n)
        self.prada = np.full(n, np.inf)
        self.h_prior = np.zeros(n)


def reference_scores(
    scores: F64, labels: tuple[str, ...], reference_labels: tuple[str, ...]
) -> F64:
    """The batch's answer scores in the reference's label order; a label the reference has but
    no answer of this batch carried reads as NaN (one dict, not a lookup per label)."""
    at = {s: i for i, s in enumerate(labels)}
    out: F64 = np.full((scores.shape[0], len(reference_labels)), np.nan)
    for j, label in enumerate(reference_labels):
        i = at.get(label)
        if i is not None:
            out[:, j] = scores[:, i]
    return out


def batch_queries(
    batch: DetectorInput,
    sketch_of: Callable[[tuple[str, str], Reference], ModelSketch | None],
) -> Queries:
    """Per batch row: the query's projection, hash and flags, for rows with a sketch."""
    ev = batch.events
    out = Queries(ev.n)
    for model, view in batch.views.items():
        versions = ev.model_version[view.rows]
        for version in sorted(set(versions.tolist())):
            ref = batch.references.get((model, version))
            partial = ref is None  # before the reference: the rows so far give only a scale
            ref = batch.provisional.get((model, version)) if ref is None else ref
            if ref is None:
                continue
            sk = sketch_of((model, version), ref)
            w = len(sk.feature_names) if sk is not None else 0
            if sk is None or view.feature_names[:w] != sk.feature_names:
                continue
            sel = np.flatnonzero(versions == version)
            rows = view.rows[sel]
            x = view.features[sel, :w]
            z = sk.normal_scores(x)
            out.ok[rows] = True
            out.q[rows] = sk.project(z)
            out.h[rows] = exact_hash(x)
            out.lanes[rows] = lane_hash(x)
            out.off[rows] = sk.off_manifold(z)
            scores = reference_scores(view.scores[sel], view.score_labels, sk.score_labels)
            with np.errstate(invalid="ignore"):
                out.low[rows] = margins(scores, sk.score_type) < sk.margin_low
            out.bucket[rows] = class_buckets(scores)
            out.near[rows], out.prada[rows] = sk.near_radius, sk.prada_z
            prior = sk.class_prior[sk.class_prior > 0]
            out.h_prior[rows] = float(-(prior * np.log2(prior)).sum())
            if partial:  # distributions of a reference still building are not a yardstick
                out.off[rows] = out.low[rows] = False
                out.bucket[rows], out.prada[rows] = -1, np.inf
    return out
