"""Saving and restoring per-key alert episodes, shared by the keyed detectors whose tables hold
an ``ep_start`` column (``NONE`` when no episode is open), an ``episodes`` dict of what an open
episode needs beyond its columns (entity, model, samples, evidence) and a ``saved`` set of slots
whose extras are in the store.

An open episode's extras are saved as a per-key blob (``Snapshot.extras``) with the key's
partition, so they move with the key in a rebalance and survive a restart; a closed one deletes
its blob. On restore, the keyed rows say which episodes are open: an episode the rows call closed
is dropped, a blob is used only for an open one, and an open episode whose blob was never saved
gets the detector's placeholder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import orjson

from detectors.base import KeySpace, Snapshot
from detectors.population import NONE as NONE  # re-exported for the episode tables

Extras = list[tuple[str, str, int, bytes | None]]


def snapshot_extras(tables: Mapping[str, Any], keyspace: KeySpace) -> Extras:
    """The extras of every changed key with an open episode, or a deletion for one whose saved
    episode closed."""
    extras: Extras = []
    for et, t in tables.items():
        dirty = np.flatnonzero(t.cols.dirty).tolist()
        changed = [s for s in dirty if s in t.episodes or s in t.saved]
        if not changed:
            continue
        keys = keyspace[et]
        names = keys.keys_of(np.asarray(changed, np.int64)).tolist()
        for slot, key in zip(changed, names, strict=True):
            ep = t.episodes.get(slot)
            blob = None if ep is None else orjson.dumps(ep.to_json())
            extras.append((et, str(key), int(keys.partition[slot]), blob))
            if ep is None:
                t.saved.discard(slot)
            else:
                t.saved.add(slot)
    return extras


def restore_keyed(
    name: str, tables: Mapping[str, Any], snapshot: Snapshot, keyspace: KeySpace
) -> None:
    """The keyed rows of ``snapshot`` into their tables."""
    for rows in snapshot.keyed:
        if rows.entity_type not in tables:
            raise ValueError(
                f"{name} keeps state for {', '.join(tables)}, not {rows.entity_type!r}"
            )
        tables[rows.entity_type].cols.restore(rows, keyspace[rows.entity_type])


def restore_episodes(
    name: str,
    tables: Mapping[str, Any],
    snapshot: Snapshot,
    keyspace: KeySpace,
    episode: Callable[..., Any],
    placeholder: Callable[[str, KeySpace, int], Any],
) -> None:
    """Open episodes after :func:`restore_keyed`: from their blobs, else placeholders."""
    for t in tables.values():  # episodes the restored rows say are closed
        for closed in [s for s in t.episodes if t.cols.cols["ep_start"][s] == NONE]:
            del t.episodes[closed]
            t.saved.discard(closed)
    for et, key, _, blob in snapshot.extras:
        if et not in tables:
            raise ValueError(f"{name} keeps no episodes for {et!r}")
        t = tables[et]
        slot = keyspace[et].slot_of(key)
        if blob and slot is not None and t.cols.cols["ep_start"][slot] != NONE:
            t.episodes[slot] = episode(**orjson.loads(blob))
            t.saved.add(slot)
    for et, t in tables.items():  # open episodes whose extras were not saved with them
        for slot in np.flatnonzero(t.cols.cols["ep_start"] != NONE).tolist():
            if slot not in t.episodes:
                t.episodes[slot] = placeholder(et, keyspace, slot)
