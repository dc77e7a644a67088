"""``inferwatch dead-letters``: the messages the worker rejected, as the store keeps them.

    inferwatch dead-letters [--store ...] [--since 2h] [--reason wrong_type]
        [--format table|jsonl|csv] [--limit 1000]

Rows are redacted like events (streams/worker/dead_letters.py): the reason and detail, the offending
field, the event id, the message's size, shape and keyed fingerprint, never its text. The
message itself is where the source keeps it: on the Kafka DLQ topic (``<topic>.dlq``, the same
``source_partition`` and ``source_offset`` in its headers), or in the file at ``source_offset``
(a byte offset) of ``source``. Through the running worker's API when one owns the store, as
``alerts`` and ``findings`` are.
"""

from __future__ import annotations

from typing import Annotated

import typer

from streams.cli.common import StoreOpt, query
from streams.cli.output import Format, emit

TABLE_COLUMNS = ["received_at", "reason", "source", "source_partition", "source_offset",
                 "event_id", "field", "raw_bytes", "detail"]  # fmt: skip


def dead_letters(
    store: StoreOpt = None,
    since: Annotated[
        str | None,
        typer.Option(help="Received in the last 30m, 2h, 7d, or since an RFC 3339 time."),
    ] = None,
    reason: Annotated[
        str | None, typer.Option(help="e.g. wrong_type, oversize_message, conflicting_event_id")
    ] = None,
    fmt: Annotated[Format, typer.Option("--format")] = Format.table,
    limit: Annotated[int, typer.Option(min=1)] = 1000,
) -> None:
    """Rejected messages (redacted; the message is on the DLQ topic or in the file at the
    offset), newest first."""
    rows = query(store, "dead_letters", since=since, reason=reason, limit=limit)
    emit(rows, fmt, TABLE_COLUMNS)
