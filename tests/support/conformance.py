"""Shared conformance machinery for every registered detector.

Builds event batches without the decoder, runs a detector the way the worker does (one
``KeySpace`` for slots, ``route`` for per-model views, ``advance`` after each batch), and reduces
outputs to a normal form that two runs of the same stream must agree on however the stream was
cut into batches or checkpointed:

- findings: the set of (event_id, label, score rounded);
- alerts: per alert id (detector, model, entity type, entity, episode start), the change the
  store keeps (``streams.store.rows.alert_version``);
- window metrics: the set of (model, metric, feature, window, value rounded, event count).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors.base import Detector, DetectorInput, KeySpace, Output, Snapshot, entity_keys
from detectors.models.reference import Reference
from detectors.models.reference_store import ReferenceStore
from detectors.models.routing import FeatureIndex, route
from schemas.batch import EventBatch, empty_batch
from streams.store.rows import alert_version

T0_MS = 1_700_000_040_000  # a minute boundary
LATENESS_MS = 60_000
FEATURES = ("f0", "f1", "f2", "f3")
LABELS = ("0", "1")


def make_batch(
    ts_ms: Sequence[int],
    api_key_id: Sequence[str],
    *,
    event_id: Sequence[str] | None = None,
    model_id: Sequence[str] | None = None,
    client_ip: Sequence[str] | None = None,
    tenant: Sequence[str] | None = None,
    session_id: Sequence[str] | None = None,
    partition: Sequence[int] | None = None,
    features: npt.NDArray[np.float64] | None = None,
    scores: npt.NDArray[np.float64] | None = None,
    offset0: int = 0,
) -> EventBatch:
    """An :class:`EventBatch` with every per-event column of the same length (the decoder's
    conventions for what is absent); features f0..f3 and 2-class scores when given."""
    n = len(ts_ms)

    def obj(values: Sequence[str] | None, default: str) -> npt.NDArray[np.object_]:
        out = np.empty(n, dtype=object)
        out[:] = list(values) if values is not None else [default] * n
        return out

    feats = np.full((n, 0), np.nan) if features is None else np.asarray(features, np.float64)
    sc = np.full((n, 0), np.nan) if scores is None else np.asarray(scores, np.float64)
    return dataclasses.replace(
        empty_batch(),
        event_id=obj(event_id, "")
        if event_id is not None
        else obj([f"e{offset0 + i}" for i in range(n)], ""),
        ts_ms=np.asarray(ts_ms, np.int64),
        model_id=obj(model_id, "m0"),
        api_key_id=obj(api_key_id, ""),
        model_version=obj(None, ""),
        tenant=obj(tenant, ""),
        client_ip=obj(client_ip, ""),
        user_agent=obj(None, ""),
        session_id=obj(session_id, ""),
        status=np.full(n, 200, np.int32),
        latency_ms=np.full(n, np.nan),
        tokens_in=np.full(n, -1, np.int64),
        tokens_out=np.full(n, -1, np.int64),
        num_names=FEATURES[: feats.shape[1]],
        num_values=feats,
        cat_codes=np.zeros((n, 0), np.int32),
        vector=np.zeros((n, 0)),
        vector_len=np.zeros(n, np.int32),
        prompt=obj(None, ""),
        output_label=obj(None, ""),
        score_labels=LABELS[: sc.shape[1]],
        scores=sc,
        output_value=np.full(n, np.nan),
        output_text=obj(None, ""),
        finish_reason=obj(None, ""),
        ground_truth=obj(None, ""),
        attributes=obj(None, ""),
        partition=np.asarray(partition if partition is not None else [0] * n, np.int32),
        offset=np.arange(offset0, offset0 + n, dtype=np.int64),
        payload_bytes=np.full(n, 300, np.int32),
    )


def concat(batches: Sequence[EventBatch]) -> EventBatch:
    """Batches with the same feature columns, one after the other."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(EventBatch):
        values = [getattr(b, f.name) for b in batches]
        kwargs[f.name] = np.concatenate(values) if isinstance(values[0], np.ndarray) else values[0]
    return EventBatch(**kwargs)


def split(batch: EventBatch, at: int) -> tuple[EventBatch, EventBatch]:
    idx = np.arange(batch.n)
    return batch.take(idx[:at]), batch.take(idx[at:])


