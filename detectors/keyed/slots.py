"""Key -> dense slot maps, one per entity type, with idle eviction in event time.

Every keyed detector stores its per-key state as numpy columns indexed by a slot. The map from
key to slot is shared by all detectors of an entity type (docs/architecture.md), so a batch is
looked up once, not once per detector. Lookups are batched: the keys of a batch are
dictionary-encoded first, so the Python dictionary is touched once per distinct key, not once
per event.

>>> ks = KeySlots("api_key")
>>> keys = np.array(["a", "b", "a"], dtype=object)
>>> ks.lookup(keys, np.array([10, 20, 30]), np.zeros(3, np.int32))
array([0, 1, 0])
>>> int(ks.last_seen_ms[0]), ks.size
(30, 2)
>>> evicted = ks.evict_idle(now_ms=10_000, idle_ms=5_000)
>>> evicted.tolist(), ks.last_evicted, ks.size
([0, 1], [('a', 0), ('b', 0)], 0)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

I64 = npt.NDArray[np.int64]


class KeySlots:
    """A growable key -> slot map for one entity type; freed slots are reused."""

    def __init__(self, entity_type: str, max_keys: int = 2_000_000) -> None:
        self.entity_type = entity_type
        self.max_keys = max_keys
        self._slot: dict[str, int] = {}
        self._keys: list[str | None] = []
        self._free: list[int] = []
        self.last_seen_ms = np.zeros(0, np.int64)
        self.partition = np.zeros(0, np.int32)
        self.seen_changed = np.zeros(0, bool)  # last_seen_ms moved since :meth:`take_seen`
        self.evictions_total = 0
        self.last_evicted: list[tuple[str, int]] = []  # (key, partition) freed last

    @property
    def size(self) -> int:
        return len(self._slot)

    @property
    def capacity(self) -> int:
        return len(self._keys)

    def slot_of(self, key: str) -> int | None:
        return self._slot.get(key)

    def keys_of(self, slots: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.object_]:
        out = np.empty(len(slots), dtype=object)
        for i, s in enumerate(slots.tolist()):
            out[i] = self._keys[s]
        return out

    def active_slots(self) -> I64:
        return np.fromiter(self._slot.values(), np.int64, len(self._slot))

    def assign(self, keys: list[str], partitions: list[int]) -> I64:
        """Slots for distinct ``keys``, creating new ones (used by lookups and restores)."""
        out = np.empty(len(keys), np.int64)
        for i, key in enumerate(keys):
            slot = self._slot.get(key)
            if slot is None:
                slot = self._new_slot(key)
            out[i] = slot
        if len(keys):
            self.partition[out] = np.asarray(partitions, np.int32)
        return out

    def _new_slot(self, key: str) -> int:
        if self._free:
            slot = self._free.pop()
            self._keys[slot] = key
        else:
            slot = len(self._keys)
            self._keys.append(key)
            if slot >= self.last_seen_ms.shape[0]:
                grow = max(1024, slot * 2)
                self.last_seen_ms = np.resize(self.last_seen_ms, grow)
                self.partition = np.resize(self.partition, grow)
                self.seen_changed = np.resize(self.seen_changed, grow)
        self._slot[key] = slot
        self.last_seen_ms[slot] = np.iinfo(np.int64).min
        self.seen_changed[slot] = False
        return slot

    def lookup(
        self,
        keys: npt.NDArray[np.object_],
        ts_ms: npt.NDArray[np.int64],
        partition: npt.NDArray[np.int32],
    ) -> I64:
        """Slot per row; new keys get slots; ``last_seen_ms`` becomes the max event time seen."""
        if len(keys) == 0:
            return np.zeros(0, np.int64)
        encoded = pc.dictionary_encode(pa.array(keys, pa.string()))
        distinct = encoded.dictionary.to_pylist()
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        first_row = np.full(len(distinct), len(keys), np.int64)
        np.minimum.at(first_row, codes, np.arange(len(keys)))
        slots_of_distinct = self.assign(distinct, partition[first_row].tolist())
        slots: I64 = slots_of_distinct[codes]
        np.maximum.at(self.last_seen_ms, slots, ts_ms)
        self.seen_changed[slots_of_distinct] = True
        return slots

    def evict_idle(self, now_ms: int, idle_ms: int) -> I64:
        """Free the slots of keys idle for more than ``idle_ms`` of event time, and past max_keys
        the least recently seen ones; returns the freed slots (callers reset their state)."""
        active = self.active_slots()
        if active.size == 0:
            return active
        idle = active[self.last_seen_ms[active] < now_ms - idle_ms]
        over = self.size - idle.size - self.max_keys
        if over > 0:
            rest = np.setdiff1d(active, idle)
            oldest = rest[np.argsort(self.last_seen_ms[rest], kind="stable")[:over]]
            idle = np.concatenate([idle, oldest])
        self._free_slots(idle)
        self.evictions_total += int(idle.size)
        return idle

    def take_seen(self) -> tuple[tuple[str, ...], npt.NDArray[np.int32], I64]:
        """(keys, partitions, last-seen times) of the keys seen since the last call: what a
        checkpoint saves, so a restore gets each key's own last-seen time back."""
        slots = np.flatnonzero(self.seen_changed[: self.capacity]).astype(np.int64)
        self.seen_changed[slots] = False
        keys = tuple(str(k) for k in self.keys_of(slots))
        return keys, self.partition[slots].copy(), self.last_seen_ms[slots].copy()

    def restore_seen(self, keys: list[str], partitions: list[int], last_seen_ms: I64) -> None:
        """Put saved keys (back) into the map with their last-seen times (see
        :meth:`take_seen`)."""
        slots = self.assign(keys, partitions)
        self.last_seen_ms[slots] = last_seen_ms

    def settle(self, max_ts: dict[int, int]) -> None:
        """Keys restored without a last-seen time (saved before last-seen times were): give them
        their partition's latest event time, so idle eviction counts from the restore, not from
        the epoch."""
        active = self.active_slots()
        unseen = active[self.last_seen_ms[active] == np.iinfo(np.int64).min]
        for slot in unseen.tolist():
            self.last_seen_ms[slot] = max_ts.get(int(self.partition[slot]), np.iinfo(np.int64).min)

    def drop_partitions(self, partitions: set[int]) -> I64:
        """Free every slot whose key belongs to one of ``partitions`` (on revocation)."""
        active = self.active_slots()
        gone = active[np.isin(self.partition[active], np.fromiter(partitions, np.int32))]
        self._free_slots(gone)
        return gone

    def _free_slots(self, slots: I64) -> None:
        self.last_evicted = []
        for slot in slots.tolist():
            key = self._keys[slot]
            assert key is not None
            self.last_evicted.append((key, int(self.partition[slot])))
            del self._slot[key]
            self._keys[slot] = None
            self.seen_changed[slot] = False
            self._free.append(slot)
