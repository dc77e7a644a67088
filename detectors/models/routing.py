"""Per-model routing: split a batch by model and align its columns to each model's stable index.

Events carry features and scores by name, and a batch only knows the names it saw. Drift and
query-pattern detectors need the same column to mean the same feature in every batch, so each
model gets a stable, append-only index of feature names and score labels; a feature seen for the
first time gets the next column and earlier rows read NaN for it.

>>> from schemas.decode import decode
>>> idx = FeatureIndex()
>>> d = decode([b'{"schema_version":1,"event_id":"e1","ts":1767225600000,"model_id":"m",'
...             b'"api_key_id":"k",'
...             b'"input":{"features":{"b":2,"a":1}},"output":{"scores":{"yes":0.9,"no":0.1}}}'])
>>> view = route(d.batch, idx)["m"]
>>> view.feature_names, view.features.tolist(), view.score_labels
(('a', 'b'), [[1.0, 2.0]], ('no', 'yes'))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import orjson

from schemas.batch import EventBatch

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class ModelView:
    """The rows of one model in a batch, with features and scores on the model's stable index.

    Categorical features are in ``features`` too, as the code of the value in the model's own
    dictionary for that feature (stable, like the names)."""

    model_id: str
    rows: I64  # rows of the batch, in arrival order
    feature_names: tuple[str, ...]
    categorical: tuple[bool, ...]
    features: F64  # (len(rows), len(feature_names)), NaN where absent
    score_labels: tuple[str, ...]
    scores: F64  # (len(rows), len(score_labels)), NaN where absent


MAX_COLUMNS = 2_048  # feature names, and score labels, per model


class FeatureIndex:
    """Stable, append-only per-model indices of feature names, category values and labels."""

    def __init__(self) -> None:
        self.features: dict[str, dict[str, int]] = {}
        self.categorical: dict[str, dict[str, bool]] = {}
        self.categories: dict[str, dict[str, dict[str, int]]] = {}
        self.labels: dict[str, dict[str, int]] = {}
        self.changed = False

    def _names(self, table: dict[str, dict[str, int]], model: str, names: tuple[str, ...]) -> I64:
        index = table.setdefault(model, {})
        out = np.empty(len(names), np.int64)
        for i, name in enumerate(names):
            if name not in index:
                index[name] = len(index)
                self.changed = True
            out[i] = index[name]
        return out

    def admit(
        self, table: dict[str, dict[str, int]], model: str, names: tuple[str, ...]
    ) -> npt.NDArray[np.bool_]:
        """Which of ``names`` have, or fit in, the model's first ``MAX_COLUMNS`` (bool array)."""
        index = table.get(model, {})
        room = MAX_COLUMNS - len(index)
        new = np.array([n not in index for n in names], dtype=bool)
        return ~new | (np.cumsum(new) <= room)

    def snapshot(self) -> bytes:
        self.changed = False
        return orjson.dumps(
            {
                "features": self.features,
                "categorical": self.categorical,
                "categories": self.categories,
                "labels": self.labels,
            }
        )

    def restore(self, blob: bytes) -> None:
        state = orjson.loads(blob)
        self.features = state["features"]
        self.categorical = state["categorical"]
        self.categories = state["categories"]
        self.labels = state["labels"]
        self.changed = False


def _model_rows(model_id: npt.NDArray[np.object_]) -> dict[str, I64]:
    if model_id.size == 0:
        return {}
    models, inverse = np.unique(model_id.astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(models) + 1))
    return {str(m): order[bounds[i] : bounds[i + 1]].astype(np.int64) for i, m in enumerate(models)}


def _present(mask: npt.NDArray[np.bool_], width: int) -> list[bool]:
    """Which columns have at least one value in these rows."""
    if not mask.size:
        return [False] * width
    any_rows: npt.NDArray[np.bool_] = np.asarray(mask.any(axis=0))
    return [bool(v) for v in any_rows]


def route(batch: EventBatch, index: FeatureIndex) -> dict[str, ModelView]:
    """Split ``batch`` per model; columns on each model's stable index (updated in place)."""
    views: dict[str, ModelView] = {}
    for model, rows in _model_rows(batch.model_id).items():
        num = batch.num_values[rows]
        num_present = _present(~np.isnan(num), len(batch.num_names))
        cat = batch.cat_codes[rows]
        cat_present = _present(cat >= 0, len(batch.cat_names))
        num_src = np.flatnonzero(num_present)
        cat_src = np.flatnonzero(cat_present)
        vec_len = int(batch.vector_len[rows].max()) if rows.size else 0
        vec_src = np.arange(vec_len)
        num_names = tuple(batch.num_names[i] for i in num_src.tolist())
        cat_names = tuple(batch.cat_names[i] for i in cat_src.tolist())
        vec_names = tuple(f"v{i}" for i in range(vec_len))
        # at most MAX_COLUMNS names per model: one message with 30,000 made-up feature names
        # must not widen every later batch of that model (the names stay in the events table)
        keep = index.admit(index.features, model, num_names + vec_names + cat_names)
        k_num, k_vec, k_cat = np.split(keep, [len(num_names), len(num_names) + vec_len])
        num_src, vec_src, cat_src = num_src[k_num], vec_src[k_vec], cat_src[k_cat]
        num_names = tuple(n for n, k in zip(num_names, k_num, strict=True) if k)
        vec_names = tuple(n for n, k in zip(vec_names, k_vec, strict=True) if k)
        cat_names = tuple(n for n, k in zip(cat_names, k_cat, strict=True) if k)
        kinds = index.categorical.setdefault(model, {})
        for n in num_names + vec_names:
            kinds.setdefault(n, False)
        for n in cat_names:
            kinds.setdefault(n, True)
        cols_num = index._names(index.features, model, num_names)
        cols_vec = index._names(index.features, model, vec_names)
        cols_cat = index._names(index.features, model, cat_names)
        names = tuple(index.features[model])
        features = np.full((rows.size, len(names)), np.nan)
        if num_names:
            features[:, cols_num] = num[:, num_src]
        if vec_names:
            features[:, cols_vec] = batch.vector[rows][:, vec_src]
        # the batch columns of cat_names, found once: a lookup per name made a message with
        # 20,000 string features take minutes to route
        for name, col, src in zip(cat_names, cols_cat, cat_src.tolist(), strict=True):
            values = batch.cat_values[src]
            codes = index._names(index.categories.setdefault(model, {}), name, values).astype(
                np.float64
            )
            raw = cat[:, src]
            features[:, col] = np.where(raw >= 0, codes[np.maximum(raw, 0)], np.nan)
        sc = batch.scores[rows]
        present = np.flatnonzero(_present(~np.isnan(sc), len(batch.score_labels)))
        labels = tuple(batch.score_labels[i] for i in present.tolist())
        kept = index.admit(index.labels, model, labels)
        present, labels = present[kept], tuple(n for n, k in zip(labels, kept, strict=True) if k)
        cols_lab = index._names(index.labels, model, labels)
        all_labels = tuple(index.labels[model])
        scores = np.full((rows.size, len(all_labels)), np.nan)
        if labels:
            scores[:, cols_lab] = sc[:, present]
        views[model] = ModelView(
            model_id=model,
            rows=rows,
            feature_names=names,
            categorical=tuple(kinds[n] for n in names),
            features=features,
            score_labels=all_labels,
            scores=scores,
        )
    return views
