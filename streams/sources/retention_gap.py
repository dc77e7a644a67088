"""A range of a partition that retention deleted before the worker read it, and how the worker
reports it: a ``dead_letters`` row and a high-severity global alert."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from detectors.base import AlertChange
from schemas.alert import Alert
from streams.store import rows as records

RETENTION_GAP_DETECTOR = "pipeline.retention_gap"


@dataclass(frozen=True, slots=True)
class RetentionGap:
    """Offsets ``from_offset`` up to (not including) ``to_offset`` were deleted unread."""

    topic: str
    partition: int
    from_offset: int
    to_offset: int

    @property
    def lost_events(self) -> int:
        return self.to_offset - self.from_offset

    @property
    def where(self) -> str:
        return f"{self.topic}/{self.partition}"

    def dead_letters(self, source: str, now_ms: int) -> pa.Table:
        """The ``dead_letters`` row: reason ``retention_gap``, offsets [source_offset, gap_to)."""
        detail = (
            f"{self.where}: offsets {self.from_offset}..{self.to_offset - 1} were deleted by "
            "retention before they were read"
        )
        return pa.table(
            {
                "source": pa.array([source], pa.string()),
                "source_partition": pa.array([self.partition], pa.int32()),
                "source_offset": pa.array([self.from_offset], pa.int64()),
                "reason": pa.array(["retention_gap"], pa.string()),
                "detail": pa.array([detail], pa.string()),
                "raw": pa.array([b""], pa.binary()),
                "raw_bytes": pa.array([0], pa.uint64()),
                "gap_to": pa.array([self.to_offset], pa.int64()),
                "received_at": pa.array([now_ms], records.TS),
            }
        )

    def alert_record(self, ts_ms: int, now_ms: int) -> Alert:
        """A high-severity global alert. Its episode starts at the gap's first offset, so a
        replay that finds the same gap gives the same alert id."""
        lost = self.lost_events
        change = AlertChange(
            entity_type="global",
            entity=self.where,
            model_id="",
            tenant="",
            status="firing",
            ts_ms=ts_ms,
            episode_start_ms=self.from_offset,
            first_seen_ms=ts_ms,
            last_seen_ms=ts_ms,
            score=float(lost),
            threshold=0.0,
            severity="high",
            title=f"{lost:,} events on {self.where} were deleted before they were read",
            summary=(
                f"The worker fell behind retention on {self.where}: offsets {self.from_offset}.."
                f"{self.to_offset - 1} are gone unread, so detection has a blind spot there."
            ),
            evidence={
                "partition": self.partition,
                "from_offset": self.from_offset,
                "to_offset": self.to_offset,
                "lost_events": lost,
            },
            event_count=lost,
            sample_event_ids=(),
        )
        return records.alert_record(change, RETENTION_GAP_DETECTOR, "1", (), (), now_ms)
