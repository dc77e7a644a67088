"""Prediction channels of a model version, and their bins (see :mod:`detectors.models.reference`).

**Prediction channels.** A model's predictions are watched as channels, each one value per
event (:class:`Channels`), so that a shift between classes cannot hide in one summary number:

- probability models with 3 or more classes, and logit models with 2 or more: one channel per
  class, ``score:<label>`` (that class's probability or logit, one-vs-rest), and ``label``, the
  predicted label (the class with the highest score; a tie goes to the class listed first in
  ``score_labels``);
- 2-class probability models: ``score``, the positive class's probability (a label named
  1/true/yes/positive/pos if exactly one is, else the last label); a single probability or
  logit column: ``score``, that column; regression: ``score``, the output value;
- label-only models: ``label``, the distribution of ``output.label``; ``llm`` models: none.

At most ``MAX_CLASS_CHANNELS`` (32) classes get a channel, so the state per window stays small
for a model with hundreds of classes: those the reference predicts most often (ties: the first
in ``score_labels``). The ``label`` channel's last bin counts every other label: classes without
a channel, and labels the reference never saw. A channel the reference has no value for is
dropped. The score type comes from the model inventory (``score_types``); when it is silent it
is inferred from the accepted events: scores all in [0, 1] whose rows sum to 1 within 1e-3 (or a
single score label) are probabilities, other scores logits; no scores but an output value means
regression; otherwise label-only.

**Bins.** Numeric features and numeric channels get ``bins`` bins with edges at the reference's
quantiles, duplicates removed; bins are right-closed and the outer ones open-ended, so bin ``i``
is ``(edges[i-1], edges[i]]``. The ``label`` channel's value is its category's bin number, so its
edges are the half-integers between them. Channel histograms are one ``(channels, bins)`` array:
a channel with fewer bins is padded with ``+inf`` edges and zero counts (a padded bin adds
exactly 0 to a PSI). Categorical features keep their category-code counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from schemas.batch import EventBatch

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
StrArray = npt.NDArray[np.object_]

SCORE_TYPES = ("probability", "logit", "label_only", "regression", "llm")
LABEL_CHANNEL = "label"
MAX_CLASS_CHANNELS = 32
QUANTILES = (0.1, 0.5, 0.9)  # reported by bin_quantiles
_POSITIVE = frozenset({"1", "true", "yes", "positive", "pos"})


def label_bins(categories: tuple[str, ...], labels: StrArray) -> I64:
    """Bin of each output label: its index in ``categories``, ``len(categories)`` for an unseen
    label, -1 for none. One dictionary lookup per distinct label."""
    if labels.size == 0:
        return np.zeros(0, np.int64)
    distinct, inverse = np.unique(labels.astype(str), return_inverse=True)
    index = {c: i for i, c in enumerate(categories)}
    codes = [-1 if u == "" else index.get(u, len(categories)) for u in distinct.tolist()]
    return np.asarray(codes, np.int64)[inverse]


@dataclass(frozen=True, eq=False)
class Channels:
    """How the events of one model version become prediction channels, and their bins.

    >>> ch = Channels("probability", ("score:a", "score:b", "label"), ("a", "b", ""),
    ...               ("a", "b"), ("a", "b"), np.array([[0.5, np.inf], [0.5, np.inf], [0.5, 1.5]]))
    >>> x = ch.values(("b", "a"), np.array([[0.3, 0.7], [0.5, 0.5], [0.9, np.nan]]),
    ...               np.full(3, np.nan), np.array(["", "", ""], object))
    >>> x.tolist()  # ties go to the first class; b's score alone names b
    [[0.7, 0.3, 0.0], [0.5, 0.5, 0.0], [nan, 0.9, 1.0]]
    >>> ch.bins(x).tolist(), ch.widths().tolist()
    ([[1, 0, 0], [0, 0, 0], [-1, 1, 1]], [2, 2, 3])
    """

    score_type: str
    names: tuple[str, ...]
    columns: tuple[str, ...]  # the score label a channel reads; "" for the output value or label
    categories: tuple[str, ...]  # the label channel's bins, then one for any other label
    class_order: tuple[str, ...]  # the reference's score labels: argmax ties go to the first
    edges: F64  # (channels, width) interior edges, +inf padding

    def values(
        self, score_labels: tuple[str, ...], scores: F64, output_value: F64, output_label: StrArray
    ) -> F64:
        """(rows, channels): each channel's value, the label channel's its bin; NaN for none.
        ``score_labels`` name the columns of ``scores``."""
        out = np.full((output_value.shape[0], len(self.names)), np.nan)
        pos = {c: i for i, c in enumerate(score_labels)}
        for j, (name, column) in enumerate(zip(self.names, self.columns, strict=True)):
            if name == LABEL_CHANNEL:
                bins = (
                    label_bins(self.categories, output_label)
                    if self.score_type == "label_only"
                    else self._argmax_bins(score_labels, scores)
                )
                out[:, j] = np.where(bins >= 0, bins, np.nan)
            elif column == "":
                out[:, j] = output_value
            elif column in pos:
                out[:, j] = scores[:, pos[column]]
        return out

    def _argmax_bins(self, score_labels: tuple[str, ...], scores: F64) -> I64:
        rank = {c: i for i, c in enumerate(self.class_order)}
        order = sorted(
            range(len(score_labels)), key=lambda i: (rank.get(score_labels[i], len(rank)), i)
        )
        if not order:
            return np.full(scores.shape[0], -1, np.int64)
        index = {c: i for i, c in enumerate(self.categories)}
        code = np.asarray([index.get(score_labels[i], len(self.categories)) for i in order])
        s = scores[:, order]
        top = code[np.where(np.isnan(s), -np.inf, s).argmax(axis=1)]
        return np.where(np.isnan(s).all(axis=1), -1, top).astype(np.int64)

    def bins(self, values: F64) -> I64:
        """Bin of each value of :meth:`values` (-1 for NaN); one ``searchsorted`` per channel."""
        out = np.empty(values.shape, np.int64)
        for j in range(values.shape[1]):
            out[:, j] = np.searchsorted(self.edges[j], values[:, j], side="left")
        out[np.isnan(values)] = -1
        return out

    def of(self, batch: EventBatch, rows: I64) -> tuple[I64, F64]:
        """Bins (-1 for none) and values of ``rows`` of ``batch``, (rows, channels) each."""
        values = self.values(
            batch.score_labels,
            batch.scores[rows],
            batch.output_value[rows],
            batch.output_label[rows],
        )
        return self.bins(values), values

    def widths(self) -> I64:
        """Number of bins of each channel (the rest of its row is padding)."""
        widths: I64 = np.isfinite(self.edges).sum(axis=1).astype(np.int64) + 1
        return widths

    def same(self, other: Channels) -> bool:
        def key(c: Channels) -> tuple[Any, ...]:
            return (c.score_type, c.names, c.columns, c.categories, c.class_order)

        return key(self) == key(other) and np.array_equal(self.edges, other.edges)


def quantile_edges(values: F64, bins: int) -> F64:
    if values.size == 0:
        return np.zeros(0)
    probs = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    with np.errstate(over="ignore", invalid="ignore"):  # between -1e308 and 1e308
        edges = np.quantile(values, probs)
    bad = ~np.isfinite(edges)
    if bad.any():  # the interpolation overflowed: the lower of the two values instead
        edges[bad] = np.quantile(values, probs[bad], method="lower")
    return np.unique(edges)


def _channel_names(
    score_type: str, labels: tuple[str, ...], positive: str, scores: F64, output_labels: StrArray
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Names, columns and label-channel categories of a model's channels (module doc)."""
    if score_type == "label_only":
        categories = tuple(sorted(set(output_labels.astype(str).tolist()) - {""}))
        return (LABEL_CHANNEL,), ("",), categories
    if score_type == "regression":
        return ("score",), ("",), ()
    if score_type not in ("probability", "logit") or not labels:
        return (), (), ()
    if len(labels) == 1 or positive:
        return ("score",), (positive or labels[0],), ()
    missing = np.isnan(scores)
    predicted = np.where(missing, -np.inf, scores).argmax(axis=1)[~missing.all(axis=1)]
    wins = np.bincount(predicted, minlength=len(labels))
    present = np.flatnonzero(~missing.all(axis=0))
    kept = np.sort(present[np.lexsort((present, -wins[present]))][:MAX_CLASS_CHANNELS])
    classes = tuple(labels[i] for i in kept.tolist())
    return (*(f"score:{c}" for c in classes), LABEL_CHANNEL), (*classes, ""), classes


