"""Builders of references: :class:`ReferenceStore` freezes one :class:`Reference` per
(model, model_version) from its first successful events (see :mod:`detectors.models.reference`).

**Poisoning defence, for any number of callers** (:mod:`detectors.models.reference_pool`, argued in
``docs/references.md``): the reference's ``n_events`` rows are split max-min fairly across
callers (``api_key_id``), each caller's rows a uniform sample of its events, and no caller may
hold more than a share that depends on how many callers were seen (all of it alone, at most half
with two, ``1 / sqrt(C)`` beyond four, never below ``max_caller_share``). A model with one caller
gets a reference after exactly ``n_events`` events; callers of similar volume too. A flooding
caller among slow ones waits for the others: there is no limit of events seen at which the
builder gives way. While a version builds, :meth:`ReferenceStore.building` says how far it is
and who is capped (``inferwatch reference list``, ``pipeline.detection_blind``), and
:meth:`ReferenceStore.provisional` offers the rows so far for the signals that need only a
scale (near-duplicate and lattice probing), never for distributions.

Determinism: the same events in the same order give the same reference bytes, however they are
split into batches (feature and label columns are trimmed to those the kept rows use).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from detectors.models.channels import (
    SCORE_TYPES,
    build_channels,
    infer_score_type,
    positive_label,
    quantile_edges,
)
from detectors.models.reference import Reference, npz_bytes, npz_load
from detectors.models.reference_pool import (
    cap_events,
    freeze_point,
    quotas,
    row_hash,
    share_cap,
    water_level,
)
from detectors.models.routing import ModelView
from schemas.batch import EventBatch

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
StrArray = npt.NDArray[np.object_]

_NO_TS = -(2**63)
SNAPSHOT_FORMAT = 2  # 1: first events per caller under a fixed cap, without caller per row
PROVISIONAL_MIN = 256  # pool rows before a provisional reference is offered
_ROWS = ("features", "scores", "labels", "values", "ts_ms", "caller", "hash", "seq")


def _used_width(m: F64) -> int:
    """Columns up to the last one any row uses (later ones came from events not accepted)."""
    used = np.flatnonzero(~np.isnan(m).all(axis=0))
    return int(used[-1]) + 1 if used.size else 0


def _histogram(values: F64, edges: F64) -> I64:
    bins = np.searchsorted(edges, values, side="left")
    return np.bincount(bins, minlength=edges.size + 1).astype(np.int64)


@dataclass(frozen=True, slots=True)
class Building:
    """A (model, version) whose reference is still being built."""

    model_id: str
    model_version: str
    n: int  # events the reference would hold now: the fair split under the share cap
    target: int  # events it freezes on
    callers: int
    capped: tuple[tuple[str, int], ...]  # callers over the cap (events seen), largest first
    seen: int
    first_ts_ms: int
    last_ts_ms: int
    largest_share: float  # the largest caller's share of the events seen
    allowed_share: float  # the share one caller may hold with this many callers

    @property
    def reason(self) -> str:
        """Why it has not frozen yet, in one line."""
        if not self.capped:
            return f"{self.n:,} of {self.target:,} events so far"
        who = ", ".join(name for name, _ in self.capped[:3])
        return (
            f"{self.n:,} of {self.target:,}: {who} sent {self.largest_share:.0%} of the "
            f"{self.seen:,} events, at most {self.allowed_share:.0%} may come from one caller "
            f"of {self.callers}; waiting for the other callers' events"
        )


class _Builder:
    """The pool of one (model, version): its rows and, per caller, the events seen."""

    def __init__(self) -> None:
        self.feature_names: tuple[str, ...] = ()
        self.categorical: tuple[bool, ...] = ()
        self.score_labels: tuple[str, ...] = ()
        self.features = np.zeros((0, 0))
        self.scores = np.zeros((0, 0))
        self.labels = np.zeros(0, "<U1")
        self.values = np.zeros(0)
        self.ts_ms = np.zeros(0, np.int64)
        self.caller = np.zeros(0, np.int64)  # index into names
        self.hash = np.zeros(0, np.uint32)
        self.seq = np.zeros(0, np.int64)  # arrival number in this builder
        self.names: list[str] = []  # callers in the order they were first seen
        self.index: dict[str, int] = {}
        self.counts = np.zeros(0, np.int64)  # events seen per caller
        self.seen = 0
        self.first_ts_ms = _NO_TS
        self.max_ts_ms = _NO_TS
        self.provisional: Reference | None = None  # not saved: rebuilt from the pool

    def append(
        self, view: ModelView, at: I64, labels: StrArray, values: F64, ts: I64, caller: I64,
        hashes: npt.NDArray[np.uint32],
    ) -> None:  # fmt: skip
        self.feature_names, self.categorical = view.feature_names, view.categorical
        self.score_labels = view.score_labels
        self.features = _stack(self.features, view.features[at])
        self.scores = _stack(self.scores, view.scores[at])
        self.labels = np.concatenate([self.labels, labels.astype(str)])
        self.values = np.concatenate([self.values, values])
        self.ts_ms = np.concatenate([self.ts_ms, ts])
        self.caller = np.concatenate([self.caller, caller])
        self.hash = np.concatenate([self.hash, hashes])
        self.seq = np.concatenate([self.seq, self.seen + np.arange(at.size, dtype=np.int64)])

    def keep(self, quota: I64) -> npt.NDArray[np.bool_]:
        """Rows within each caller's ``quota``, the smallest hashes first (a uniform sample of
        the caller's events); keeps them and returns the mask."""
        order = np.lexsort((self.seq, self.hash, self.caller))
        grouped = self.caller[order]
        rank = np.empty(order.size, np.int64)
        rank[order] = np.arange(order.size) - np.searchsorted(grouped, grouped, side="left")
        mask = rank < quota[self.caller]
        if not mask.all():
            for name in _ROWS:
                setattr(self, name, getattr(self, name)[mask])
        return mask


