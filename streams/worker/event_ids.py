"""Reused event ids: the ids seen in the last 25 hours of event time, with their fingerprints.

``events`` keeps one row per (model_id, event_id, fingerprint), so a second message under a
stored id used to replace the first: anyone able to reuse an id could erase their own trail.
Now each decoded batch is screened, in message order, against the ids seen so far:

- an id not seen: the event goes on, and its id and fingerprint are remembered;
- the same id with the same fingerprint (the same bytes): a replay (``run --from-start``, a
  restart after a crash re-reading what was stored, a producer's retry) goes on as before and
  writes the same row again;
- the same id with another fingerprint, stored earlier or earlier in the same batch: a dead
  letter ``conflicting_event_id`` with both fingerprints, and the stored version stays.

Why in memory, restored from the store at start, rather than a store lookup per batch: the
lookup would sit on the main thread of every batch, behind the events insert the early writer
has in flight (one chdb client, one call at a time), and an ``event_id`` lookup in ``events``
(ordered by model, then id) reads a granule per id. In memory it is a hash table of 64-bit
keyed hashes of the ids (``streams/store/fingerprint.py``), each with its message's fingerprint and
event minute: 20 bytes a slot, filled to at most 70%, probed by one compiled loop per batch
(about 0.1 us per event, plus 0.3 us for the fingerprints). At start it is refilled from the
``events`` rows of the last 25 hours before the newest stored event time, so a restart, a plain
rerun or a ``--from-start`` replay sees what earlier runs stored.

How far back: every id whose event time is within 25 hours of the watermark (24 hours, the
retry and replay horizon of the gateways and of Kafka's default consumer restarts, plus an hour
of lateness), while that is at most ``max_ids`` ids (10,000,000 by default, ~320 MiB at the
bound; 24 hours at 115 events/s). Past the bound the oldest ids go first and
``inferwatch_event_id_window_seconds`` says how far the check still reaches. An id reused
beyond the reach is stored beside the first version, not over it: ``events`` orders by
fingerprint after the id (``schemas/clickhouse/0006_fingerprints.sql``), so the first version
stays whatever the age, and ``SELECT event_id FROM events FINAL GROUP BY event_id HAVING
uniqExact(fingerprint) > 1`` finds such reuse. Rows stored before that migration have no
fingerprint and are not loaded.

Two keyed 64-bit hashes can collide: a different id with another's key and a different
fingerprint would be a false conflict, about once in 2^64 / 10^7 ~ 10^12 events at the bound;
it lands in the DLQ and ``dead_letters``, not lost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import numba
import numpy as np
import numpy.typing as npt
import pyarrow as pa

from schemas.batch import Decoded, Reject
from streams.store import fingerprint

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
MINUTE_MS = 60_000
WINDOW_MS = 25 * 3_600_000
MAX_IDS = 10_000_000
SWEEP_MS = 3_600_000  # expired ids are dropped once per hour of event time
MIN_SLOTS = 1 << 12
NEW, SAME, CONFLICT = 0, 1, 2
NO_TIME = np.iinfo(np.int32).min
_EMPTY = np.uint64(0)  # key of an empty slot
_ONE = np.uint64(1)

_F = TypeVar("_F", bound=Callable[..., Any])
_njit = cast(Callable[[_F], _F], numba.njit(cache=True, nogil=True))


@_njit
def _probe(table: Any, mins: Any, qk: Any, qf: Any, qm: Any, status: Any, stored: Any) -> int:
    """Look each query up in order and insert the new ones (open addressing, linear probing;
    ``table[slot]`` is (id key, fingerprint), key 0 an empty slot). Returns how many were
    inserted."""
    mask = np.int64(table.shape[0] - 1)
    umask = np.uint64(table.shape[0] - 1)
    added = 0
    for i in range(qk.size):
        k = qk[i] if qk[i] != _EMPTY else _ONE
        j = np.int64(k & umask)
        while True:
            if table[j, 0] == _EMPTY:
                table[j, 0] = k
                table[j, 1] = qf[i]
                mins[j] = qm[i]
                status[i] = 0
                added += 1
                break
            if table[j, 0] == k:
                if table[j, 1] == qf[i]:
                    status[i] = 1
                else:
                    status[i] = 2
                    stored[i] = table[j, 1]
                break
            j = (j + 1) & mask
    return added


@_njit
def _rehash(table: Any, mins: Any, cutoff: int, new: Any, new_mins: Any) -> int:
    """Copy the entries of minute >= ``cutoff`` into the empty table (new, new_mins)."""
    mask = np.int64(new.shape[0] - 1)
    umask = np.uint64(new.shape[0] - 1)
    n = 0
    for i in range(table.shape[0]):
        if table[i, 0] != _EMPTY and mins[i] >= cutoff:
            j = np.int64(table[i, 0] & umask)
            while new[j, 0] != _EMPTY:
                j = (j + 1) & mask
            new[j, 0], new[j, 1], new_mins[j] = table[i, 0], table[i, 1], mins[i]
            n += 1
    return n


class EventIds:
    """The ids seen within ``window_ms`` of event time before the watermark, at most
    ``max_ids`` of them, each with the fingerprint of its first message.

    >>> ids = EventIds(b"k")
    >>> ids.check(np.array([1, 2, 1, 2], np.uint64), np.array([7, 8, 7, 9], np.uint64),
    ...           np.zeros(4, np.int64))[0].tolist()
    [0, 0, 1, 2]
    """

    def __init__(self, secret: bytes, window_ms: int = WINDOW_MS, max_ids: int = MAX_IDS) -> None:
        self.key = fingerprint.derive_key(secret, b"event id")
        self.fingerprint_key = fingerprint.fingerprint_key(secret)
        self.window_ms = window_ms
        self.max_ids = max_ids
        self.count = 0
        self.evicted_total = 0  # ids dropped by the bound before their time was up
        self._cutoff_min = NO_TIME  # oldest minute kept after the bound last bit
        self._swept_ms = np.iinfo(np.int64).min
        self._alloc(MIN_SLOTS)

    def _alloc(self, slots: int) -> None:
        # key and fingerprint side by side: a probe touches one cache line
        self.table = np.zeros((slots, 2), np.uint64)
        self.mins = np.zeros(slots, np.int32)

    def reach_ms(self, watermark_ms: int) -> int:
        """How far back in event time the check reaches now."""
        if self._cutoff_min == NO_TIME or watermark_ms <= np.iinfo(np.int64).min // 2:
            return self.window_ms
        return int(min(self.window_ms, max(0, watermark_ms - self._cutoff_min * MINUTE_MS)))

    def id_keys(self, event_ids: npt.NDArray[np.object_] | pa.Array) -> U64:
        strings = event_ids if isinstance(event_ids, pa.Array) else pa.array(event_ids, pa.string())
        return fingerprint.of_strings(strings, self.key)

    def check(self, keys: U64, fps: U64, ts_ms: I64) -> tuple[npt.NDArray[np.int8], U64]:
        """Status (NEW, SAME, CONFLICT) of each (id key, fingerprint) in order, and for
        conflicts the stored fingerprint; new ones are remembered."""
        n = len(keys)
        status = np.zeros(n, np.int8)
        stored = np.zeros(n, np.uint64)
        if n == 0:
            return status, stored
        self._make_room(n)
        minutes = np.clip(ts_ms // MINUTE_MS, NO_TIME + 1, np.iinfo(np.int32).max)
        qk = np.ascontiguousarray(keys, np.uint64)
        qf = np.ascontiguousarray(fps, np.uint64)
        qm = minutes.astype(np.int32)
        self.count += _probe(self.table, self.mins, qk, qf, qm, status, stored)
        return status, stored

    def expire(self, watermark_ms: int) -> None:
        """Forget ids older than the window, once per hour of event time."""
        if watermark_ms - self._swept_ms < SWEEP_MS or watermark_ms < -(2**62):
            return
        self._swept_ms = watermark_ms
        cutoff = (watermark_ms - self.window_ms) // MINUTE_MS
        used = self.table[:, 0] != 0
        if np.any(self.mins[used] < cutoff):
            self._rebuild(int(cutoff), self.count)

    def _make_room(self, n: int) -> None:
        if self.count + n > self.max_ids:
            # the bound: drop the oldest minutes until the batch fits
            mins = np.sort(self.mins[self.table[:, 0] != 0])
            drop = min(len(mins), self.count + n - self.max_ids)
            cutoff = int(mins[drop - 1]) + 1 if drop else NO_TIME
            before = self.count
            self._rebuild(cutoff, max(0, self.count - drop) + n)
            self.evicted_total += before - self.count
            self._cutoff_min = max(self._cutoff_min, cutoff)
        elif (self.count + n) * 10 > len(self.table) * 7:
            self._rebuild(NO_TIME, self.count + n)

    def _rebuild(self, cutoff: int, expected: int) -> None:
        slots = MIN_SLOTS
        while expected * 2 > slots:
            slots *= 2
        old = self.table, self.mins
        self._alloc(slots)
        self.count = _rehash(*old, cutoff, self.table, self.mins)

    def screen(
        self, decoded: Decoded, messages: Sequence[bytes], fps: U64
    ) -> tuple[Decoded, dict[int, int]]:
        """``decoded`` without its conflicting events, which become rejects; and the stored
        fingerprint of each conflict, by message index. ``fps`` are the messages'."""
        batch = decoded.batch
        if batch.n == 0:
            return decoded, {}
        order = np.argsort(decoded.rows, kind="stable")  # message order: the first one wins
        keys = self.id_keys(batch.event_id)[order]
        status, stored = self.check(keys, fps[decoded.rows[order]], batch.ts_ms[order])
        conflicts = order[status == CONFLICT]
        if conflicts.size == 0:
            return decoded, {}
        previous = dict(zip(conflicts.tolist(), stored[status == CONFLICT].tolist(), strict=True))
        keep = np.ones(batch.n, bool)
        keep[conflicts] = False
        out: dict[int, int] = {}
        rejects = list(decoded.rejects)
        for row in conflicts.tolist():
            index = int(decoded.rows[row])
            out[index] = previous[row]
            event_id = str(batch.event_id[row])
            shown = event_id if len(event_id) <= 64 else event_id[:64] + "..."
            rejects.append(
                Reject(
                    index,
                    "conflicting_event_id",
                    f"event_id {shown!r} is stored with fingerprint "
                    f"{fingerprint.hex_of(previous[row])}; this message's is "
                    f"{fingerprint.hex_of(fps[index])}; the stored version is kept",
                    bytes(messages[index]),
                )
            )
        rejects.sort(key=lambda r: r.index)
        return Decoded(batch.take(keep), decoded.rows[keep], tuple(rejects)), out


def restore(store: Any, ids: EventIds) -> int:
    """Refill ``ids`` from the ``events`` rows of the last window before the newest stored
    event time (rows without a fingerprint, stored before it existed, are left out); the
    newest ones if there are more than the bound. Returns how many were loaded."""
    table = store.query_arrow(
        "SELECT event_id, reinterpretAsUInt64(reverse(unhex(fingerprint))) AS fp, "
        "toUnixTimestamp64Milli(ts) AS ts_ms FROM events WHERE fingerprint != '' AND ts >= "
        "(SELECT max(ts) FROM events WHERE fingerprint != '') - toIntervalMillisecond({w:Int64}) "
        "ORDER BY ts DESC LIMIT {limit:UInt64}",
        {"w": ids.window_ms, "limit": ids.max_ids},
    )
    if table.num_rows == 0:
        return 0
    keys = ids.id_keys(table.column("event_id").combine_chunks())
    fps = table.column("fp").to_numpy().astype(np.uint64)
    ts_ms = table.column("ts_ms").to_numpy().astype(np.int64)
    order = np.argsort(ts_ms, kind="stable")  # oldest first: their versions were stored first
    ids.check(keys[order], fps[order], ts_ms[order])
    return int(table.num_rows)