def build_channels(
    score_type: str,
    labels: tuple[str, ...],
    positive: str,
    scores: F64,
    values: F64,
    output_labels: StrArray,
    bins: int,
) -> tuple[Channels, I64, F64, F64]:
    """A reference's channels from its accepted rows: the layout with its bins, the counts per
    bin ``(channels, bins)``, each channel's (min, max), and each row's values."""
    names, columns, categories = _channel_names(score_type, labels, positive, scores, output_labels)
    unbinned = Channels(score_type, names, columns, categories, labels, np.zeros((len(names), 0)))
    x = unbinned.values(labels, scores, values, output_labels)
    keep = np.flatnonzero((~np.isnan(x)).any(axis=0)).tolist()  # a channel without values: none
    names, columns = tuple(names[j] for j in keep), tuple(columns[j] for j in keep)
    x = x[:, keep]
    per_channel = [
        np.arange(len(categories)) + 0.5
        if name == LABEL_CHANNEL
        else quantile_edges(col[np.isfinite(col)], bins)
        for name, col in zip(names, x.T, strict=True)
    ]
    width = max((e.size for e in per_channel), default=0)
    edges = np.full((len(names), width), np.inf)
    for j, e in enumerate(per_channel):
        edges[j, : e.size] = e
    layout = Channels(score_type, names, columns, categories, labels, edges)
    binned = layout.bins(x)
    rows, cols = np.nonzero(binned >= 0)
    flat = cols * (width + 1) + binned[rows, cols]
    counts = np.bincount(flat, minlength=len(names) * (width + 1)).reshape(len(names), width + 1)
    value_range = np.full((len(names), 2), np.nan)
    numeric = [j for j, name in enumerate(names) if name != LABEL_CHANNEL]
    if numeric:
        value_range[numeric, 0] = np.fmin.reduce(x[:, numeric], axis=0)
        value_range[numeric, 1] = np.fmax.reduce(x[:, numeric], axis=0)
    return layout, counts.astype(np.int64), value_range, x


