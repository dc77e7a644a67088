"""The worker: poll -> pipeline -> buffer rows -> checkpoint (flush, save state, commit).

Checkpoint order (docs/architecture.md): every sink flushes, then detector state is saved with
the source positions, then the source commits. A crash anywhere before the positions are saved
replays from the previous checkpoint; every table is idempotent, so the replay leaves the same
rows. Checkpoints happen every ``checkpoint_s`` of wall clock or ``checkpoint_events`` events,
whichever comes first, and at the end of a file source after its open windows are closed.
Between checkpoints, buffered ``events`` rows (idempotent, not stamped with a checkpoint) are
written by a background thread while the next batches are decoded (``EarlyWriter``); each
checkpoint waits for that write before it stores the rest, so the order above holds.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa

from detectors.base import Detector
from detectors.models.reference_store import ReferenceStore
from schemas.batch import Limits
from streams.alerting import analyst
from streams.alerting.health import PipelineHealth
from streams.alerting.lifecycle import Grouping, Lifecycle, Notification, Silence
from streams.alerting.outage import RouteHealth, SinkOutage
from streams.alerting.outbox import Outbox, Route
from streams.sources.base import Skipped, Source
from streams.store import rows as records
from streams.store.store import Store, TransientStoreError
from streams.worker import checkpoint, dead_letters, event_ids
from streams.worker.buffers import Buffers, EarlyWriter, Rows, hmac_key
from streams.worker.checkpoint import Prepared
from streams.worker.environment import Environment
from streams.worker.faults import FAULT_ENV, Faults
from streams.worker.pipeline import DetectorResult, Pipeline

LIFECYCLE = "_lifecycle"  # name of the lifecycle's saved state
LIFECYCLE_CLOCK = "_lifecycle_clock"  # and of its clock, which only moves forward
INT64_MIN = -(2**63)
END_OF_SOURCE_HORIZON_MS = 6 * 3_600_000  # how far event time moves on at the end of a file
__all__ = ["FAULT_ENV", "Counters", "Worker", "WorkerSettings"]


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    batch_max: int = 10_000
    poll_timeout_s: float = 0.2
    checkpoint_s: float = 5.0
    checkpoint_events: int = 50_000
    lateness_s: float = 60.0
    idle_partition_s: float = 30.0
    idle_key_s: float = 86_400.0
    max_keys: int = 2_000_000
    store_text: str = "redacted"  # or "raw"
    reference_events: int = 2_000
    delivery_budget_s: float = 2.0  # per checkpoint; what is left waits for the next one
    route_alert_s: float = 30.0  # a route failing this long raises pipeline.sink_paused
    lag_alert_events: int = 1_000_000  # consumer lag above this...
    lag_alert_s: float = 300.0  # ...for this long raises pipeline.consumer_lag
    limits: Limits = field(default_factory=Limits)
    event_id_window_s: float = event_ids.WINDOW_MS / 1000  # how far back reused ids are caught...
    max_event_ids: int = event_ids.MAX_IDS  # ...while that many ids at most
    score_types: dict[str, str] = field(default_factory=dict)  # model -> score type (inventory)
    criticality: dict[str, str] = field(default_factory=dict)  # model -> criticality (inventory)
    grouping: Grouping = field(default_factory=Grouping)
    silences: tuple[Silence, ...] = ()  # from the config file; the store's are added at start


@dataclass
class Counters:
    """What the worker has done; the metrics endpoint and the progress bar read these."""

    events_total: int = 0
    rejects_total: dict[str, int] = field(default_factory=dict)
    findings_total: int = 0
    alerts_total: int = 0
    late_events_total: int = 0
    lost_events_total: int = 0
    checkpoints_total: int = 0
    batches_total: int = 0
    sink_paused: bool = False  # the store is down: partitions paused, retrying
    sink_failures_total: int = 0
    deliveries_refused_total: dict[str, int] = field(default_factory=dict)  # by route
    last_checkpoint_s: float = 0.0
    last_batch_s: float = 0.0
    event_id_window_s: float = 0.0  # how far back in event time reused ids are caught now
    stage_s: dict[str, float] = field(default_factory=dict)

    def add_stage(self, stage: str, secs: float) -> None:
        self.stage_s[stage] = self.stage_s.get(stage, 0.0) + secs


class Worker:
    def __init__(
        self,
        store: Store,
        source: Source,
        detectors: list[Detector],
        settings: WorkerSettings | None = None,
        from_start: bool = False,
        routes: Sequence[Route] = (),
        environment: Environment | None = None,
    ) -> None:
        self.settings = s = settings or WorkerSettings()
        # the INFERWATCH_* variables as the program started (the CLI passes what it read)
        env = environment if environment is not None else Environment.read()
        self.faults = Faults.from_env(env)
        self.store = store = self.faults.wrap(store)
        self.routes = tuple(routes)
        self.source = source
        self.hmac_key = hmac_key(store, env)
        source.limit_message_bytes(s.limits.max_message_bytes)  # a file skips longer lines
        self.pipeline = Pipeline(
            detectors,
            s.limits,
            ReferenceStore(n_events=s.reference_events, score_types=s.score_types),
            lateness_ms=int(s.lateness_s * 1000),
            idle_partition_s=s.idle_partition_s,
            idle_key_ms=int(s.idle_key_s * 1000),
            max_keys=s.max_keys,
            event_ids=event_ids.EventIds(
                self.hmac_key, int(s.event_id_window_s * 1000), s.max_event_ids
            ),
        )
        self.counters = Counters(event_id_window_s=s.event_id_window_s)
        self._alert_ids: set[str] = set()  # episodes seen by this process (few: one per episode)
        self.buffers = Buffers()
        self.early = EarlyWriter(store, min_rows=s.batch_max)
        self.stop_requested = threading.Event()
        self.commands: list[Callable[[Worker], None]] = []  # applied at the next checkpoint
        self._checkpoint_requested = threading.Event()
        checkpoint.begin(store)
        # what earlier runs stored, whatever this run replays (--from-start included)
        event_ids.restore(store, self.pipeline.event_ids)
        # after begin: it tells which checkpoint completed, so the outbox can drop the rest
        self.outbox = Outbox(store, routes, s.delivery_budget_s) if routes else None
        self.route_health = RouteHealth(s.route_alert_s)
        if self.outbox is not None:
            self.route_health.restore(store)
            self.counters.deliveries_refused_total = dict(self.outbox.refused_total)
        self.lifecycle = Lifecycle(
            s.grouping,
            s.criticality,
            [*s.silences, *analyst.silences(store, include_expired=True)],
            analyst.allow_entries(store, include_expired=True),
        )
        self._clock_ms = INT64_MIN  # the lifecycle's clock; only moves forward
        self.health = PipelineHealth(source.name, s.lag_alert_events, s.lag_alert_s)
        self.health.restore(store)
        self._health_seen = (0, 0)  # (rejected, messages) at the last check
        self._notifications: list[Notification] = []
        self.next_offsets: dict[int, int] = {}
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._dlq: list[tuple[Any, Any, Any]] = []  # (rejects, partition, offset) for send_dlq
        self.outage: SinkOutage | None = None
        self._revoked_in_outage: set[int] = set()
        self._assigned_in_outage: set[int] = set()
        if not from_start:
            self._restore()
        source.set_rebalance(self.on_revoke, self.on_assign)

    def _restore(self) -> None:
        """Everything the last committed checkpoint saved, for a file and for Kafka alike:
        detector state, the key map with each key's last-seen time, the watermark, the
        pipeline's and the lifecycle's clocks, open groups and incidents. A Kafka source gets
        model-level state here and keyed state with each partition assignment (``on_assign``)."""
        rebalances = self.source.rebalances
        checkpoint.load(self.store, self.pipeline, set() if rebalances else None)
        blob = checkpoint.load_blob(self.store, LIFECYCLE)
        if blob is not None:
            self.lifecycle.restore(blob)
        clock = checkpoint.load_blob(self.store, LIFECYCLE_CLOCK)
        if clock is not None:
            self._clock_ms = int(orjson.loads(clock))
        if rebalances:
            return
        saved = checkpoint.positions(self.store, self.source.name)
        self.pipeline.settle({p: max_ts for p, (_, max_ts) in saved.items()})
        if saved:
            self.next_offsets = {p: off for p, (off, _) in saved.items()}
            self.source.seek(self.next_offsets)

    def on_revoke(self, partitions: set[int]) -> None:
        """Partitions are leaving: checkpoint everything, then drop their keyed state. During a
        store outage nothing can be saved: their state is dropped and left out of the pending
        checkpoint, and the new owner replays them from the previous one."""
        if self.outage is not None:
            self._revoked_in_outage |= partitions
        else:
            self.checkpoint()
        self.pipeline.drop_partitions(partitions)
        for p in partitions:
            self.next_offsets.pop(p, None)

    def on_assign(self, partitions: set[int]) -> dict[int, int]:
        """Partitions arrive: load their saved state; returns the store's positions for them,
        which win over the broker's committed offsets (the state matches the store's). During a
        store outage the partitions stay paused and are loaded once the store is back."""
        if self.outage is not None:
            self._assigned_in_outage |= partitions
            return {}
        checkpoint.load(self.store, self.pipeline, partitions, model_level=False)
        saved = checkpoint.positions(self.store, self.source.name)
        out = {p: saved[p][0] for p in partitions if p in saved}
        self.pipeline.settle({p: saved[p][1] for p in partitions if p in saved})
        self.next_offsets.update(out)
        return out

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT finish the batch, checkpoint and exit cleanly."""

        def stop(signum: int, frame: Any) -> None:
            self.stop_requested.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def request_checkpoint(self) -> None:
        """Checkpoint at the next turn of the run loop (thread-safe; the API calls it)."""
        self._checkpoint_requested.set()

    def run(self, progress: Callable[[Worker], None] | None = None) -> Counters:
        try:
            return self._run(progress)
        finally:
            self.early.close()

    def _run(self, progress: Callable[[Worker], None] | None) -> Counters:
        while not self.stop_requested.is_set():
            polled = self.source.poll(self.settings.batch_max, self.settings.poll_timeout_s)
            self._record_gaps()
            if polled.skipped:
                self._skipped(polled.skipped)
            if polled.messages:
                t0 = time.perf_counter()
                result = self.pipeline.process(polled.messages, polled.partition, polled.offset)
                self._buffer(result)
                if self.outage is None:
                    self.early.offer(self.buffers)
                self.counters.last_batch_s = time.perf_counter() - t0
                self._since_checkpoint += len(polled.messages)
                self.counters.batches_total += 1
                self.faults.kill("kill_mid_batch", self.counters.batches_total)
            self.next_offsets.update(polled.next_offsets)
            if progress is not None:
                progress(self)
            if self.source.exhausted:
                last = max(self.pipeline.watermark.max_ts.values(), default=None)
                if last is not None:
                    self._buffer(self.pipeline.advance(last + END_OF_SOURCE_HORIZON_MS))
                    g = self.settings.grouping
                    self._tick(last + g.group_wait_ms + g.group_interval_ms)
                break
            if self._checkpoint_due():
                if self._idle():
                    self._deliver()  # nothing to save: only retry what waits for a route
                    self._last_checkpoint = time.monotonic()
                else:
                    self.checkpoint()
        self.checkpoint()
        if not self._idle():  # what the last delivery raised (a route down) goes in too
            self.checkpoint()
        return self.counters

    def _idle(self) -> bool:
        """Nothing read, buffered or asked for since the last checkpoint."""
        b = self.buffers
        return not (
            self._since_checkpoint
            or b.tables
            or b.alerts
            or b.references
            or self._checkpoint_requested.is_set()
            or self.commands
            or self.pipeline.evicted
        )

    def _deliver(self) -> None:
        if self.outbox is None:
            return
        if self.outbox.pending:
            # a store failure here: what was sent is sent again next time, with the same key
            with contextlib.suppress(TransientStoreError):
                self.outbox.deliver()
        self.counters.deliveries_refused_total = dict(self.outbox.refused_total)
        # also with nothing pending: refusals retried from the CLI resolve their alert here
        ts = max(self.pipeline.watermark.max_ts.values(), default=int(time.time() * 1000))
        for rec in self.route_health.check(self.outbox, ts):
            self._count_alert(rec)
            self.buffers.add_alert(rec)

    def _checkpoint_due(self) -> bool:
        return (
            self._checkpoint_requested.is_set()
            or self._since_checkpoint >= self.settings.checkpoint_events
            or time.monotonic() - self._last_checkpoint >= self.settings.checkpoint_s
        )

    def _buffer(self, result: DetectorResult) -> None:
        batch = result.batch
        c = self.counters
        t0 = time.perf_counter()
        if batch.n:
            fps = result.fingerprints[result.decoded.rows]
            events = records.events_table(batch, self.hmac_key, self.settings.store_text, fps)
            self.buffers.add("events", events)
            watermark = self.pipeline.watermark.value
            c.event_id_window_s = self.pipeline.event_ids.reach_ms(watermark) / 1000
        c.events_total += batch.n
        c.late_events_total += result.late_events
        if result.decoded.rejects:
            for r in result.decoded.rejects:
                c.rejects_total[r.reason] = c.rejects_total.get(r.reason, 0) + 1
            self.buffers.add("dead_letters", self._dead_letters(result))
            if self.source.has_dlq:
                self._dlq.append((result.decoded.rejects, result.partition, result.offset))
        for det, found in result.findings:
            self.buffers.add(
                "findings",
                records.findings_table(batch, found, det.name, det.version, det.atlas, det.owasp),
            )
            c.findings_total += int(found.rows.size)
        now_ms = int(time.time() * 1000)
        for det, change in result.alerts:
            rec = records.alert_record(change, det.name, det.version, det.atlas, det.owasp, now_ms)
            self._count_alert(rec)
            self.buffers.add_alert(rec)
        if result.metrics:
            self.buffers.add("window_metrics", records.metrics_table(result.metrics))
        self.buffers.references.extend(result.new_references)
        for stage, secs in result.stage_s.items():
            c.add_stage(stage, secs)
        c.add_stage("sink_build", time.perf_counter() - t0)

    def _count_alert(self, rec: Mapping[str, Any]) -> None:
        """Count each alert episode once, when this worker first sees it."""
        if rec["alert_id"] not in self._alert_ids:
            self._alert_ids.add(rec["alert_id"])
            self.counters.alerts_total += 1

    def _dead_letters(self, result: DetectorResult) -> pa.Table:
        return dead_letters.table(
            self.source.name, result.decoded.rejects, result.partition, result.offset,
            result.fingerprints, result.stored_fingerprints, self.hmac_key,
            store_raw=self.settings.store_text == "raw",
        )  # fmt: skip

    def _skipped(self, skipped: tuple[Skipped, ...]) -> None:
        """Lines a file source refused unread (over the message limit): dead letters."""
        c = self.counters
        c.rejects_total["oversize_message"] = c.rejects_total.get("oversize_message", 0) + len(
            skipped
        )
        limit = self.settings.limits.max_message_bytes
        self.buffers.add(
            "dead_letters", dead_letters.skipped_table(self.source.name, skipped, limit)
        )

    def _record_gaps(self) -> None:
        """Events retention deleted before we read them (docs/architecture.md): a dead letter
        with the range, the lost-events counter and an alert (see ``RetentionGap``)."""
        gaps = self.source.take_gaps()
        if not gaps:
            return
        now_ms = int(time.time() * 1000)
        for gap in gaps:
            self.counters.lost_events_total += gap.lost_events
            self.buffers.add("dead_letters", gap.dead_letters(self.source.name, now_ms))
            # the alert's event time: the last event read on the partition before the gap
            ts = self.pipeline.watermark.max_ts.get(gap.partition, now_ms)
            rec = gap.alert_record(ts, now_ms)
            self._count_alert(rec)
            self.buffers.alerts[rec["alert_id"]] = rec

    def checkpoint(self) -> None:
        """Flush every sink, save state and positions, commit, then deliver alerts. Store
        failures of the transient class are retried through :meth:`_write` until the store is
        back (or the worker is stopped, which then exits without committing)."""
        t0 = time.perf_counter()
        self.early.drain(self.buffers)  # the events written early are in the store from here
        tw = time.perf_counter()
        self._checkpoint_requested.clear()
        number = self.counters.checkpoints_total + 1
        self.faults.checkpoint_starts(number)
        # pop, not iterate-then-clear: the API thread may append while we apply
        while self.commands:
            self.commands.pop(0)(self)
        self._check_health()
        notes = self._lifecycle()
        rows = self.buffers.take()
        blobs = {
            LIFECYCLE: self.lifecycle.state_bytes(),
            LIFECYCLE_CLOCK: orjson.dumps(self._clock_ms),
        }
        prepared = checkpoint.prepare(
            self.store, self.pipeline, self.source.name, dict(self.next_offsets),
            self.buffers.references, blobs,
        )  # fmt: skip
        self.buffers.references = []
        dlq, self._dlq = self._dlq, []
        t1 = time.perf_counter()
        prepared = self._write(rows.with_seq(prepared.seq), prepared, dlq, number, notes)
        self.faults.kill("kill_after_save", number)
        self.source.commit(self.next_offsets)
        self._since_checkpoint = 0
        t2 = time.perf_counter()
        if self.outbox is not None:
            self.faults.kill("kill_before_delivery", number)
        self._deliver()
        self._last_checkpoint = time.monotonic()
        c = self.counters
        c.checkpoints_total += 1
        c.last_checkpoint_s = time.perf_counter() - t0
        # prepare: commands, health, lifecycle, changed state rows; write: every sink's rows,
        # state and positions into the store, and the source commit
        c.add_stage("early_write_wait", tw - t0)
        for name, secs in prepared.snapshot_s.items():
            c.add_stage("snapshot:" + name, secs)
        c.add_stage("checkpoint_prepare", t1 - tw)
        c.add_stage("store_write", t2 - t1)
        c.add_stage("delivery", time.perf_counter() - t2)

    def _check_health(self) -> None:
        """Consumer lag and dead-letter spikes (streams/alerting/health.py), into this
        checkpoint."""
        c = self.counters
        rejected = sum(c.rejects_total.values())
        messages = c.events_total + rejected
        seen_rejected, seen_messages = self._health_seen
        self._health_seen = (rejected, messages)
        lag = self.source.lag()
        ts = max(self.pipeline.watermark.max_ts.values(), default=int(time.time() * 1000))
        for rec in self.health.check(lag, rejected - seen_rejected, messages - seen_messages, ts):
            self._count_alert(rec)
            self.buffers.alerts[rec["alert_id"]] = rec

    def _lifecycle(self) -> list[Notification]:
        """Pass this checkpoint's alerts through the lifecycle (severity, silences, allow-list,
        incidents) on its clock; returns the group notifications due."""
        lc = self.lifecycle
        out = lc.observe(self.buffers.alerts_in_order(), self._tick())
        self.buffers.alerts, self.buffers.fired = {}, {}
        for rec in out:
            self.buffers.add_alert(rec)  # a firing one that was replaced is kept for delivery
        notes = lc.due(self._clock_ms)
        for rec in lc.take_released():
            self.buffers.add_alert(rec)
        incidents = lc.take_incidents()
        if incidents:
            self.buffers.add("incidents", analyst.incidents_table(incidents))
        return notes

    def _tick(self, at_least: int = INT64_MIN) -> int:
        """The lifecycle clock (docs/architecture.md): the watermark for a file, which replays;
        the wall clock for a live (Kafka) source. It never moves back."""
        live = self.source.rebalances
        now = int(time.time() * 1000) if live else self.pipeline.watermark.value
        self._clock_ms = max(self._clock_ms, now, at_least)
        return self._clock_ms

    def _write(
        self, rows: Rows, prepared: Prepared, dlq: list[Any], number: int, notes: list[Any]
    ) -> Prepared:
        while True:
            try:
                rows.write(self.store)
                if self.outbox is not None:
                    # staged under this checkpoint's seq; deleted at start if it never ends
                    self.outbox.stage(rows.alerts, prepared.seq, notes)
                for rejects, partition, offset in dlq:
                    self.source.send_dlq(rejects, partition, offset)
                dlq = []
                self.faults.kill("kill_after_flush", number)
                checkpoint.write(self.store, prepared)
                break
            except TransientStoreError as exc:
                self._wait_for_store(str(exc))
                prepared = prepared.without(self._revoked_in_outage)
        if self.outage is not None:
            self._store_is_back()
        return prepared

    def _wait_for_store(self, error: str) -> None:
        """Pause the partitions, raise ``pipeline.sink_paused`` through the routes, and wait a
        jittered backoff while polling (the group keeps us as a member)."""
        c = self.counters
        c.sink_failures_total += 1
        if self.outage is None:
            ts = max(self.pipeline.watermark.max_ts.values(), default=int(time.time() * 1000))
            self.outage = SinkOutage(str(self.store.dsn), error, ts, self.routes)
            c.sink_paused = True
            self.source.pause()
            self.outage.notify(resolved=False)
        else:
            self.outage.failures += 1
            self.outage.last_error = error
        deadline = time.monotonic() + self.outage.backoff.next_delay()
        while time.monotonic() < deadline:
            if self.stop_requested.is_set():
                raise TransientStoreError(
                    f"stopped while the store is down ({error}); nothing after the last "
                    "checkpoint was committed, so the next start replays it"
                )
            self.source.idle(min(0.2, max(0.0, deadline - time.monotonic())))

    def _store_is_back(self) -> None:
        """Record the outage (firing, then resolved) and load what was assigned meanwhile."""
        outage, self.outage = self.outage, None
        assert outage is not None
        rec = outage.notify(resolved=True)
        self._count_alert(rec)
        # in the store at the next checkpoint; the outbox sends what notify could not, in order
        self.buffers.add_alert(outage.record(resolved=False))
        self.buffers.add_alert(rec)
        if self.outbox is not None:
            self.outbox.mark_sent(outage.notified)
        assigned, self._assigned_in_outage = self._assigned_in_outage, set()
        self._revoked_in_outage = set()
        if assigned:
            self.source.seek(self.on_assign(assigned))
        self.counters.sink_paused = False
        self.source.resume()
