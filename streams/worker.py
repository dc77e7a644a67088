"""The worker: poll -> pipeline -> buffer rows -> checkpoint (flush, save state, commit).

Checkpoint order (DESIGN.md section 6): every sink flushes, then detector state is saved with
the source positions, then the source commits. A crash anywhere before the positions are saved
replays from the previous checkpoint; every table is idempotent, so the replay leaves the same
rows. Checkpoints happen every ``checkpoint_s`` of wall clock or ``checkpoint_events`` events,
whichever comes first, and at the end of a file source after its open windows are closed.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from detectors.base import Detector
from detectors.reference import Reference
from detectors.reference_store import ReferenceStore
from schemas.batch import Limits
from streams import checkpoint, records
from streams.outbox import Outbox, Route
from streams.pipeline import DetectorResult, Pipeline
from streams.sources import Source
from streams.store import Store

if TYPE_CHECKING:
    from streams.api import ApiServer

END_OF_SOURCE_HORIZON_MS = 6 * 3_600_000  # how far event time moves on at the end of a file
# Fault injector for crash tests: "kill_after_flush:N" SIGKILLs the process during checkpoint N
# after the sinks flushed and before state and positions are saved (the worst moment);
# "kill_before_delivery:N" after checkpoint N is saved and before its alerts are delivered.
FAULT_ENV = "INFERWATCH_FAULT"


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
    limits: Limits = field(default_factory=Limits)


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
    last_checkpoint_s: float = 0.0
    last_batch_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=dict)


class Buffers:
    """Rows waiting for the next checkpoint: one Arrow table list per store table."""

    def __init__(self) -> None:
        self.tables: dict[str, list[pa.Table]] = {}
        self.alerts: dict[str, dict[str, Any]] = {}  # latest record per alert id
        self.references: list[Reference] = []

    def add(self, table: str, data: pa.Table) -> None:
        if data.num_rows:
            self.tables.setdefault(table, []).append(data)

    def flush(self, store: Store) -> list[dict[str, Any]]:
        """Write every buffered row; returns the alert records written (for the outbox)."""
        alerts = list(self.alerts.values())
        for name, parts in self.tables.items():
            store.insert_arrow(name, pa.concat_tables(parts))
        if self.alerts:
            store.insert_arrow("alerts", records.alerts_table(list(self.alerts.values())))
        self.tables = {}
        self.alerts = {}
        return alerts

    @property
    def pending_rows(self) -> int:
        return sum(t.num_rows for parts in self.tables.values() for t in parts)


def hmac_key(store: Store) -> bytes:
    """The keyed-fingerprint secret: ``INFERWATCH_HMAC_KEY``, else one kept beside the store."""
    env = os.environ.get("INFERWATCH_HMAC_KEY")
    if env:
        return env.encode()
    path_env = os.environ.get("INFERWATCH_HMAC_KEY_FILE")
    if path_env:
        return Path(path_env).read_bytes().strip()
    if store.directory is None:
        raise RuntimeError("a server store needs INFERWATCH_HMAC_KEY or INFERWATCH_HMAC_KEY_FILE")
    path = store.directory / "hmac.key"
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_bytes().strip()


class Worker:
    def __init__(
        self,
        store: Store,
        source: Source,
        detectors: list[Detector],
        settings: WorkerSettings | None = None,
        from_start: bool = False,
        routes: Sequence[Route] = (),
    ) -> None:
        self.settings = s = settings or WorkerSettings()
        self.store = store
        self.source = source
        self.pipeline = Pipeline(
            detectors,
            s.limits,
            ReferenceStore(n_events=s.reference_events),
            lateness_ms=int(s.lateness_s * 1000),
            idle_partition_s=s.idle_partition_s,
            idle_key_ms=int(s.idle_key_s * 1000),
            max_keys=s.max_keys,
        )
        self.counters = Counters()
        self._alert_ids: set[str] = set()  # episodes seen by this process (few: one per episode)
        self.buffers = Buffers()
        self.hmac_key = hmac_key(store)
        self.stop_requested = threading.Event()
        self.commands: list[Callable[[Worker], None]] = []  # applied at the next checkpoint
        self._checkpoint_requested = threading.Event()
        checkpoint.begin(store)
        # after begin: it tells which checkpoint completed, so the outbox can drop the rest
        self.outbox = Outbox(store, routes, s.delivery_budget_s) if routes else None
        self.next_offsets: dict[int, int] = {}
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._dlq: list[tuple[Any, Any, Any]] = []  # (rejects, partition, offset) for send_dlq
        if not from_start:
            self._restore()
        set_rebalance = getattr(source, "set_rebalance", None)
        if set_rebalance is not None:
            set_rebalance(self.on_revoke, self.on_assign)

    def _restore(self) -> None:
        if getattr(self.source, "rebalances", False):
            # model-level state now; keyed state arrives with each partition assignment
            checkpoint.load(self.store, self.pipeline, set())
            return
        saved = checkpoint.positions(self.store, self.source.name)
        checkpoint.load(self.store, self.pipeline, None)
        if saved:
            self.next_offsets = {p: off for p, (off, _) in saved.items()}
            for p, (_, max_ts) in saved.items():
                self.pipeline.watermark.max_ts[p] = max_ts
            self.source.seek(self.next_offsets)

    def _inject_fault(self, point: str) -> None:
        fault = os.environ.get(FAULT_ENV, "")
        if (
            fault.startswith(point + ":")
            and int(fault.split(":")[1]) == self.counters.checkpoints_total + 1
        ):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_revoke(self, partitions: set[int]) -> None:
        """Partitions are leaving: checkpoint everything, then drop their keyed state."""
        self.checkpoint()
        self.pipeline.drop_partitions(partitions)
        for p in partitions:
            self.next_offsets.pop(p, None)

    def on_assign(self, partitions: set[int]) -> dict[int, int]:
        """Partitions arrive: load their saved state; returns the store's positions for them,
        which win over the broker's committed offsets (the state matches the store's)."""
        checkpoint.load(self.store, self.pipeline, partitions, model_level=False)
        saved = checkpoint.positions(self.store, self.source.name)
        out = {p: saved[p][0] for p in partitions if p in saved}
        for p in partitions:
            if p in saved:
                self.pipeline.watermark.max_ts[p] = saved[p][1]
        self.next_offsets.update(out)
        return out

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT finish the batch, checkpoint and exit cleanly."""

        def stop(signum: int, frame: Any) -> None:
            self.stop_requested.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def serve_api(self) -> ApiServer:
        """Start the loopback API (queries, commands, metrics) in a daemon thread; the caller
        stops it (``.stop()``) before closing the store. Writes ``DIR/api.json`` for the CLI."""
        from streams.api import ApiServer

        server = ApiServer(self, self.store.directory)
        server.start()
        return server

    def request_checkpoint(self) -> None:
        """Checkpoint at the next turn of the run loop (thread-safe; the API calls it)."""
        self._checkpoint_requested.set()

    def run(self, progress: Callable[[Worker], None] | None = None) -> Counters:
        while not self.stop_requested.is_set():
            polled = self.source.poll(self.settings.batch_max, self.settings.poll_timeout_s)
            self._record_gaps()
            if polled.messages:
                t0 = time.perf_counter()
                result = self.pipeline.process(polled.messages, polled.partition, polled.offset)
                self._buffer(result)
                self.counters.last_batch_s = time.perf_counter() - t0
                self._since_checkpoint += len(polled.messages)
            self.next_offsets.update(polled.next_offsets)
            if progress is not None:
                progress(self)
            if self.source.exhausted:
                last = max(self.pipeline.watermark.max_ts.values(), default=None)
                if last is not None:
                    self._buffer(self.pipeline.advance(last + END_OF_SOURCE_HORIZON_MS))
                break
            if self._checkpoint_due():
                self.checkpoint()
        self.checkpoint()
        return self.counters

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
            self.buffers.add(
                "events", records.events_table(batch, self.hmac_key, self.settings.store_text)
            )
        c.events_total += batch.n
        c.late_events_total += result.late_events
        if result.decoded.rejects:
            for r in result.decoded.rejects:
                c.rejects_total[r.reason] = c.rejects_total.get(r.reason, 0) + 1
            self.buffers.add("dead_letters", self._dead_letters(result))
            if hasattr(self.source, "send_dlq"):
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
            self.buffers.alerts[rec["alert_id"]] = rec
        if result.metrics:
            self.buffers.add("window_metrics", records.metrics_table(result.metrics))
        self.buffers.references.extend(result.new_references)
        for stage, secs in result.stage_s.items():
            c.stage_s[stage] = c.stage_s.get(stage, 0.0) + secs
        c.stage_s["sink_build"] = c.stage_s.get("sink_build", 0.0) + time.perf_counter() - t0

    def _count_alert(self, rec: dict[str, Any]) -> None:
        """Count each alert episode once, when this worker first sees it."""
        if rec["alert_id"] not in self._alert_ids:
            self._alert_ids.add(rec["alert_id"])
            self.counters.alerts_total += 1

    def _dead_letters(self, result: DetectorResult) -> pa.Table:
        return records.dead_letters_table(
            self.source.name, result.decoded.rejects, result.partition, result.offset
        )

    def _record_gaps(self) -> None:
        """Events retention deleted before we read them (DESIGN.md section 6): a dead letter
        with the range, the lost-events counter and an alert (see ``RetentionGap``)."""
        gaps: list[Any] | None = getattr(self.source, "gaps", None)
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
        gaps.clear()

    def checkpoint(self) -> None:
        t0 = time.perf_counter()
        self._checkpoint_requested.clear()
        # pop, not iterate-then-clear: the API thread may append while we apply
        while self.commands:
            self.commands.pop(0)(self)
        alerts = self.buffers.flush(self.store)
        if self.outbox is not None:
            # staged with the sequence this checkpoint takes; deleted at start if it never ends
            self.outbox.stage(alerts, self.store.next_seq)
        for rejects, partition, offset in self._dlq:
            self.source.send_dlq(rejects, partition, offset)  # type: ignore[attr-defined]
        self._dlq = []
        self._inject_fault("kill_after_flush")
        t1 = time.perf_counter()
        checkpoint.save(
            self.store,
            self.pipeline,
            self.source.name,
            self.next_offsets,
            self.buffers.references,
        )
        self.buffers.references = []
        self.source.commit(self.next_offsets)
        self._since_checkpoint = 0
        t2 = time.perf_counter()
        if self.outbox is not None:
            self._inject_fault("kill_before_delivery")
            self.outbox.deliver()
        self._last_checkpoint = time.monotonic()
        c = self.counters
        c.checkpoints_total += 1
        c.last_checkpoint_s = time.perf_counter() - t0
        c.stage_s["sink_flush"] = c.stage_s.get("sink_flush", 0.0) + t1 - t0
        c.stage_s["state_save"] = c.stage_s.get("state_save", 0.0) + t2 - t1
        c.stage_s["delivery"] = c.stage_s.get("delivery", 0.0) + time.perf_counter() - t2