def infer_score_type(scores: F64, values: F64) -> str:
    """Score type from accepted events when the model inventory is silent (see module doc)."""
    finite = ~np.isnan(scores)
    if finite.any():
        observed = scores[finite]
        if observed.min() >= 0.0 and observed.max() <= 1.0:
            with_scores = finite.any(axis=1)
            sums = np.where(finite, scores, 0.0).sum(axis=1)[with_scores]
            if finite.any(axis=0).sum() == 1 or bool(np.all(np.abs(sums - 1.0) <= 1e-3)):
                return "probability"
        return "logit"
    return "regression" if bool((~np.isnan(values)).any()) else "label_only"


def positive_label(labels: tuple[str, ...]) -> str:
    positive = [label for label in labels if label.strip().lower() in _POSITIVE]
    return positive[0] if len(positive) == 1 else labels[-1]


def bin_quantiles(counts: I64, edges: F64, lo: float, hi: float) -> dict[str, float]:
    """p10/p50/p90 interpolated within bins; the outer bins end at the observed ``lo``/``hi``."""
    if edges.size == 0 or np.isnan(lo) or counts.sum() == 0:
        return {}
    bounds = np.concatenate([[min(lo, edges[0])], edges, [max(hi, edges[-1])]])
    cdf = np.concatenate([[0.0], np.cumsum(counts)]) / counts.sum()
    values = np.interp(QUANTILES, cdf, bounds)
    return {
        f"p{round(q * 100)}": round(float(v), 6) for q, v in zip(QUANTILES, values, strict=True)
    }
