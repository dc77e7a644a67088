"""Sources: where messages come from. A source polls batches, seeks and commits positions.

A position is the offset of the next message to read, per partition. A JSONL file is one
partition (0) whose offsets are byte offsets of line starts, so a rerun resumes exactly where
the last checkpoint left off. The Kafka source lives in ``streams/kafka_source.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class Polled:
    messages: list[bytes]
    partition: npt.NDArray[np.int32]
    offset: npt.NDArray[np.int64]
    next_offsets: dict[int, int]  # position after this batch, per partition that delivered


@dataclass
class Rebalance:
    """Callbacks a source calls when partitions move (Kafka); a file source never does."""

    on_revoke: Callable[[set[int]], None] = lambda parts: None
    on_assign: Callable[[set[int]], dict[int, int]] = lambda parts: {}
    revoked: set[int] = field(default_factory=set)


class Source(Protocol):
    name: str

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


class SourceError(Exception):
    """A source that cannot be opened as configured."""


class FileSource:
    """JSONL file, one event per line; blank lines are skipped, ``\\r\\n`` endings accepted."""

    def __init__(self, path: Path, read_bytes: int = 8 << 20) -> None:
        if not path.exists():
            raise SourceError(f"source file {path} does not exist")
        if path.is_dir():
            raise SourceError(f"source file {path} is a directory; expected a JSONL file")
        self.path = path.resolve()
        self.name = f"file:{self.path}"
        self.read_bytes = read_bytes
        self._fh = self.path.open("rb")
        self._pos = 0  # byte offset of the first unread line
        self._buffer = b""
        self._eof = False

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    @property
    def position(self) -> int:
        return self._pos

    def seek(self, positions: dict[int, int]) -> None:
        self._pos = positions.get(0, 0)
        self._fh.seek(self._pos)
        self._buffer = b""
        self._eof = False

    def assigned(self) -> set[int]:
        return {0}

    @property
    def exhausted(self) -> bool:
        return self._eof and not self._buffer

    def poll(self, max_messages: int, timeout_s: float = 0.0) -> Polled:
        lines: list[bytes] = []
        offsets: list[int] = []
        pos = self._pos
        while len(lines) < max_messages:
            last_nl = self._buffer.rfind(b"\n")
            if last_nl < 0:
                if not self._eof:
                    chunk = self._fh.read(self.read_bytes)
                    self._eof = not chunk
                    self._buffer += chunk
                    continue
                if self._buffer:  # a last line without a newline
                    self._add(lines, offsets, self._buffer, pos)
                    pos += len(self._buffer)
                    self._buffer = b""
                break
            take = self._buffer[:last_nl].split(b"\n")[: max_messages - len(lines)]
            consumed = 0
            for line in take:
                self._add(lines, offsets, line, pos + consumed)
                consumed += len(line) + 1
            pos += consumed
            self._buffer = self._buffer[consumed:]
        self._pos = pos
        return Polled(
            lines,
            np.zeros(len(lines), np.int32),
            np.asarray(offsets, np.int64),
            {0: pos},
        )

    @staticmethod
    def _add(lines: list[bytes], offsets: list[int], line: bytes, pos: int) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.strip():
            lines.append(line)
            offsets.append(pos)

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
