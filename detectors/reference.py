"""Reference profiles per (model, model_version), built from each version's first events.

Drift detectors compare live traffic with what a model version looked like when it started.
:class:`ReferenceStore` feeds the first successful events (``status < 400``) of every
(model, model_version), in arrival order, into a builder and freezes a :class:`Reference`. It is
pure: the worker persists new references (``to_bytes``) and the builders (``snapshot``).

**Poisoning defence.** An attacker who floods a new model version can try to make its reference
look like their traffic. No caller (``api_key_id``) may contribute more than
``cap = floor(max_caller_share * n_events)`` events (100 of 2,000 by default); a caller's later
events are skipped, not counted. A builder freezes at whichever comes first:

- ``n_events`` accepted events (``complete=True``), or
- ``seen_limit_factor * n_events`` events seen, accepted or skipped (``complete=False``): with
  fewer than ``1 / max_caller_share`` callers the reference could otherwise never fill. It then
  holds what it has, and ``capped_callers`` names the callers that hit the cap, so an operator
  can judge it and replace it (:meth:`ReferenceStore.add`).

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

Determinism: the same events in the same order give the same reference bytes, however they are
split into batches (feature and label columns are trimmed to those the accepted rows use).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from detectors.routing import ModelView
from schemas.batch import EventBatch

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
StrArray = npt.NDArray[np.object_]

SCORE_TYPES = ("probability", "logit", "label_only", "regression", "llm")
LABEL_CHANNEL = "label"
MAX_CLASS_CHANNELS = 32
FORMAT = 2  # 1: one prediction score per event (the maximum probability of multi-class models)
_POSITIVE = frozenset({"1", "true", "yes", "positive", "pos"})
_RAGGED = {"feature_edges": np.float64, "feature_codes": np.int64, "feature_counts": np.int64}
_NO_TS = -(2**63)


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
            elif column in score_labels:
                out[:, j] = scores[:, score_labels.index(column)]
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


@dataclass(frozen=True, eq=False)
class Reference:
    """What one (model, model_version) looked like in its first accepted events."""

    model_id: str
    model_version: str
    n_events: int  # accepted events it was built from
    events_seen: int  # events offered to the builder, including those skipped by the cap
    complete: bool  # froze on n_events accepted; False: on the seen limit
    score_type: str
    score_labels: tuple[str, ...]
    positive_label: str  # the 2-class probability score's label, "" otherwise
    feature_names: tuple[str, ...]
    categorical: tuple[bool, ...]
    sample_features: F32  # (k, len(feature_names)), k <= sample_size, evenly spaced rows
    sample_scores: F32  # (k, len(score_labels))
    sample_channels: F32  # (k, len(channels)); the label channel as its bin number
    channels: tuple[str, ...]  # "score", "score:<label>", "label" (module doc)
    channel_columns: tuple[str, ...]  # the score label each reads; "" output value or label
    channel_categories: tuple[str, ...]  # the label channel's bins, then one for any other
    channel_edges: F64  # (channels, width): interior edges, +inf padding
    channel_counts: I64  # (channels, width + 1): accepted events per bin, zero padding
    channel_range: F64  # (channels, 2): min and max value, NaN for the label channel
    feature_edges: tuple[F64, ...]  # numeric features; empty for categorical ones
    feature_codes: tuple[I64, ...]  # categorical features: the codes counted; empty otherwise
    feature_counts: tuple[I64, ...]
    feature_missing: I64  # accepted events without the feature
    callers: int  # distinct callers among the accepted events
    max_caller_events: int  # accepted events of the largest caller
    capped_callers: tuple[str, ...]  # callers that reached the cap
    first_ts_ms: int  # earliest event time among the accepted events
    last_ts_ms: int  # latest event time among all events the builder consumed

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            for arr in value if f.name in _RAGGED else (value,):
                if isinstance(arr, np.ndarray):
                    arr.setflags(write=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reference) and self.to_bytes() == other.to_bytes()

    __hash__ = None  # type: ignore[assignment]

    @property
    def layout(self) -> Channels:
        return Channels(
            self.score_type,
            self.channels,
            self.channel_columns,
            self.channel_categories,
            self.score_labels,
            self.channel_edges,
        )

    def bins_of(self, batch: EventBatch, rows: I64) -> tuple[I64, F64]:
        """Channel bins (-1 for none) and values of ``rows`` of ``batch``, (rows, channels)."""
        return self.layout.of(batch, rows)

    def to_bytes(self) -> bytes:
        """An ``.npz`` archive (no pickle), byte-identical for equal references."""
        meta: dict[str, Any] = {"format": FORMAT}
        arrays: dict[str, npt.NDArray[Any]] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _RAGGED:
                arrays[f.name] = np.concatenate([np.zeros(0, _RAGGED[f.name]), *value])
                arrays[f.name + ".len"] = np.asarray([a.size for a in value], np.int64)
            elif isinstance(value, np.ndarray):
                arrays[f.name] = value
            else:
                meta[f.name] = value
        arrays["meta"] = np.frombuffer(orjson.dumps(meta, option=orjson.OPT_SORT_KEYS), np.uint8)
        return npz_bytes(arrays)

    @classmethod
    def from_bytes(cls, blob: bytes) -> Reference:
        arrays = npz_load(blob)
        meta = orjson.loads(arrays.pop("meta").tobytes())
        found = meta.pop("format")
        if found != FORMAT:
            raise ValueError(
                f"reference of {meta.get('model_id')!r} version {meta.get('model_version')!r} "
                f"has format {found}, expected {FORMAT} (one histogram per prediction channel); "
                "format 1 kept one score per event and cannot be converted: delete its row "
                "from model_references so the version gets a new reference"
            )
        kwargs: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()
        }
        for name in _RAGGED:
            bounds = np.cumsum(arrays.pop(name + ".len"))[:-1]
            kwargs[name] = tuple(np.split(arrays.pop(name), bounds))
        kwargs.update(arrays)
        return cls(**kwargs)


def npz_bytes(arrays: Mapping[str, npt.NDArray[Any]]) -> bytes:
    """``np.savez_compressed`` with a fixed timestamp, so equal arrays give equal bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def npz_load(blob: bytes) -> dict[str, npt.NDArray[Any]]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def _used_width(m: F64) -> int:
    """Columns up to the last one any row uses (later ones came from events not accepted)."""
    used = np.flatnonzero(~np.isnan(m).all(axis=0))
    return int(used[-1]) + 1 if used.size else 0


def _quantile_edges(values: F64, bins: int) -> F64:
    if values.size == 0:
        return np.zeros(0)
    return np.unique(np.quantile(values, np.linspace(0.0, 1.0, bins + 1)[1:-1]))


def _histogram(values: F64, edges: F64) -> I64:
    bins = np.searchsorted(edges, values, side="left")
    return np.bincount(bins, minlength=edges.size + 1).astype(np.int64)


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
        else _quantile_edges(col[np.isfinite(col)], bins)
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


def _positive_label(labels: tuple[str, ...]) -> str:
    positive = [label for label in labels if label.strip().lower() in _POSITIVE]
    return positive[0] if len(positive) == 1 else labels[-1]


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
        positive = _positive_label(labels) if score_type == "probability" and n_labels == 2 else ""
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
            sample_features=features[sample].astype(np.float32),
            sample_scores=scores[sample].astype(np.float32),
            sample_channels=channel_values[sample].astype(np.float32),
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
                e = _quantile_edges(present, self.bins)
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
