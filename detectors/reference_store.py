"""Builders of references: :class:`ReferenceStore` freezes one :class:`Reference` per
(model, model_version) from its first successful events (see :mod:`detectors.reference`).

**Poisoning defence.** An attacker who floods a new model version can try to make its reference
look like their traffic. No caller (``api_key_id``) may contribute more than
``cap = floor(max_caller_share * n_events)`` events (100 of 2,000 by default); a caller's later
events are skipped, not counted. A builder freezes at whichever comes first:

- ``n_events`` accepted events (``complete=True``), or
- ``seen_limit_factor * n_events`` events seen, accepted or skipped (``complete=False``): with
  fewer than ``1 / max_caller_share`` callers the reference could otherwise never fill. It then
  holds what it has, and ``capped_callers`` names the callers that hit the cap, so an operator
  can judge it and replace it (:meth:`ReferenceStore.add`).

Determinism: the same events in the same order give the same reference bytes, however they are
split into batches (feature and label columns are trimmed to those the accepted rows use).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from detectors.channels import (
    SCORE_TYPES,
    build_channels,
    infer_score_type,
    positive_label,
    quantile_edges,
)
from detectors.reference import Reference, npz_bytes, npz_load
from detectors.routing import ModelView
from schemas.batch import EventBatch

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
StrArray = npt.NDArray[np.object_]

_NO_TS = -(2**63)


def _used_width(m: F64) -> int:
    """Columns up to the last one any row uses (later ones came from events not accepted)."""
    used = np.flatnonzero(~np.isnan(m).all(axis=0))
    return int(used[-1]) + 1 if used.size else 0


def _histogram(values: F64, edges: F64) -> I64:
    bins = np.searchsorted(edges, values, side="left")
    return np.bincount(bins, minlength=edges.size + 1).astype(np.int64)


class _Builder:
    """Accepted rows of one (model, version) so far: at most ``n_events`` of them."""

    def __init__(self) -> None:
        self.feature_names: tuple[str, ...] = ()
        self.categorical: tuple[bool, ...] = ()
        self.score_labels: tuple[str, ...] = ()
        self.features = np.zeros((0, 0))
        self.scores = np.zeros((0, 0))
        self.labels = np.zeros(0, "<U1")
        self.values = np.zeros(0)
        self.ts_ms = np.zeros(0, np.int64)
        self.seen = 0
        self.max_ts_ms = _NO_TS
        self.callers: dict[str, int] = {}

    def append(self, view: ModelView, at: I64, labels: StrArray, values: F64, ts: I64) -> None:
        self.feature_names, self.categorical = view.feature_names, view.categorical
        self.score_labels = view.score_labels
        self.features = _stack(self.features, view.features[at])
        self.scores = _stack(self.scores, view.scores[at])
        self.labels = np.concatenate([self.labels, labels.astype(str)])
        self.values = np.concatenate([self.values, values])
        self.ts_ms = np.concatenate([self.ts_ms, ts])


def _stack(old: F64, new: F64) -> F64:
    width = max(old.shape[1], new.shape[1])
    out = np.full((old.shape[0] + new.shape[0], width), np.nan)
    out[: old.shape[0], : old.shape[1]] = old
    out[old.shape[0] :, : new.shape[1]] = new
    return out


class ReferenceStore:
    """Builds one reference per (model, model_version) from its first events (module doc).

    >>> store = ReferenceStore(n_events=2000)
    >>> store.cap, store.seen_limit
    (100, 10000)
    """

    def __init__(
        self,
        n_events: int = 2000,
        max_caller_share: float = 0.05,
        sample_size: int = 2000,
        bins: int = 10,
        score_types: Mapping[str, str] | None = None,
        seen_limit_factor: int = 5,
    ) -> None:
        if n_events < 1 or bins < 1 or sample_size < 0 or seen_limit_factor < 1:
            raise ValueError(
                "expected n_events >= 1, bins >= 1, sample_size >= 0, seen_limit_factor >= 1; "
                f"found {n_events}, {bins}, {sample_size}, {seen_limit_factor}"
            )
        if not 0.0 < max_caller_share <= 1.0:
            raise ValueError(f"max_caller_share must be in (0, 1], found {max_caller_share}")
        bad = {m: t for m, t in (score_types or {}).items() if t not in SCORE_TYPES}
        if bad:
            raise ValueError(f"unknown score_type {bad}; expected one of {', '.join(SCORE_TYPES)}")
        self.n_events = n_events
        self.max_caller_share = max_caller_share
        self.sample_size = sample_size
        self.bins = bins
        self.score_types = dict(score_types or {})
        self.seen_limit_factor = seen_limit_factor
        self.cap = max(1, int(max_caller_share * n_events + 1e-9))
        self.seen_limit = seen_limit_factor * n_events
        self._frozen: dict[tuple[str, str], Reference] = {}
        self._builders: dict[tuple[str, str], _Builder] = {}

    def get(self, model_id: str, model_version: str) -> Reference | None:
        return self._frozen.get((model_id, model_version))

    def frozen(self) -> dict[tuple[str, str], Reference]:
        return dict(self._frozen)

    def add(self, reference: Reference) -> None:
        """Use ``reference`` (loaded from the store, or set by an operator) for its version."""
        key = (reference.model_id, reference.model_version)
        self._frozen[key] = reference
        self._builders.pop(key, None)

    def update(self, batch: EventBatch, views: Mapping[str, ModelView]) -> list[Reference]:
        """Feed the batch's events to the builders; the references that froze in it."""
        out: list[Reference] = []
        ok = batch.status < 400
        for model in sorted(views):
            view = views[model]
            versions, inverse = np.unique(
                batch.model_version[view.rows].astype(str), return_inverse=True
            )
            for i, version in enumerate(versions.tolist()):
                key = (model, str(version))
                at = np.flatnonzero((inverse == i) & ok[view.rows])
                if key in self._frozen or at.size == 0:
                    continue
                builder = self._builders.setdefault(key, _Builder())
                if self._feed(builder, batch, view, at):
                    reference = self._freeze(key, self._builders.pop(key))
                    self._frozen[key] = reference
                    out.append(reference)
        return out

    def _feed(self, b: _Builder, batch: EventBatch, view: ModelView, at: I64) -> bool:
        """Accept events of ``view`` rows ``at`` under the per-caller cap; True if it froze."""
        rows = view.rows[at]
        n = rows.size
        callers, inverse = np.unique(batch.api_key_id[rows].astype(str), return_inverse=True)
        names = callers.tolist()
        prior = np.fromiter((b.callers.get(c, 0) for c in names), np.int64, len(names))
        order = np.argsort(inverse, kind="stable")
        grouped = inverse[order]
        rank = np.empty(n, np.int64)  # how many earlier events of the same caller in this batch
        rank[order] = np.arange(n) - np.searchsorted(grouped, grouped, side="left")
        accept = prior[inverse] + rank < self.cap
        accepted = b.ts_ms.size + np.cumsum(accept)
        seen = b.seen + np.arange(1, n + 1)
        done = np.flatnonzero((accepted >= self.n_events) | (seen >= self.seen_limit))
        stop = int(done[0]) + 1 if done.size else n
        take = np.flatnonzero(accept[:stop])
        ts = batch.ts_ms[rows]
        b.seen += stop
        b.max_ts_ms = max(b.max_ts_ms, int(ts[:stop].max()))
        added = np.bincount(inverse[take], minlength=len(names))
        for i in np.flatnonzero(added).tolist():
            b.callers[names[i]] = int(prior[i] + added[i])
        b.append(
            view, at[take], batch.output_label[rows[take]], batch.output_value[rows[take]], ts[take]
        )
        return bool(done.size)

    def _freeze(self, key: tuple[str, str], b: _Builder) -> Reference:
        width = _used_width(b.features)
        features = b.features[:, :width]
        n_labels = _used_width(b.scores)
        scores, labels = b.scores[:, :n_labels], b.score_labels[:n_labels]
        score_type = self.score_types.get(key[0]) or infer_score_type(scores, b.values)
        positive = positive_label(labels) if score_type == "probability" and n_labels == 2 else ""
        layout, counts, value_range, channel_values = build_channels(
            score_type, labels, positive, scores, b.values, b.labels.astype(object), self.bins
        )
        f_edges, f_codes, f_counts, missing = self._feature_histograms(
            features, b.categorical[:width]
        )
        n = b.ts_ms.size
        sample = (np.arange(min(self.sample_size, n)) * n) // max(min(self.sample_size, n), 1)
        per_caller = list(b.callers.values())
        return Reference(
            model_id=key[0],
            model_version=key[1],
            n_events=n,
            events_seen=b.seen,
            complete=n >= self.n_events,
            score_type=score_type,
            score_labels=labels,
            positive_label=positive,
            feature_names=b.feature_names[:width],
            categorical=b.categorical[:width],
            sample_features=_f32(features[sample]),
            sample_scores=_f32(scores[sample]),
            sample_channels=_f32(channel_values[sample]),
            channels=layout.names,
            channel_columns=layout.columns,
            channel_categories=layout.categories,
            channel_edges=layout.edges,
            channel_counts=counts,
            channel_range=value_range,
            feature_edges=f_edges,
            feature_codes=f_codes,
            feature_counts=f_counts,
            feature_missing=missing,
            callers=len(per_caller),
            max_caller_events=max(per_caller, default=0),
            capped_callers=tuple(sorted(c for c, k in b.callers.items() if k >= self.cap)),
            first_ts_ms=int(b.ts_ms.min()) if n else _NO_TS,
            last_ts_ms=b.max_ts_ms,
        )

    def _feature_histograms(
        self, features: F64, categorical: tuple[bool, ...]
    ) -> tuple[tuple[F64, ...], tuple[I64, ...], tuple[I64, ...], I64]:
        edges: list[F64] = []
        codes: list[I64] = []
        counts: list[I64] = []
        for j, is_cat in enumerate(categorical):
            col = features[:, j]
            present = col[~np.isnan(col)]
            if is_cat:
                values, count = np.unique(present.astype(np.int64), return_counts=True)
                edges.append(np.zeros(0))
                codes.append(values.astype(np.int64))
                counts.append(count.astype(np.int64))
            else:
                e = quantile_edges(present, self.bins)
                edges.append(e)
                codes.append(np.zeros(0, np.int64))
                counts.append(_histogram(present, e))
        missing = np.isnan(features).sum(axis=0).astype(np.int64)
        return tuple(edges), tuple(codes), tuple(counts), missing

    def snapshot(self) -> bytes:
        """The in-progress builders (at most ``n_events`` rows each), deterministic bytes."""
        builders: list[dict[str, Any]] = []
        arrays: dict[str, npt.NDArray[Any]] = {}
        for i, (key, b) in enumerate(sorted(self._builders.items())):
            builders.append(
                {
                    "key": key,
                    "feature_names": b.feature_names,
                    "categorical": b.categorical,
                    "score_labels": b.score_labels,
                    "seen": b.seen,
                    "max_ts_ms": b.max_ts_ms,
                    "callers": sorted(b.callers.items()),
                }
            )
            for name in ("features", "scores", "labels", "values", "ts_ms"):
                arrays[f"{i}.{name}"] = getattr(b, name)
        meta = orjson.dumps({"format": 1, "builders": builders})
        return npz_bytes({"meta": np.frombuffer(meta, np.uint8), **arrays})

    def restore(self, blob: bytes) -> None:
        """Replace the in-progress builders with those of a :meth:`snapshot`."""
        arrays = npz_load(blob)
        meta = orjson.loads(arrays["meta"].tobytes())
        if meta["format"] != 1:
            raise ValueError("unknown reference-builder snapshot format; expected 1")
        self._builders = {}
        for i, state in enumerate(meta["builders"]):
            b = _Builder()
            b.feature_names = tuple(state["feature_names"])
            b.categorical = tuple(state["categorical"])
            b.score_labels = tuple(state["score_labels"])
            b.seen, b.max_ts_ms = state["seen"], state["max_ts_ms"]
            b.callers = {c: k for c, k in state["callers"]}
            for name in ("features", "scores", "labels", "values", "ts_ms"):
                setattr(b, name, arrays[f"{i}.{name}"])
            self._builders[(state["key"][0], state["key"][1])] = b


_F32_MAX = float(np.finfo(np.float32).max)


def _f32(values: F64) -> npt.NDArray[np.float32]:
    """Samples as float32, values past its range held at its largest (a valid 1e308 must not
    become infinity and break the bins built from the sample); NaN stays NaN."""
    return np.clip(values, -_F32_MAX, _F32_MAX).astype(np.float32)