def stream(
    seed: int,
    minutes: int = 20,
    batch_events: int = 400,
    keys: int = 40,
    attack_minute: int | None = 12,
    start_ms: int = T0_MS,
) -> list[EventBatch]:
    """A realistic stream: several models, callers of very different rates (each key on one
    partition, a few IPs per key, some without an IP), features f0..f3 and 2-class scores,
    timestamps non-decreasing up to a few seconds of jitter; with ``attack_minute``, one light
    caller bursts to 200 calls a minute for two minutes, and three minutes later a new caller
    floods at 200 a minute, and model m2's scores shift towards class 0."""
    rng = np.random.default_rng(seed)
    rates = np.round(rng.lognormal(1.5, 1.2, keys), 1) + 0.5  # calls per minute
    ts: list[npt.NDArray[np.int64]] = []
    who: list[npt.NDArray[np.int64]] = []
    for k, rate in enumerate(rates):
        n = rng.poisson(rate * minutes)
        ts.append(np.sort(rng.integers(0, minutes * 60_000, n)))
        who.append(np.full(n, k))
    if attack_minute is not None:
        n = 400
        ts.append(attack_minute * 60_000 + np.sort(rng.integers(0, 120_000, n)))
        who.append(np.full(n, keys))
        ts.append(np.sort(rng.integers(0, minutes * 60_000, minutes)))  # its quiet life
        who.append(np.full(minutes, keys))
        n = 600  # and a caller nobody has seen floods from its first minute
        ts.append((attack_minute + 3) * 60_000 + np.sort(rng.integers(0, 180_000, n)))
        who.append(np.full(n, keys + 1))
    t = np.concatenate(ts)
    k = np.concatenate(who)
    order = np.argsort(t, kind="stable")
    t, k = t[order], k[order]
    shifted = t >= (attack_minute if attack_minute is not None else minutes) * 60_000
    t = start_ms + t - rng.integers(0, 3_000, t.size) * (rng.random(t.size) < 0.2)
    n = t.size
    key_names = [f"key_{i:03d}_{'x' * (i % 3)}" for i in range(keys + 2)]
    ips = [f"10.0.{i // 4}.{i % 4}" for i in range(keys + 2)]
    ip = np.array([ips[(i + (j % 3)) % len(ips)] for j, i in enumerate(k.tolist())], object)
    ip[rng.random(n) < 0.1] = ""
    model = np.array(["m0", "m1", "m2"], object)[rng.integers(0, 3, n)]
    feats = rng.normal(0, 1, (n, 4))
    feats[:, 1] += (model == "m1") * 2.0
    p1 = rng.random(n)
    p1[shifted & (model == "m2")] **= 3
    scores = np.stack([1 - p1, p1], axis=1)
    whole = make_batch(
        t.tolist(),
        [key_names[i] for i in k.tolist()],
        model_id=model.tolist(),
        client_ip=ip.tolist(),
        tenant=[f"t{i % 2}" for i in k.tolist()],
        session_id=[f"s{i}_{j // 50}" for j, i in enumerate(k.tolist())],
        partition=(k % 4).tolist(),
        features=feats,
        scores=scores,
    )
    cuts = [*range(0, n, batch_events), n]
    return [whole.take(np.arange(a, b)) for a, b in itertools.pairwise(cuts)]


def references(seed: int = 99) -> dict[tuple[str, str], Reference]:
    """Frozen references per model, built the worker's way from an hour-earlier stream, so every
    run sees the same ones from its first batch (a reference freezing mid-run would make results
    depend on where batches were cut, through no fault of the detector)."""
    store, index = ReferenceStore(), FeatureIndex()
    for b in stream(seed, attack_minute=None, start_ms=T0_MS - 3_600_000):
        store.update(b, route(b, index))
    return store.frozen()


@dataclass
class Runner:
    """Runs one detector over batches the way the worker does."""

    det: Detector
    keyspace: KeySpace = field(default_factory=KeySpace)
    index: FeatureIndex = field(default_factory=FeatureIndex)
    max_ts: int = np.iinfo(np.int64).min + LATENESS_MS
    log: list[tuple[EventBatch, Output]] = field(default_factory=list)
    references: Mapping[tuple[str, str], Reference] = field(default_factory=dict)
    provisional: Mapping[tuple[str, str], Reference] = field(default_factory=dict)

    @property
    def watermark(self) -> int:
        return self.max_ts - LATENESS_MS

    def inputs(self, batch: EventBatch) -> DetectorInput:
        slots = {
            et: self.keyspace[et].lookup(entity_keys(batch, et), batch.ts_ms, batch.partition)
            for et in self.det.entity_types
        }
        return DetectorInput(
            batch, slots, self.keyspace, self.watermark, route(batch, self.index),
            self.references, self.provisional,
        )  # fmt: skip

    def feed(self, batch: EventBatch, advance: bool = True) -> Output:
        out = self.det.update(self.inputs(batch))
        if batch.n:
            self.max_ts = max(self.max_ts, int(batch.ts_ms.max()))
        if advance:
            out = out + self.det.advance(self.watermark)
        self.log.append((batch, out))
        return out

    def run(self, batches: Iterable[EventBatch]) -> Runner:
        for b in batches:
            self.feed(b)
        return self


