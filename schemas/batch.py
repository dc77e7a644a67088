"""Columnar form of a batch of decoded inference events (wire schema v1).

The decoder turns raw messages into one :class:`EventBatch`; detectors and sinks only ever see
columns. Conventions for missing optional values: ``""`` for strings, ``NaN`` for floats, ``-1``
for counts, ``200`` for ``status``.

Features are batch-local: ``num_names`` / ``num_values`` hold every numeric feature seen in the
batch (``input.features`` entries with numeric or boolean values), ``cat_names`` / ``cat_codes`` /
``cat_values`` the string-valued ones, dictionary-encoded. ``vector`` holds ``input.vector``
padded with NaN to the longest vector of the batch. A stable per-model feature index is the job of
the router, which maps these batch-local columns onto each model's own index.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import numpy.typing as npt

StrArray = npt.NDArray[np.object_]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]

STRING_COLUMNS = (
    "event_id",
    "model_id",
    "api_key_id",
    "model_version",
    "tenant",
    "client_ip",
    "user_agent",
    "session_id",
    "output_label",
    "finish_reason",
    "ground_truth",
)
TEXT_COLUMNS = ("prompt", "output_text")


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Valid events of one batch as columns; row ``i`` of every column is event ``i``."""

    event_id: StrArray
    ts_ms: I64
    model_id: StrArray
    api_key_id: StrArray
    model_version: StrArray
    tenant: StrArray
    client_ip: StrArray
    user_agent: StrArray
    session_id: StrArray
    status: I32
    latency_ms: F64
    tokens_in: I64
    tokens_out: I64
    # input
    num_names: tuple[str, ...]
    num_values: F64  # (n, len(num_names)), NaN where absent
    cat_names: tuple[str, ...]
    cat_codes: I32  # (n, len(cat_names)), -1 where absent
    cat_values: tuple[tuple[str, ...], ...]  # dictionary per categorical feature
    vector: F64  # (n, max vector length in batch), NaN padded
    vector_len: I32
    prompt: StrArray  # prompt, or the messages' contents joined by newlines; "" if absent
    # output
    output_label: StrArray
    score_labels: tuple[str, ...]
    scores: F64  # (n, len(score_labels)), NaN where absent
    output_value: F64
    output_text: StrArray
    finish_reason: StrArray
    ground_truth: StrArray
    attributes: StrArray  # JSON object text, "" if absent
    # where each event came from; set by the source, not the decoder
    partition: I32
    offset: I64
    payload_bytes: I32
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.ts_ms.shape[0])

    def take(self, rows: npt.NDArray[np.integer[Any]]) -> EventBatch:
        """The sub-batch of ``rows`` (indices or a boolean mask), same feature columns."""
        kwargs: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            kwargs[f.name] = value[rows] if isinstance(value, np.ndarray) else value
        return EventBatch(**kwargs)


def empty_batch() -> EventBatch:
    """A batch with no events."""
    s = np.empty(0, dtype=object)
    return EventBatch(
        event_id=s,
        ts_ms=np.empty(0, np.int64),
        model_id=s,
        api_key_id=s,
        model_version=s,
        tenant=s,
        client_ip=s,
        user_agent=s,
        session_id=s,
        status=np.empty(0, np.int32),
        latency_ms=np.empty(0, np.float64),
        tokens_in=np.empty(0, np.int64),
        tokens_out=np.empty(0, np.int64),
        num_names=(),
        num_values=np.empty((0, 0), np.float64),
        cat_names=(),
        cat_codes=np.empty((0, 0), np.int32),
        cat_values=(),
        vector=np.empty((0, 0), np.float64),
        vector_len=np.empty(0, np.int32),
        prompt=s,
        output_label=s,
        score_labels=(),
        scores=np.empty((0, 0), np.float64),
        output_value=np.empty(0, np.float64),
        output_text=s,
        finish_reason=s,
        ground_truth=s,
        attributes=s,
        partition=np.empty(0, np.int32),
        offset=np.empty(0, np.int64),
        payload_bytes=np.empty(0, np.int32),
    )


@dataclass(frozen=True, slots=True)
class Reject:
    """One message the decoder refused, with a machine-readable reason and a readable detail."""

    index: int  # position of the message in the decoded batch
    reason: str  # one of REJECT_REASONS
    detail: str
    raw: bytes


REJECT_REASONS = (
    "bad_json",
    "non_finite_number",
    "duplicate_key",
    "wrong_type",
    "missing_field",
    "unknown_schema_version",
    "oversize_message",
    "oversize_text",
    "oversize_vector",
    "bad_timestamp",
    "conflicting_event_id",  # not the decoder's: a stored event_id with other bytes
)


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits of the decoder; the defaults are safe for production."""

    max_message_bytes: int = 1 << 20
    max_text_bytes: int = 256 << 10
    max_vector_dim: int = 4096


@dataclass(frozen=True, slots=True)
class Decoded:
    """What the decoder returns for one batch of raw messages."""

    batch: EventBatch
    rows: I64  # for each row of ``batch``, the index of its message in the input
    rejects: tuple[Reject, ...]
