"""Event batches with known scores for the reference and drift tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from schemas.batch import EventBatch
from tests.support import conformance as cf

F64 = npt.NDArray[np.float64]


def events(
    ts: Sequence[int],
    callers: Sequence[str],
    *,
    model: str = "m0",
    version: str = "",
    scores: F64 | None = None,
    score_labels: tuple[str, ...] | None = None,
    features: F64 | None = None,
    labels: Sequence[str] | None = None,
    values: F64 | None = None,
    status: int = 200,
    offset0: int = 0,
) -> EventBatch:
    """A batch of one model version; scores named ``score_labels`` (default "0", "1")."""
    n = len(ts)
    b = cf.make_batch(ts, callers, model_id=[model] * n, features=features, offset0=offset0)
    if scores is not None:
        sc = np.asarray(scores, np.float64)
        names = score_labels or cf.LABELS[: sc.shape[1]]
        b = dataclasses.replace(b, scores=sc, score_labels=names)
    label_col = np.empty(n, dtype=object)
    label_col[:] = list(labels) if labels is not None else [""] * n
    version_col = np.empty(n, dtype=object)
    version_col[:] = [version] * n
    return dataclasses.replace(
        b,
        model_version=version_col,
        output_label=label_col,
        output_value=np.full(n, np.nan) if values is None else np.asarray(values, np.float64),
        status=np.full(n, status, np.int32),
    )


def two_class(p: F64) -> F64:
    return np.column_stack([1 - p, p])
