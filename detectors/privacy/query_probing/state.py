"""Keyed state and per-query geometry of ``privacy.query_probing`` (see
:mod:`detectors.privacy.query_probing.detector` for what the signals mean).

Per query: an int8 projection (part 1's Gaussian projection of the model's sketch,
:mod:`detectors.query.sketch`, to 8 dimensions, 16 units per standard deviation) of its
**robust scores** (each feature minus the reference's median, over its interquartile range /
1.349, clipped to +-5; missing values 0) -- not part 1's normal scores, whose 16 interpolations
per query cost about 1 µs alone, and which make a query that steps off a point mass of a
feature jump as far as two unrelated records; the exact hash of its raw values (part 1's); a
64-bit **feature fingerprint** (two hash bits per feature, features past 32 folded), so that
the number of features that differ between two queries can be estimated without keeping them;
and the answer as **class probabilities** quantised to a byte (softmax of logits; none for
label-only answers).

Calibrated per model version on its reference: the link radius (half the 0.1% quantile of a
natural query's distance to the nearest of ``RING`` others) and the join radius (the 1% quantile
of the distance between two natural queries). Part 1's off-manifold distance (normal scores to
256 reference anchors) is computed only for the few queries that are perturbations. No matrix
product goes through BLAS: on a shared 2-core machine its threads turn a 10,000 x 16 x 8
product from 0.03 into 0.8 µs per row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors.base import NONE, DetectorInput
from detectors.episodes import EPISODE_COLUMNS
from detectors.models.reference import Reference
from detectors.query.sketch import PROJ_DIM, Q_SCALE, ModelSketch, exact_hash, reference_scores

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

RING = 8  # recent queries per key a new query may link to
CLASSES = 8  # class probabilities kept per query (classes past 8 folded by index % 8)
FLAGS = ("big_cluster", "perturbed_record", "member_on_manifold", "near")

COLUMNS: dict[str, tuple[Any, Any]] = {
    "seq": (np.int64, 0),  # queries seen; query t sits at t % RING
    "dseq": (np.int64, 0),  # queries that were not exact repeats (they move the window)
    "repeats": (np.int64, 0),
    "ring_q": (np.dtype((np.int8, (RING, PROJ_DIM))), 0),
    "ring_h": (np.dtype((np.uint32, (RING,))), 0),  # exact hash
    "ring_fp": (np.dtype((np.uint64, (RING,))), 0),  # feature fingerprint
    "ring_m": (np.dtype((np.uint32, (RING,))), 0),  # model: only queries of one model link
    "ring_root": (np.dtype((np.int64, (RING,))), 0),  # seq of the query its chain started at
    "ring_rq": (np.dtype((np.int8, (RING, PROJ_DIM))), 0),  # that root's projection
    "ring_rp": (np.dtype((np.uint8, (RING, CLASSES))), 0),  # and its class probabilities
    "last_root": (np.int64, -1),  # root of the last perturbation
    "last_pq": (np.dtype((np.int8, (PROJ_DIM,))), 0),  # the last perturbation's projection
    "run": (np.int32, 0),  # perturbations in the current run (see privacy_probing._runs)
    "run_q": (np.dtype((np.int8, (PROJ_DIM,))), 0),  # the run's origin: projection
    "run_p": (np.dtype((np.uint8, (CLASSES,))), 0),  # and class probabilities
    "blk": (np.int64, 0),  # window: block of the current half, counts per flag
    "cur": (np.dtype((np.int16, (len(FLAGS),))), 0),
    "prev": (np.dtype((np.int16, (len(FLAGS),))), 0),
    "hour": (np.int64, NONE),  # harvesting: event-time hour of the latest full-score answer
    "hour_n": (np.int64, 0),  # full-score answers in that hour
    "before_n": (np.int64, 0),  # and before it
    "first_hour": (np.int64, NONE),
    **EPISODE_COLUMNS,  # the open episode (its place in the row is part of the saved format)
}


_M1 = np.uint64(0x9E3779B97F4A7C15)
_LOW2 = np.uint64(0x5555555555555555)


def fingerprint(x: F64) -> U64:
    """Two bits of every feature's raw value (the top bits of its IEEE bits times an odd
    constant, which every bit feeds), feature ``j`` at bits ``2 (j % 32)``.

    >>> a = np.array([[1.0, 2.0, 3.0, 4.0]])
    >>> b = a.copy(); b[0, 2] += 1e-9
    >>> int(changed_features(fingerprint(a), fingerprint(b))[0]) <= 1
    True
    """
    if x.shape[1] == 0:
        return np.zeros(x.shape[0], np.uint64)
    v = np.where(np.isnan(x), np.inf, x) + 0.0  # one NaN, and -0.0 == 0.0
    h = np.ascontiguousarray(v, np.float64).view(np.uint64) * _M1
    h >>= np.uint64(62)
    h <<= (2 * (np.arange(x.shape[1]) % 32)).astype(np.uint64)
    out: U64 = np.bitwise_xor.reduce(h, axis=1)
    return out


def changed_features(a: U64, b: U64) -> I64:
    """Features whose two-bit codes differ: about three quarters of the features that changed."""
    y = np.asarray(a, np.uint64) ^ np.asarray(b, np.uint64)
    out: I64 = np.bitwise_count((y | (y >> np.uint64(1))) & _LOW2).astype(np.int64)
    return out


def probabilities(scores: F64, score_type: str) -> npt.NDArray[np.uint8]:
    """Class probabilities as bytes (softmax of logits; one column p means [1 - p, p]); zero
    rows where the answer has no usable scores."""
    n, k = scores.shape
    out = np.zeros((n, CLASSES), np.uint8)
    if k == 0:
        return out
    s = scores
    if k == 1:
        s = np.concatenate([1.0 - s, s], axis=1) if score_type == "probability" else np.c_[-s, s]
    with np.errstate(invalid="ignore", over="ignore"):
        if score_type != "probability":
            z = np.where(np.isnan(s), -np.inf, s)
            top = z.max(axis=1, keepdims=True)
            e = np.exp(z - np.where(np.isfinite(top), top, 0.0))
            s = e / e.sum(axis=1, keepdims=True)
        s = np.clip(np.nan_to_num(s, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    ok = np.asarray(np.isfinite(scores).all(axis=1), bool)
    if s.shape[1] > CLASSES:
        folded = np.zeros((n, CLASSES))
        for j in range(s.shape[1]):
            folded[:, j % CLASSES] += s[:, j]
        s = np.minimum(folded, 1.0)
    q = np.rint(s * 255).astype(np.uint8)
    out[:, : q.shape[1]] = np.where(ok[:, None], q, 0)
    return out


@dataclass(frozen=True, eq=False)
class Scaler:
    """Robust scores and their int8 projection for one model version."""

    centre: F64
    inv_scale: F64
    projection: F64  # (features, PROJ_DIM), scaled to int8 units

    @classmethod
    def of(cls, sketch: ModelSketch, ref: Reference) -> Scaler:
        x = np.asarray(ref.sample_features, np.float64)
        d = x.shape[1]
        med, q25, q75, sd = np.zeros(d), np.zeros(d), np.zeros(d), np.zeros(d)
        seen = ~np.isnan(x).all(axis=0)  # a column no reference row has: centre 0, scale 1
        with np.errstate(all="ignore"):
            y = x[:, seen]
            med[seen] = np.nan_to_num(np.nanmedian(y, axis=0))
            lo_hi = np.nan_to_num(np.nanquantile(y, [0.25, 0.75], axis=0))
            q25[seen], q75[seen] = lo_hi[0], lo_hi[1]
            sd[seen] = np.nan_to_num(np.nanstd(y, axis=0))
        scale = np.where(q75 > q25, (q75 - q25) / 1.349, np.where(sd > 0, sd, 1.0))
        return cls(med, 1.0 / scale, sketch.projection * Q_SCALE)

    def project(self, x: F64) -> npt.NDArray[np.int8]:
        with np.errstate(over="ignore", invalid="ignore"):  # 1e308, inf: clipped to +-5
            u = (x - self.centre) * self.inv_scale
        np.clip(u, -5.0, 5.0, out=u)
        u[np.isnan(u)] = 0.0
        y = np.rint(np.einsum("ij,jk->ik", u, self.projection))
        out: npt.NDArray[np.int8] = np.clip(y, -127, 127).astype(np.int8)
        return out


def radii(scaler: Scaler, ref: Reference) -> tuple[float, float]:
    """The link radius: half the 0.1% quantile of a natural query's distance to the nearest of
    ``RING`` others (int8 projection units, at least 1.5); the join radius: the 1% quantile of
    the distance between two natural queries (at least twice the link radius)."""
    q = scaler.project(np.asarray(ref.sample_features, np.float64))
    rng = np.random.default_rng([0x9E1, q.shape[0]])
    pick = rng.integers(0, q.shape[0], (4_096, RING + 1))
    diff = q[pick[:, 1:]].astype(np.int32) - q[pick[:, :1]].astype(np.int32)
    d = np.sqrt((diff * diff).sum(axis=2))
    pair = d[:, 0][pick[:, 1] != pick[:, 0]]
    d = np.where(pick[:, 1:] == pick[:, :1], np.inf, d).min(axis=1)
    link = max(1.5, 0.5 * float(np.quantile(d[np.isfinite(d)], 0.001)))
    return link, max(2 * link, float(np.quantile(pair, 0.01)))


@dataclass(frozen=True, eq=False)
class Calibration:
    sketch: ModelSketch
    scaler: Scaler
    radius: float
    join: float
    min_changed: int  # features that must move for a near query to count as a perturbation
    model_tag: int


class Geometry:
    """Per batch row: projection, hashes, answer, radius (``ok`` rows only); per model the
    normal scores, so the off-manifold distance is computed only for the rows that need it."""

    def __init__(self, n: int) -> None:
        self.ok = np.zeros(n, bool)
        self.q = np.zeros((n, PROJ_DIM), np.int8)
        self.h = np.zeros(n, np.uint32)
        self.fp = np.zeros(n, np.uint64)
        self.m = np.zeros(n, np.uint32)
        self.p = np.zeros((n, CLASSES), np.uint8)
        self.scored = np.zeros(n, bool)  # a full score vector came back
        self.label_only = np.zeros(n, bool)
        self.radius = np.ones(n)
        self.join = np.ones(n)
        self.min_changed = np.full(n, 1 << 20, np.int64)
        self.blocks: list[tuple[I64, F64, ModelSketch]] = []  # rows, raw features, sketch

    def on_manifold(self, rows: I64) -> npt.NDArray[np.bool_]:
        """Whether each of ``rows`` lies within the model's 99% off-manifold distance."""
        out = np.zeros(rows.size, bool)
        for brows, x, sk in self.blocks:
            pos = np.searchsorted(brows, rows)
            hit = (pos < brows.size) & (brows[np.minimum(pos, brows.size - 1)] == rows)
            if hit.any():
                z = sk.normal_scores(x[pos[hit]])
                out[hit] = ~sk.off_manifold(z)
        return out


