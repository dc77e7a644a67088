"""Rows waiting for the next checkpoint, and the keyed-fingerprint secret of the text columns."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from detectors.models.reference import Reference
from streams.store import credentials
from streams.store import rows as records
from streams.store.store import Store, TransientStoreError
from streams.worker.environment import Environment


@dataclass(frozen=True, slots=True)
class Rows:
    """One checkpoint's sink rows. Every table is idempotent, so after a failure they are all
    written again."""

    tables: list[tuple[str, pa.Table]]
    # the alert records among them, for the outbox, in order: an alert that fired and resolved
    # since the last checkpoint is its firing record, then its resolved one (only the latest is
    # in the alerts table)
    alerts: list[Mapping[str, Any]]

    def with_seq(self, seq: int) -> Rows:
        """The rows, decision tables stamped with the checkpoint that writes them."""
        tables = []
        for name, table in self.tables:
            if name in STAMPED:
                col = pa.array(np.full(table.num_rows, seq, np.uint64))
                table = table.append_column("ckpt_seq", col)
            tables.append((name, table))
        return Rows(tables, self.alerts)

    def write(self, store: Store) -> None:
        for name, table in self.tables:
            store.insert_arrow(name, table)


STAMPED = ("alerts", "findings", "window_metrics")  # see streams.worker.checkpoint.SEQ_COLUMNS


class Buffers:
    """Rows waiting for the next checkpoint: one Arrow table list per store table."""

    def __init__(self) -> None:
        self.tables: dict[str, list[pa.Table]] = {}
        self.alerts: dict[str, Mapping[str, Any]] = {}  # latest record per alert id
        # alert id -> its firing record, replaced by its resolution since the last checkpoint
        self.fired: dict[str, Mapping[str, Any]] = {}
        self.references: list[Reference] = []

    def add_alert(self, record: Mapping[str, Any]) -> None:
        """The latest record of its alert; a firing one it replaces is kept for delivery, so
        that a receiver sees an episode fire before it resolves."""
        alert_id = record["alert_id"]
        before = self.alerts.get(alert_id)
        if before is not None and before["status"] == "firing" and record["status"] != "firing":
            self.fired.setdefault(alert_id, before)
        self.alerts[alert_id] = record

    def alerts_in_order(self) -> list[Mapping[str, Any]]:
        """Every buffered alert record, a replaced firing one just before its successor."""
        out = []
        for alert_id, record in self.alerts.items():
            if alert_id in self.fired:
                out.append(self.fired[alert_id])
            out.append(record)
        return out

    def add(self, table: str, data: pa.Table) -> None:
        if data.num_rows:
            self.tables.setdefault(table, []).append(data)

    def take(self) -> Rows:
        """Every buffered row, taken out for one checkpoint."""
        tables = [(name, pa.concat_tables(parts)) for name, parts in self.tables.items()]
        if self.alerts:
            tables.append(("alerts", records.alerts_table(list(self.alerts.values()))))
        alerts = self.alerts_in_order()
        self.tables = {}
        self.alerts = {}
        self.fired = {}
        return Rows(tables, alerts)

    @property
    def pending_rows(self) -> int:
        return sum(t.num_rows for parts in self.tables.values() for t in parts)


EARLY = ("events",)  # idempotent and not stamped with a checkpoint: may be written before it


class EarlyWriter:
    """Writes buffered ``events`` rows between checkpoints, in one background thread.

    The events insert is the largest part of a checkpoint, and chdb releases the GIL while it
    runs, so it can go on beside decoding and detection of the next batches on the second core.
    This keeps the checkpoint order (docs/architecture.md): event rows are idempotent and carry no
    checkpoint seq, so writing them before the checkpoint that covers them is safe (a replay
    writes the same rows again), and :meth:`drain` waits for the write in flight before the
    checkpoint writes the rest, state and positions. One write is in flight at a time; a failed
    write hands its rows back to the checkpoint, whose retry and outage handling takes over, and
    no early write starts until then.
    """

    def __init__(self, store: Store, min_rows: int = 20_000) -> None:
        self.store = store
        self.min_rows = min_rows
        self._pool: ThreadPoolExecutor | None = None  # started at the first early write
        self._flight: Future[None] | None = None
        self._tables: list[tuple[str, pa.Table]] = []  # what is in flight
        self._failed = False

    def offer(self, buffers: Buffers) -> None:
        """Start writing the buffered early tables if enough rows wait and nothing is in flight."""
        if self._failed or (self._flight is not None and not self._flight.done()):
            return
        if sum(t.num_rows for name in EARLY for t in buffers.tables.get(name, ())) < self.min_rows:
            return
        self._settle()
        if self._failed:
            return
        tables = [(name, buffers.tables.pop(name)) for name in EARLY if name in buffers.tables]
        self._tables = [(name, pa.concat_tables(parts)) for name, parts in tables]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="inferwatch-early-write")
        self._flight = self._pool.submit(Rows(self._tables, []).write, self.store)

    def _settle(self) -> None:
        """Collect the finished write: a transient failure keeps its rows for the checkpoint."""
        if self._flight is None:
            return
        flight, self._flight = self._flight, None
        try:
            flight.result()
        except TransientStoreError:
            self._failed = True
            return
        self._tables = []

    def drain(self, buffers: Buffers) -> None:
        """Wait for the write in flight; rows it could not write go back into ``buffers`` (ahead
        of newer ones) for the checkpoint to write. Other errors are raised here."""
        self._settle()
        for name, table in self._tables:
            buffers.tables.setdefault(name, []).insert(0, table)
        self._tables = []
        self._failed = False

    def close(self) -> None:
        """Stop the thread (after :meth:`drain`; a later offer starts a new one)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def hmac_key(store: Store, env: Environment) -> bytes:
    """The keyed-fingerprint secret: ``INFERWATCH_HMAC_KEY`` (or ``_FILE``), else one kept
    beside the store (``streams.store.credentials.hmac_key``)."""
    return credentials.hmac_key(store.directory, env.values)
