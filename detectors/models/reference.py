"""Reference profiles per (model, model_version), built from each version's first events.

Drift detectors compare live traffic with what a model version looked like when it started.
:class:`~detectors.models.reference_store.ReferenceStore` feeds the first successful events
(``status < 400``) of every (model, model_version), in arrival order, into a builder and freezes
a :class:`Reference`. It is pure: the worker persists new references (``to_bytes``) and the
builders (``snapshot``). The prediction channels and their bins are in
:mod:`detectors.models.channels`.
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

from detectors.models.channels import Channels
from schemas.batch import EventBatch

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

FORMAT = 2  # 1: one prediction score per event (the maximum probability of multi-class models)
_RAGGED = {"feature_edges": np.float64, "feature_codes": np.int64, "feature_counts": np.int64}


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
    channels: tuple[str, ...]  # "score", "score:<label>", "label" (detectors.models.channels)
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


def npz_bytes(arrays: Mapping[str, npt.NDArray[Any]], deflate: bool = True) -> bytes:
    """``np.savez_compressed`` with a fixed timestamp, so equal arrays give equal bytes; deflate
    level 1, not 6: a checkpoint's drift state compresses 5x faster for blobs 19% larger.
    ``deflate=False`` stores the arrays as they are (``np.savez``): for state written at every
    checkpoint, which the store compresses again in its columns."""
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            data = io.BytesIO()
            np.lib.format.write_array(data, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(info, data.getbuffer(), method, compresslevel=1 if deflate else None)
    return buf.getvalue()


def npz_load(blob: bytes) -> dict[str, npt.NDArray[Any]]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}