def batch_geometry(
    batch: DetectorInput, calibration_of: Callable[[tuple[str, str], Reference], Calibration | None]
) -> Geometry:
    ev = batch.events
    g = Geometry(ev.n)
    for model, view in batch.views.items():
        versions = ev.model_version[view.rows]
        one = versions.size > 0 and bool((versions == versions[0]).all())
        for version in [str(versions[0])] if one else np.unique(versions.astype(str)).tolist():
            ref = batch.references.get((model, version))
            partial = ref is None  # before the reference: the rows so far give only a scale
            ref = batch.provisional.get((model, version)) if ref is None else ref
            cal = calibration_of((model, version), ref) if ref is not None else None
            if cal is None:
                continue
            sk = cal.sketch
            w = len(sk.feature_names)
            if view.feature_names[:w] != sk.feature_names:
                continue
            sel = slice(None) if one else np.flatnonzero(versions == version)
            rows = view.rows[sel]
            x = view.features[sel, :w]
            g.ok[rows] = True
            g.q[rows] = cal.scaler.project(x)
            g.h[rows] = exact_hash(x)
            g.fp[rows] = fingerprint(x)
            g.m[rows] = cal.model_tag
            g.radius[rows] = cal.radius
            g.join[rows] = cal.join
            g.min_changed[rows] = cal.min_changed
            scores = reference_scores(view.scores[sel], view.score_labels, sk.score_labels)
            g.p[rows] = probabilities(scores, sk.score_type)
            g.scored[rows] = (scores.shape[1] >= 2) & np.isfinite(scores).all(axis=1)
            g.label_only[rows] = sk.score_type == "label_only"
            if rows.size > 1 and bool((rows[1:] < rows[:-1]).any()):
                order = np.argsort(rows)
                rows, x = rows[order], x[order]
            if not partial:  # no manifold before the reference: nothing is "on" it
                g.blocks.append((rows, x, sk))
    return g
