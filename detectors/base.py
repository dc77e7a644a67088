"""The detector interface, its inputs and outputs, and keyed state as numpy columns.

A detector is a small object (river's shape): hyperparameters in the constructor, ``update`` on
a whole batch, ``advance`` when event time moves on, ``snapshot``/``restore``/``reset``/``clone``.
It is pure: no I/O, no clocks, no logging. All keys of a batch are updated at once; state lives
in :class:`KeyedColumns`, one row per slot of the shared :class:`~detectors.keyed.slots.KeySlots`
map.

Outputs are values: findings are rows of the batch with a label, score and evidence; alerts are
episode changes (an episode opens when a key's decision first crosses its threshold and closes
when the detector decides it is over); window metrics are numbers per model and window.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from detectors.keyed.slots import KeySlots
from detectors.models.routing import ModelView
from schemas.batch import EventBatch

if TYPE_CHECKING:
    from detectors.models.reference import Reference
    from detectors.models.reference_store import Building

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
StrArray = npt.NDArray[np.object_]

Severity = Literal["info", "low", "medium", "high", "critical"]
NONE = int(np.iinfo(np.int64).min)  # an empty int64 cell of keyed state: no time, no episode
ENTITY_TYPES = ("api_key", "client_ip", "session", "tenant", "model", "feature", "global")


class KeySpace:
    """The key -> slot maps of one worker, one per entity type."""

    def __init__(self, max_keys: int = 2_000_000) -> None:
        self.max_keys = max_keys
        self.maps: dict[str, KeySlots] = {}

    def __getitem__(self, entity_type: str) -> KeySlots:
        if entity_type not in self.maps:
            self.maps[entity_type] = KeySlots(entity_type, self.max_keys)
        return self.maps[entity_type]


def entity_keys(events: EventBatch, entity_type: str) -> StrArray:
    """The entity key of every event. Client IPs and sessions spread over partitions, so their
    state is per (partition, entity) (docs/architecture.md): the key carries the partition."""
    if entity_type == "api_key":
        return events.api_key_id
    if entity_type in ("client_ip", "session"):
        col = events.client_ip if entity_type == "client_ip" else events.session_id
        keys = [f"{p}|{c}" for p, c in zip(events.partition.tolist(), col.tolist(), strict=True)]
        out: StrArray = np.empty(len(keys), object)
        out[:] = keys
        return out
    if entity_type == "model":
        return events.model_id
    if entity_type == "tenant":
        return events.tenant
    raise ValueError(f"no per-event key for entity type {entity_type!r}")


def entity_name(entity_type: str, key: str) -> str:
    """The entity as analysts see it: the partition prefix of per-partition keys removed."""
    if entity_type in ("client_ip", "session"):
        return key.split("|", 1)[1]
    return key


@dataclass(frozen=True, slots=True)
class DetectorInput:
    """One batch as a detector sees it: events in arrival order, and slots per entity type."""

    events: EventBatch
    slots: Mapping[str, I64]
    keyspace: KeySpace
    watermark_ms: int  # the worker's watermark before this batch
    views: Mapping[str, ModelView] = field(default_factory=dict)  # per model, stable columns
    references: Mapping[tuple[str, str], Reference] = field(default_factory=dict)
    # versions without a reference yet: the rows so far (good for a scale, not for
    # distributions), and how far each build is
    provisional: Mapping[tuple[str, str], Reference] = field(default_factory=dict)
    building: Mapping[tuple[str, str], Building] = field(default_factory=dict)
    # (name, what is off without a reference) of the pipeline's detectors that need one
    reference_users: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Findings:
    """Per-event verdicts: ``rows`` index the batch given to ``update``."""

    rows: I64
    label: StrArray
    score: F64
    evidence: StrArray  # compact JSON text per row, already redacted


@dataclass(frozen=True, slots=True)
class AlertChange:
    """An alert episode opened, grew or closed, in event time."""

    entity_type: str
    entity: str
    model_id: str
    tenant: str
    status: Literal["firing", "resolved"]
    ts_ms: int  # event time at which the decision crossed its threshold (also when resolved)
    episode_start_ms: int
    first_seen_ms: int
    last_seen_ms: int
    score: float
    threshold: float
    severity: Severity
    title: str
    summary: str
    evidence: Mapping[str, Any]
    event_count: int
    sample_event_ids: tuple[str, ...]
    linked_entities: tuple[tuple[str, str], ...] = ()
    detector: str = ""  # filled in by the worker from the detector's name
    resolved_ms: int | None = None  # event time at which the condition cleared


@dataclass(frozen=True, slots=True)
class WindowMetric:
    model_id: str
    metric: str
    window_start_ms: int
    window_end_ms: int
    value: float
    feature: str = ""
    event_count: int = 0
    detector: str = ""


@dataclass(frozen=True, slots=True)
class Output:
    findings: tuple[Findings, ...] = ()
    alerts: tuple[AlertChange, ...] = ()
    metrics: tuple[WindowMetric, ...] = ()

    def __add__(self, other: Output) -> Output:
        return Output(
            self.findings + other.findings,
            self.alerts + other.alerts,
            self.metrics + other.metrics,
        )


EMPTY = Output()


@dataclass(frozen=True, slots=True)
class StateRows:
    """Immutable rows of keyed state: ``data[i]`` is the state of ``keys[i]``."""

    entity_type: str
    keys: tuple[str, ...]
    partition: npt.NDArray[np.int32]
    data: npt.NDArray[np.void]  # structured array, one field per state column


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a detector saves at a checkpoint: changed keyed rows, and its model-level state."""

    keyed: tuple[StateRows, ...] = ()
    deleted: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (entity_type, keys) evicted
    model: bytes | None = None  # whole model-level state, small; None if unchanged
    # per-key state of variable size (an open episode's samples and evidence), saved and loaded
    # with the key's partition like ``keyed``: (entity_type, key, partition, blob); a None blob
    # deletes a saved one
    extras: tuple[tuple[str, str, int, bytes | None], ...] = ()


