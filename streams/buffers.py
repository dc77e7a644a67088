"""Rows waiting for the next checkpoint, and the keyed-fingerprint secret of the text columns."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from detectors.reference import Reference
from streams import records
from streams.store import Store


@dataclass(frozen=True, slots=True)
class Rows:
    """One checkpoint's sink rows. Every table is idempotent, so after a failure they are all
    written again."""

    tables: list[tuple[str, pa.Table]]
    alerts: list[dict[str, Any]]  # the alert records among them, for the outbox

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


STAMPED = ("alerts", "findings", "window_metrics")  # see streams.checkpoint.SEQ_COLUMNS


class Buffers:
    """Rows waiting for the next checkpoint: one Arrow table list per store table."""

    def __init__(self) -> None:
        self.tables: dict[str, list[pa.Table]] = {}
        self.alerts: dict[str, dict[str, Any]] = {}  # latest record per alert id
        self.references: list[Reference] = []

    def add(self, table: str, data: pa.Table) -> None:
        if data.num_rows:
            self.tables.setdefault(table, []).append(data)

    def take(self) -> Rows:
        """Every buffered row, taken out for one checkpoint."""
        tables = [(name, pa.concat_tables(parts)) for name, parts in self.tables.items()]
        alerts = list(self.alerts.values())
        if alerts:
            tables.append(("alerts", records.alerts_table(alerts)))
        self.tables = {}
        self.alerts = {}
        return Rows(tables, alerts)

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
