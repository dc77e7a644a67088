"""Sources: where messages come from. A source polls batches, seeks and commits positions.

A position is the offset of the next message to read, per partition. A JSONL file is one
partition (0) whose offsets are byte offsets of line starts, so a rerun resumes exactly where
the last checkpoint left off. The Kafka source lives in ``streams/sources/kafka.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from schemas.batch import Reject
    from streams.sources.retention_gap import RetentionGap


@dataclass(frozen=True, slots=True)
class Skipped:
    """A message the source refused without reading it whole: over the size limit."""

    partition: int
    offset: int
    length: int  # bytes


@dataclass(frozen=True, slots=True)
class Polled:
    messages: list[bytes]
    partition: npt.NDArray[np.int32]
    offset: npt.NDArray[np.int64]
    next_offsets: dict[int, int]  # position after this batch, per partition that delivered
    skipped: tuple[Skipped, ...] = ()  # over-long messages, in the order read


@dataclass
class Rebalance:
    """Callbacks a source calls when partitions move (Kafka); a file source never does."""

    on_revoke: Callable[[set[int]], None] = lambda parts: None
    on_assign: Callable[[set[int]], dict[int, int]] = lambda parts: {}
    revoked: set[int] = field(default_factory=set)


class Source(Protocol):
    """What the worker reads from. The abilities after ``idle`` differ between sources; each
    source states them (:class:`SourceBase` has the defaults: a single reader, no DLQ topic,
    no lag, no retention)."""

    name: str
    # partitions move between members of a group (Kafka): a live clock, state on assignment
    rebalances: ClassVar[bool]
    has_dlq: ClassVar[bool]  # rejected messages are also sent whole to a DLQ topic

    def poll(self, max_messages: int, timeout_s: float) -> Polled: ...
    def seek(self, positions: dict[int, int]) -> None: ...
    def commit(self, positions: dict[int, int]) -> None: ...
    def assigned(self) -> set[int]: ...
    @property
    def exhausted(self) -> bool: ...
    def close(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def idle(self, timeout_s: float) -> None: ...
    def set_rebalance(
        self,
        on_revoke: Callable[[set[int]], None],
        on_assign: Callable[[set[int]], dict[int, int]],
    ) -> None: ...
    def limit_message_bytes(self, max_bytes: int) -> None: ...
    def lag(self) -> dict[int, int]: ...
    def take_gaps(self) -> list[RetentionGap]: ...
    def send_dlq(
        self,
        rejects: Sequence[Reject],
        partition: npt.NDArray[np.int32],
        offset: npt.NDArray[np.int64],
    ) -> None: ...
    @property
    def size_bytes(self) -> int | None: ...


class SourceBase:
    """The defaults of a source's optional abilities, for sources to inherit: partitions never
    move, no DLQ topic, no consumer lag, nothing lost to retention, no known size."""

    rebalances: ClassVar[bool] = False
    has_dlq: ClassVar[bool] = False

    def set_rebalance(
        self,
        on_revoke: Callable[[set[int]], None],
        on_assign: Callable[[set[int]], dict[int, int]],
    ) -> None:
        """Hooks for partitions that move; a source whose partitions never move ignores them."""

    def limit_message_bytes(self, max_bytes: int) -> None:
        """The decoder's message limit, for a source that can skip longer messages unread."""

    def lag(self) -> dict[int, int]:
        """Messages behind the end, per assigned partition, where the source knows it."""
        return {}

    def take_gaps(self) -> list[RetentionGap]:
        """Ranges deleted unread since the last call (see ``streams/sources/retention_gap.py``)."""
        return []

    def send_dlq(
        self,
        rejects: Sequence[Reject],
        partition: npt.NDArray[np.int32],
        offset: npt.NDArray[np.int64],
    ) -> None:
        """Send rejected messages whole to the DLQ topic; without one (``has_dlq`` False) the
        store's ``dead_letters`` rows are all there is."""

    @property
    def size_bytes(self) -> int | None:
        """The size of what there is to read, for a progress bar; None when unbounded."""
        return None


class SourceError(Exception):
    """A source that cannot be opened as configured."""