@runtime_checkable
class Detector(Protocol):
    name: ClassVar[str]
    version: ClassVar[str]
    atlas: ClassVar[tuple[str, ...]]
    owasp: ClassVar[tuple[str, ...]]
    entity_types: ClassVar[tuple[str, ...]]
    # what the detector does while its model has no reference ("" when it does not need one)
    without_reference: ClassVar[str]

    def update(self, batch: DetectorInput) -> Output: ...
    def advance(self, watermark_ms: int) -> Output: ...
    def evict(self, entity_type: str, slots: I64) -> None: ...
    def reset(self) -> None: ...
    def snapshot(self, keyspace: KeySpace) -> Snapshot: ...
    def restore(self, snapshot: Snapshot, keyspace: KeySpace) -> None: ...
    def clone(self) -> Detector: ...


class KeyedColumns:
    """Per-key state of one detector and entity type as numpy columns indexed by slot.

    >>> t = KeyedColumns({"count": (np.int64, 0), "mean": (np.float64, 0.0)})
    >>> t.ensure(3); t.cols["count"][[0, 2]] += 5; t.mark(np.array([0, 2]))
    >>> t.take_dirty().tolist()
    [0, 2]
    >>> t.take_dirty().tolist()
    []
    """

    def __init__(self, spec: Mapping[str, tuple[Any, Any]]) -> None:
        self.spec = dict(spec)
        self.dtype = np.dtype([(name, dt) for name, (dt, _) in self.spec.items()])
        self.cols: dict[str, npt.NDArray[Any]] = {
            name: np.full(0, default, dt) for name, (dt, default) in self.spec.items()
        }
        self.dirty = np.zeros(0, bool)

    def ensure(self, capacity: int) -> None:
        have = self.dirty.shape[0]
        if capacity <= have:
            return
        grow = max(capacity, 2 * have, 1024)
        for name, (dt, default) in self.spec.items():
            col = np.full(grow, default, dt)
            col[:have] = self.cols[name]
            self.cols[name] = col
        dirty = np.zeros(grow, bool)
        dirty[:have] = self.dirty
        self.dirty = dirty

    def mark(self, slots: npt.NDArray[np.integer[Any]]) -> None:
        self.dirty[slots] = True

    def clear(self, slots: npt.NDArray[np.integer[Any]]) -> None:
        for name, (_, default) in self.spec.items():
            self.cols[name][slots] = default
        self.dirty[slots] = False

    def take_dirty(self) -> I64:
        slots = np.flatnonzero(self.dirty).astype(np.int64)
        self.dirty[:] = False
        return slots

    def rows(self, slots: I64) -> npt.NDArray[np.void]:
        data = np.empty(len(slots), self.dtype)
        for name in self.spec:
            data[name] = self.cols[name][slots]
        data.setflags(write=False)
        return data

    def snapshot(self, keys: KeySlots) -> StateRows:
        slots = self.take_dirty()
        part = keys.partition[slots].copy()
        part.setflags(write=False)
        return StateRows(
            keys.entity_type, tuple(str(k) for k in keys.keys_of(slots)), part, self.rows(slots)
        )

    def restore(self, rows: StateRows, keys: KeySlots) -> None:
        slots = keys.assign(list(rows.keys), rows.partition.tolist())
        self.ensure(keys.capacity)
        # rows read back from the store arrive as raw fixed-width records
        data = rows.data if rows.data.dtype == self.dtype else rows.data.view(self.dtype)
        for name in self.spec:
            self.cols[name][slots] = data[name]

    def reset(self) -> None:
        self.__init__(self.spec)  # type: ignore[misc]


class DetectorBase:
    """Shared plumbing: ``clone()`` from the constructor arguments, defaults for the rest."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    atlas: ClassVar[tuple[str, ...]] = ()
    owasp: ClassVar[tuple[str, ...]] = ()
    entity_types: ClassVar[tuple[str, ...]] = ()
    without_reference: ClassVar[str] = ""

    def _params(self) -> dict[str, Any]:
        sig = inspect.signature(type(self).__init__)
        return {p: copy.deepcopy(getattr(self, p)) for p in sig.parameters if p != "self"}

    def clone(self) -> Any:
        return type(self)(**self._params())

    def advance(self, watermark_ms: int) -> Output:
        return EMPTY

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"


def segment_starts(sorted_keys: npt.NDArray[Any]) -> I64:
    """Start index of each run of equal values in an already sorted array."""
    if sorted_keys.size == 0:
        return np.zeros(0, np.int64)
    change = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
    return np.concatenate([[0], change]).astype(np.int64)


def json_evidence(items: Sequence[Mapping[str, Any]]) -> StrArray:
    """Compact JSON text per row (sorted keys, so replays give the same bytes)."""
    import orjson

    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = orjson.dumps(item, option=orjson.OPT_SORT_KEYS).decode()
    return out
