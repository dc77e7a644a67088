"""The columns ``drift.features`` watches for one (model, version), from its reference.

Input features (numeric, or categorical as codes of the model's dictionary), then the
prediction channels of :mod:`detectors.models.channels` (each class's probability or logit, the
predicted label as a category, the score of a binary or regression model: aware of the score
type), then ``confidence`` where the model has scores: the top probability of a probability
model, the margin between the two largest logits of a logit model (a single logit's absolute
value). The reference stores an evenly spaced sample of its rows of all three, so the bins are
built from the same events as its other histograms.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from detectors.drift.bins import BinLayout, build_layout
from detectors.models.reference import Reference
from detectors.models.routing import ModelView
from schemas.batch import EventBatch

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

PREDICTION = "prediction:"
CONFIDENCE = "confidence"


def confidence(score_type: str, scores: F64) -> F64 | None:
    """Per row: top probability, or top-two logit margin; None for other score types."""
    if score_type not in ("probability", "logit") or scores.shape[1] == 0:
        return None
    s = np.where(np.isnan(scores), -np.inf, scores)
    top = s.max(axis=1)
    if score_type == "logit":
        if scores.shape[1] == 1:
            top = np.abs(scores[:, 0])
        else:
            two = np.sort(s, axis=1)[:, -2:]
            top = two[:, 1] - two[:, 0]
    out: F64 = np.where(np.isnan(scores).all(axis=1) | ~np.isfinite(top), np.nan, top)
    return out


def layout_of(ref: Reference, bins: int) -> BinLayout:
    names = list(ref.feature_names)
    kinds = list(ref.categorical)
    parts = [np.asarray(ref.sample_features, np.float64)]
    names += [PREDICTION + c for c in ref.channels]
    kinds += [c == "label" for c in ref.channels]
    parts.append(np.asarray(ref.sample_channels, np.float64))
    conf = confidence(ref.score_type, np.asarray(ref.sample_scores, np.float64))
    if conf is not None:
        names.append(CONFIDENCE)
        kinds.append(False)
        parts.append(conf[:, None])
    sample = np.column_stack(parts) if parts else np.zeros((0, 0))
    return build_layout(tuple(names), tuple(kinds), sample, bins)


def values_of(
    ref: Reference, layout: BinLayout, batch: EventBatch, view: ModelView, at: I64 | slice
) -> F32:
    """The watched columns of rows ``at`` of ``view`` (rows, columns), NaN where absent; in
    float32, which is what :meth:`~detectors.drift.bins.BinLayout.codes` bins."""
    rows = view.rows[at]
    scores = view.scores[at]
    n_feat = len(ref.feature_names)
    out = np.full((rows.size, len(layout.names)), np.nan, np.float32)
    if view.feature_names[:n_feat] == ref.feature_names:  # the usual case: the same index
        out[:, :n_feat] = view.features[at, :n_feat]
    else:  # a reference from a file can list features in another order
        where = {name: j for j, name in enumerate(view.feature_names)}
        for i, name in enumerate(ref.feature_names):
            if name in where:
                out[:, i] = view.features[at, where[name]]
    channels = ref.layout.values(
        view.score_labels, scores, batch.output_value[rows], batch.output_label[rows]
    )
    out[:, n_feat : n_feat + channels.shape[1]] = channels
    if layout.names and layout.names[-1] == CONFIDENCE:
        pos = {c: i for i, c in enumerate(view.score_labels)}
        cols = [pos[c] for c in ref.score_labels if c in pos]
        conf = confidence(ref.score_type, scores[:, cols])
        if conf is not None:
            out[:, -1] = conf
    return out