class FileSource(SourceBase):
    """JSONL file, one event per line; blank lines are skipped, ``\\r\\n`` endings accepted.

    A line longer than ``max_line_bytes`` (the decoder's message limit, set by the worker) is
    never held whole: its bytes are skipped up to the next newline, a chunk at a time, and
    ``poll`` reports it in ``Polled.skipped`` (offset and length) instead of as a message. So
    memory stays within one read chunk plus one line of the limit, whatever the file holds.
    """

    def __init__(
        self, path: Path, read_bytes: int = 8 << 20, max_line_bytes: int = 1 << 20
    ) -> None:
        if not path.exists():
            raise SourceError(f"source file {path} does not exist")
        if path.is_dir():
            raise SourceError(f"source file {path} is a directory; expected a JSONL file")
        self.path = path.resolve()
        self.name = f"file:{self.path}"
        self.read_bytes = read_bytes
        self.max_line_bytes = max_line_bytes
        self._fh = self.path.open("rb")
        self._pos = 0  # byte offset of the first unread line
        self._reset()

    def _reset(self) -> None:
        self._read_pos = self._pos  # byte offset of ``_tail``
        self._tail = b""  # an incomplete last line of what was read
        self._lines: list[bytes] = []  # complete, non-blank lines read and not yet polled...
        self._starts = self._ends = np.zeros(0, np.int64)  # ...their byte offsets
        self._next = 0  # index of the first of them not polled yet
        self._skipped: dict[int, Skipped] = {}  # over-long lines among them, by index
        self._skip_from: int | None = None  # start of an over-long line being skipped...
        self._skip_len = 0  # ...and its bytes so far
        self._eof = False

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def limit_message_bytes(self, max_bytes: int) -> None:
        self.max_line_bytes = max_bytes

    @property
    def position(self) -> int:
        return self._pos

    def seek(self, positions: dict[int, int]) -> None:
        self._pos = positions.get(0, 0)
        self._fh.seek(self._pos)
        self._reset()

    def assigned(self) -> set[int]:
        return {0}

    @property
    def exhausted(self) -> bool:
        return self._eof and self._next == len(self._lines)

    def poll(self, max_messages: int, timeout_s: float = 0.0) -> Polled:
        lines: list[bytes] = []
        offsets: list[npt.NDArray[np.int64]] = []
        skipped: list[Skipped] = []
        while len(lines) < max_messages:
            if self._next == len(self._lines):
                if self._eof:
                    break
                self._read()
                continue
            i = self._next
            k = min(len(self._lines), i + max_messages - len(lines))
            if self._skipped and any(j in self._skipped for j in range(i, k)):
                taken = [j for j in range(i, k) if j not in self._skipped]
                skipped.extend(self._skipped[j] for j in range(i, k) if j in self._skipped)
                lines.extend(self._lines[j] for j in taken)
                offsets.append(self._starts[taken])
            else:
                lines.extend(self._lines[i:k])
                offsets.append(self._starts[i:k])
            self._pos = int(self._ends[k - 1])
            self._next = k
        if self._eof and self._next == len(self._lines):
            self._pos = self._read_pos  # past trailing blank lines too
        return Polled(
            lines,
            np.zeros(len(lines), np.int32),
            np.concatenate(offsets) if offsets else np.zeros(0, np.int64),
            {0: self._pos},
            tuple(skipped),
        )

    def _read(self) -> None:
        """Read the next chunk and split it into lines (one split per chunk, not per poll)."""
        chunk = self._fh.read(self.read_bytes)
        self._eof = not chunk  # at the end, ``parts`` holds the last line without a newline
        first: list[tuple[int, int]] = []  # (start, end) of an over-long line ending here
        if self._skip_from is not None:
            newline = chunk.find(b"\n")
            if newline < 0 and chunk:  # still inside it: nothing is kept
                self._skip_len += len(chunk)
                self._read_pos += len(chunk)
                self._lines, self._next, self._skipped = [], 0, {}
                return
            used = newline + 1 if newline >= 0 else 0
            self._skip_len += max(newline, 0)
            first = [(self._skip_from, self._read_pos + used)]
            self._read_pos += used
            chunk = chunk[used:]
        data = self._tail + chunk
        parts = data.split(b"\n")
        self._tail = b"" if self._eof else parts.pop()
        step = np.fromiter(map(len, parts), np.int64, len(parts)) + 1
        ends = self._read_pos + np.cumsum(step)
        starts = ends - step
        if self._eof and len(parts):
            ends[-1] -= 1  # no newline after it
        if len(parts):
            self._read_pos = int(ends[-1])
        long = step - 1 > self.max_line_bytes
        if first or long.any() or b"\r" in data or not all(map(bytes.strip, parts)):
            self._split(parts, starts, ends, long, first)
        else:
            self._lines, self._skipped = parts, {}  # the usual case: every line a message
            self._starts, self._ends = starts, ends
        self._next = 0
        if len(self._tail) > self.max_line_bytes:  # an over-long line: skip, do not buffer
            self._skip_from, self._skip_len = self._read_pos, len(self._tail)
            self._read_pos += len(self._tail)
            self._tail = b""
        elif first:
            self._skip_from = None

    def _split(
        self,
        parts: list[bytes],
        starts: npt.NDArray[np.int64],
        ends: npt.NDArray[np.int64],
        long: npt.NDArray[np.bool_],
        first: list[tuple[int, int]],
    ) -> None:
        """The chunk's lines when some are blank, end in ``\\r`` or are over-long."""
        lines: list[bytes] = []
        keep_starts, keep_ends = [], []
        skipped: dict[int, Skipped] = {}
        if first:
            start, end = first[0]
            skipped[0] = Skipped(0, start, self._skip_len)
            lines.append(b"")
            keep_starts.append(start)
            keep_ends.append(end)
        for i, part in enumerate(parts):
            if long[i]:
                skipped[len(lines)] = Skipped(0, int(starts[i]), len(part))
            elif not part.strip():
                continue
            lines.append(b"" if long[i] else part[:-1] if part.endswith(b"\r") else part)
            keep_starts.append(int(starts[i]))
            keep_ends.append(int(ends[i]))
        self._lines, self._skipped = lines, skipped
        self._starts = np.array(keep_starts, np.int64)
        self._ends = np.array(keep_ends, np.int64)

    def pause(self) -> None:
        """A file waits where it is; nothing to do."""

    def resume(self) -> None:
        """Nothing to do: the next poll reads on from the position."""

    def idle(self, timeout_s: float) -> None:
        time.sleep(timeout_s)

    def commit(self, positions: dict[int, int]) -> None:
        """A file keeps its position in the store's checkpoints; nothing to tell the file."""

    def close(self) -> None:
        self._fh.close()


def open_source(spec: str) -> FileSource:
    """``file:PATH`` (or a bare path). ``kafka://`` is handled by the Kafka source."""
    if spec.startswith("file:"):
        return FileSource(Path(spec[len("file:") :]).expanduser())
    if "://" in spec:
        raise SourceError(f"source {spec!r}: expected file:PATH or kafka://HOST:PORT/TOPIC")
    return FileSource(Path(spec).expanduser())