def _stack(old: F64, new: F64) -> F64:
    width = max(old.shape[1], new.shape[1])
    out = np.full((old.shape[0] + new.shape[0], width), np.nan)
    out[: old.shape[0], : old.shape[1]] = old
    out[old.shape[0] :, : new.shape[1]] = new
    return out


class ReferenceStore:
    """Builds one reference per (model, model_version) from its first events (module doc).

    >>> store = ReferenceStore(n_events=2000)
    >>> [store.cap(c) for c in (1, 2, 6, 20, 400)]
    [2000, 1000, 816, 447, 100]
    """

    def __init__(
        self,
        n_events: int = 2000,
        max_caller_share: float = 0.05,
        sample_size: int = 2000,
        bins: int = 10,
        score_types: Mapping[str, str] | None = None,
    ) -> None:
        if n_events < 1 or bins < 1 or sample_size < 0:
            raise ValueError(
                "expected n_events >= 1, bins >= 1, sample_size >= 0; "
                f"found {n_events}, {bins}, {sample_size}"
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
        self._frozen: dict[tuple[str, str], Reference] = {}
        self._builders: dict[tuple[str, str], _Builder] = {}

    def cap(self, callers: int) -> int:
        """Events of one caller a reference may hold when ``callers`` were seen."""
        return cap_events(callers, self.max_caller_share, self.n_events)

    def get(self, model_id: str, model_version: str) -> Reference | None:
        return self._frozen.get((model_id, model_version))

    def frozen(self) -> dict[tuple[str, str], Reference]:
        return dict(self._frozen)

    def provisional(self) -> dict[tuple[str, str], Reference]:
        """Unfrozen versions with at least ``PROVISIONAL_MIN`` rows: a reference of the rows so
        far (``complete=False``), rebuilt each time the pool doubles. Good for a scale (the
        distance between two natural queries), not for distributions."""
        return {k: b.provisional for k, b in self._builders.items() if b.provisional is not None}

    def building(self) -> dict[tuple[str, str], Building]:
        """Every unfrozen version: how far it is and why it has not frozen."""
        out = {}
        for key, b in sorted(self._builders.items()):
            callers = int(np.count_nonzero(b.counts))
            cap = self.cap(callers)
            over = np.flatnonzero(b.counts > cap)
            over = over[np.argsort(-b.counts[over], kind="stable")]
            total = max(int(b.counts.sum()), 1)
            out[key] = Building(
                key[0], key[1], min(self.n_events, int(np.minimum(b.counts, cap).sum())),
                self.n_events, callers, tuple((b.names[i], int(b.counts[i])) for i in over[:5]),
                b.seen, b.first_ts_ms, b.max_ts_ms,
                float(b.counts.max()) / total if b.counts.size else 0.0,
                share_cap(callers, self.max_caller_share),
            )  # fmt: skip
        return out

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
                    reference = self._final(key, self._builders.pop(key))
                    self._frozen[key] = reference
                    out.append(reference)
                else:
                    self._offer_provisional(key, builder)
        return out

    def _offer_provisional(self, key: tuple[str, str], b: _Builder) -> None:
        last = b.provisional.n_events if b.provisional is not None else 0
        if b.ts_ms.size >= max(PROVISIONAL_MIN, 2 * last):
            b.provisional = self._build(key, b, complete=False)

    def _feed(self, b: _Builder, batch: EventBatch, view: ModelView, at: I64) -> bool:
        """Offer the events of ``view`` rows ``at`` to the pool; True if it froze."""
        rows = view.rows[at]
        ids = batch.api_key_id[rows].astype(str)
        uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        for name in uniq[np.argsort(first, kind="stable")].tolist():
            if name not in b.index:
                b.index[name] = len(b.names)
                b.names.append(name)
        caller = np.array([b.index[u] for u in uniq.tolist()], np.int64)[inverse]
        prior = np.zeros(len(b.names), np.int64)
        prior[: b.counts.size] = b.counts
        callers_before = int(np.count_nonzero(prior))
        k = freeze_point(prior, caller, self.n_events, self.max_caller_share, callers_before)
        stop = rows.size if k is None else k + 1
        take = rows[:stop]
        ts = batch.ts_ms[take]
        b.append(
            view, at[:stop], batch.output_label[take], batch.output_value[take], ts,
            caller[:stop], row_hash(batch.event_id[take]),
        )  # fmt: skip
        b.counts = prior + np.bincount(caller[:stop], minlength=prior.size)
        b.seen += stop
        b.max_ts_ms = max(b.max_ts_ms, int(ts.max()))
        low = int(ts.min())
        b.first_ts_ms = low if b.first_ts_ms == _NO_TS else min(b.first_ts_ms, low)
        if k is None and int(b.counts.sum()) > self.n_events:
            b.keep(np.minimum(b.counts, water_level(b.counts, self.n_events)))
        return k is not None

    def _final(self, key: tuple[str, str], b: _Builder) -> Reference:
        q = quotas(b.counts, self.n_events)
        b.keep(q)
        ref = self._build(key, b, complete=True)
        trimmed = sorted(b.names[i] for i in np.flatnonzero(q < b.counts).tolist())
        return dataclasses.replace(
            ref,
            callers=int(np.count_nonzero(q)),
            max_caller_events=int(q.max()),
            capped_callers=tuple(trimmed),
        )

    def _build(self, key: tuple[str, str], b: _Builder, complete: bool) -> Reference:
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
        per_caller = np.bincount(b.caller, minlength=len(b.names))
        return Reference(
            model_id=key[0],
            model_version=key[1],
            n_events=n,
            events_seen=b.seen,
            complete=complete,
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
            callers=int(np.count_nonzero(per_caller)),
            max_caller_events=int(per_caller.max(initial=0)),
            capped_callers=(),
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
        """The in-progress builders (their pools), deterministic bytes."""
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
                    "first_ts_ms": b.first_ts_ms,
                    "max_ts_ms": b.max_ts_ms,
                    "names": b.names,
                    "counts": b.counts.tolist(),
                }
            )
            for name in _ROWS:
                arrays[f"{i}.{name}"] = getattr(b, name)
        meta = orjson.dumps(
            {
                "format": SNAPSHOT_FORMAT,
                "n_events": self.n_events,
                "max_caller_share": self.max_caller_share,
                "builders": builders,
            }
        )
        return npz_bytes({"meta": np.frombuffer(meta, np.uint8), **arrays})

    def restore(self, blob: bytes) -> None:
        """Replace the in-progress builders with those of a :meth:`snapshot`. Builders saved in
        format 1 (the fixed per-caller cap) cannot be converted: their versions start again."""
        arrays = npz_load(blob)
        meta = orjson.loads(arrays["meta"].tobytes())
        self._builders = {}
        if meta["format"] == 1:
            return
        if meta["format"] != SNAPSHOT_FORMAT:
            raise ValueError(
                f"unknown reference-builder snapshot format {meta['format']}; expected 1 or 2"
            )
        for i, state in enumerate(meta["builders"]):
            b = _Builder()
            b.feature_names = tuple(state["feature_names"])
            b.categorical = tuple(state["categorical"])
            b.score_labels = tuple(state["score_labels"])
            b.seen, b.max_ts_ms = state["seen"], state["max_ts_ms"]
            b.first_ts_ms = state["first_ts_ms"]
            b.names = list(state["names"])
            b.index = {name: j for j, name in enumerate(b.names)}
            b.counts = np.asarray(state["counts"], np.int64)
            for name in _ROWS:
                setattr(b, name, arrays[f"{i}.{name}"])
            self._builders[(state["key"][0], state["key"][1])] = b


def building_of(blob: bytes) -> list[Building]:
    """The builders' state in a saved :meth:`ReferenceStore.snapshot` (for ``reference list``)."""
    meta = orjson.loads(npz_load(blob)["meta"].tobytes())
    if meta["format"] != SNAPSHOT_FORMAT:
        return []
    store = ReferenceStore(meta["n_events"], meta["max_caller_share"])
    store.restore(blob)
    return list(store.building().values())


_F32_MAX = float(np.finfo(np.float32).max)


def _f32(values: F64) -> npt.NDArray[np.float32]:
    """Samples as float32, values past its range held at its largest (a valid 1e308 must not
    become infinity and break the bins built from the sample); NaN stays NaN."""
    return np.clip(values, -_F32_MAX, _F32_MAX).astype(np.float32)