@dataclass(frozen=True)
class Normal:
    findings: frozenset[tuple[str, str, float]]
    alerts: dict[tuple[str, str, str, str, int], tuple[Any, ...]]
    metrics: frozenset[tuple[Any, ...]]

    def empty(self) -> bool:
        return not (self.findings or self.alerts or self.metrics)


def normalise(log: Iterable[tuple[EventBatch, Output]], detector: str) -> Normal:
    findings: set[tuple[str, str, float]] = set()
    alerts: dict[tuple[str, str, str, str, int], tuple[Any, ...]] = {}
    metrics: set[tuple[Any, ...]] = set()
    for batch, out in log:
        for f in out.findings:
            ids = batch.event_id[f.rows].tolist()
            for e, label, score in zip(ids, f.label.tolist(), f.score.tolist(), strict=True):
                findings.add((str(e), str(label), round(float(score), 6)))
        for a in out.alerts:
            key = (a.detector or detector, a.model_id, a.entity_type, a.entity, a.episode_start_ms)
            keep_latest(alerts, key, alert_state(a))
        for m in out.metrics:
            metrics.add(
                (
                    m.model_id,
                    m.metric,
                    m.feature,
                    m.window_start_ms,
                    m.window_end_ms,
                    round(m.value, 9),
                    m.event_count,
                )
            )
    return Normal(frozenset(findings), alerts, frozenset(metrics))


def assert_same(got: Normal, want: Normal, context: str = "") -> None:
    """``got == want``, or an error that lists only what differs."""
    if got == want:
        return
    lines = [f"outputs differ {context}".rstrip()]
    for name in ("findings", "metrics"):
        a, b = getattr(got, name), getattr(want, name)
        lines += [
            f"{name} only in got: {sorted(a - b)[:10]}",
            f"only in want: {sorted(b - a)[:10]}",
        ]
    for key in sorted(set(got.alerts) | set(want.alerts), key=repr):
        if got.alerts.get(key) != want.alerts.get(key):
            lines.append(f"alert {key}: got {got.alerts.get(key)} want {want.alerts.get(key)}")
    raise AssertionError("\n".join(lines))


def keep_latest(
    alerts: dict[tuple[str, str, str, str, int], tuple[Any, ...]],
    key: tuple[str, str, str, str, int],
    state: tuple[Any, ...],
) -> None:
    """Keep, per alert id, the change the store keeps: the highest ``alert_version`` (so two
    keys whose episodes share an id, such as one IP on two partitions, reduce the way the store
    reduces them), the content breaking exact ties the store would leave to insertion order."""
    if key not in alerts or _rank(state) > _rank(alerts[key]):
        alerts[key] = state


def _rank(state: tuple[Any, ...]) -> tuple[int, tuple[Any, ...]]:
    status, ts_ms, count, _, last_seen = state[:5]
    record = {
        "last_seen": last_seen,
        "resolved_at": ts_ms if status == "resolved" else None,
        "status": status,
        "event_count": count,
    }
    return alert_version(record), state


def alert_state(a: Any) -> tuple[Any, ...]:
    """An alert change as the store keeps it (the fields ``_rank`` reads come first)."""
    return (
        a.status,
        a.resolved_ms if a.status == "resolved" else a.ts_ms,
        a.event_count,
        a.first_seen_ms,
        a.last_seen_ms,
        tuple(a.sample_event_ids),
        round(float(a.score), 6),
        round(float(a.threshold), 6),
        a.severity,
        a.tenant,
    )


def through_store(snap: Snapshot) -> Snapshot:
    """A snapshot as the checkpoint code reads it back: keyed rows as raw fixed-width bytes."""
    rows = tuple(
        dataclasses.replace(
            r,
            data=np.frombuffer(r.data.tobytes(), dtype=f"V{r.data.dtype.itemsize}"),
            partition=np.array(r.partition, np.int32),
        )
        for r in snap.keyed
    )
    model = bytes(snap.model) if snap.model is not None else None
    extras = tuple((et, k, p, bytes(b)) for et, k, p, b in snap.extras if b)  # deletions: gone
    return Snapshot(keyed=rows, deleted=snap.deleted, model=model, extras=extras)


def digest(*objects: Any) -> str:
    """A hash of arrays (and containers of them) by content, to prove nothing was mutated."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, np.ndarray):
            h.update(str((x.dtype, x.shape)).encode())
            h.update(pickle.dumps(x.tolist()) if x.dtype == object else x.tobytes())
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                walk(getattr(x, f.name))
        elif isinstance(x, dict):
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                walk(x[k])
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)
        else:
            h.update(repr(x).encode())

    for o in objects:
        walk(o)
    return h.hexdigest()
