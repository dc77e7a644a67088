"""Per-key alert episodes of the keyed detectors, composed into them: one :class:`Episode` type,
one :class:`EpisodeTable` (a detector's keyed columns, its open episodes and the slots whose
episodes are saved), and :class:`KeyEpisodes`, which opens, extends and closes episodes and
saves and restores them. A detector's table holds the :data:`EPISODE_COLUMNS` (``ep_start`` is
``NONE`` when no episode is open); what an alert says (title and summary) is the detector's.

An open episode's extras are saved as a per-key blob (``Snapshot.extras``) with the key's
partition, so they move with the key in a rebalance and survive a restart; a closed one deletes
its blob. On restore, the keyed rows say which episodes are open: an episode the rows call closed
is dropped, a blob is used only for an open one, and an open episode whose blob was never saved
gets the detector's placeholder.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from detectors.base import (
    EMPTY,
    I64,
    NONE,
    AlertChange,
    DetectorInput,
    KeyedColumns,
    KeySpace,
    Output,
    Snapshot,
    entity_name,
)

# the columns of an open episode, in every table that uses :class:`KeyEpisodes`
EPISODE_COLUMNS: dict[str, tuple[Any, Any]] = {
    "ep_start": (np.int64, NONE),  # open episode's first flagged event time
    "ep_last": (np.int64, 0),  # its last flagged event time
    "ep_count": (np.int64, 0),  # flagged events in the episode
    "ep_peak": (np.float32, 0.0),
    "ep_seq0": (np.int64, 0),  # the key's events before the episode opened
}

# (entity type, episode, flagged events) -> (title, summary) of its alert
Describe = Callable[[str, "Episode", int], tuple[str, str]]


@dataclass(slots=True)
class Episode:
    """What an open episode needs beyond its numeric columns."""

    entity: str
    model_id: str
    tenant: str
    crossing_ms: int
    first_ms: int
    samples: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)
    touched: bool = False
    opened_now: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "entity": self.entity,
            "model_id": self.model_id,
            "tenant": self.tenant,
            "crossing_ms": self.crossing_ms,
            "first_ms": self.first_ms,
            "samples": self.samples,
            "evidence": self.evidence,
        }


class EpisodeTable:
    """All state of one entity type: keyed columns and the open episodes' extras."""

    def __init__(self, columns: Mapping[str, tuple[Any, Any]]) -> None:
        missing = set(EPISODE_COLUMNS) - set(columns)
        if missing:
            raise ValueError(f"an episode table needs the columns {sorted(missing)}")
        self.cols = KeyedColumns(columns)
        self.episodes: dict[int, Episode] = {}
        self.saved: set[int] = set()  # slots whose episode extras are in the store


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


def episode_alert(
    et: str, table: EpisodeTable, slot: int, status: str, close_after_ms: int, name: str,
    describe: Describe,
) -> AlertChange:  # fmt: skip
    cols = table.cols.cols
    ep = table.episodes[slot]
    count = int(cols["ep_count"][slot])
    title, summary = describe(et, ep, count)
    last = int(cols["ep_last"][slot])
    resolved = status == "resolved"
    peak = float(cols["ep_peak"][slot])
    return AlertChange(
        entity_type=et,
        entity=ep.entity,
        model_id=ep.model_id,
        tenant=ep.tenant,
        status="resolved" if resolved else "firing",
        ts_ms=ep.crossing_ms,
        resolved_ms=last + close_after_ms if resolved else None,
        episode_start_ms=int(cols["ep_start"][slot]),
        first_seen_ms=ep.first_ms,
        last_seen_ms=last,
        score=peak,
        threshold=1.0,
        severity="high" if peak >= 2 else "medium",
        title=title,
        summary=summary,
        evidence=dict(ep.evidence),
        event_count=count,
        sample_event_ids=tuple(ep.samples),
        linked_entities=((et, ep.entity),),
        detector=name,
    )


class KeyEpisodes:
    """The episodes of one keyed detector: a loop over the few flagged keys of a batch and the
    open episodes, never over all keys or events; and their state plumbing (evict, snapshot,
    restore). The detector owns its tables and passes them in."""

    def __init__(self, name: str, close_ms: int, describe: Describe) -> None:
        self.name, self.close_ms, self.describe = name, close_ms, describe

    def _alert(self, et: str, table: EpisodeTable, slot: int, status: str) -> AlertChange:
        return episode_alert(et, table, slot, status, self.close_ms, self.name, self.describe)

    def extend(
        self,
        et: str,
        table: EpisodeTable,
        batch: DetectorInput,
        rows: I64,
        slots: I64,
        score: npt.NDArray[np.float64],
        evidence: list[dict[str, Any]],
        alerts: list[AlertChange],
    ) -> None:
        """Open or extend the episodes of the flagged ``rows`` (sorted by slot, ``slots``
        their keys'), closing first an episode whose last flagged event is too long before."""
        cols, ev = table.cols.cols, batch.events
        starts = np.flatnonzero(np.r_[True, slots[1:] != slots[:-1]])
        ends = np.append(starts[1:], slots.size)
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            slot = int(slots[a])
            ts = ev.ts_ms[rows[a:b]]
            open_last = int(cols["ep_last"][slot]) if cols["ep_start"][slot] != NONE else NONE
            prior = np.maximum.accumulate(np.r_[open_last, ts[:-1]])
            cuts = np.flatnonzero((prior != NONE) & (ts > prior + self.close_ms))
            bounds = [0, *cuts.tolist(), b - a]
            for lo, hi in itertools.pairwise(bounds):
                if lo == hi:
                    continue
                if (
                    cols["ep_start"][slot] != NONE
                    and ts[lo] > cols["ep_last"][slot] + self.close_ms
                ):
                    self._close(et, table, slot, alerts)
                self._extend(et, table, batch, slot, rows[a + lo : a + hi], ts[lo:hi],
                             score[a + lo : a + hi], evidence[a + lo : a + hi])  # fmt: skip
        for slot, ep in table.episodes.items():
            if ep.touched:
                alerts.append(self._alert(et, table, slot, "firing"))
                ep.touched = ep.opened_now = False

    def _extend(
        self,
        et: str,
        table: EpisodeTable,
        batch: DetectorInput,
        slot: int,
        rows: I64,
        ts: I64,
        score: npt.NDArray[np.float64],
        evidence: list[dict[str, Any]],
    ) -> None:
        cols, ev = table.cols.cols, batch.events
        ep = table.episodes.get(slot)
        if cols["ep_start"][slot] == NONE:
            first = int(rows[0])
            key = str(batch.keyspace[et].keys_of(np.array([slot]))[0])
            ep = table.episodes[slot] = Episode(
                entity_name(et, key), str(ev.model_id[first]), str(ev.tenant[first]),
                int(ts[0]), int(ts[0]), opened_now=True,
            )  # fmt: skip
            cols["ep_start"][slot] = int(ts[0])
            cols["ep_last"][slot] = int(ts[0])
            cols["ep_seq0"][slot] = int(evidence[0]["queries_seen"]) - 1
        elif ep is None:  # restored rows without their model-level extras
            ep = table.episodes[slot] = self._placeholder(table, et, batch.keyspace, slot)
        ep.touched = True
        cols["ep_last"][slot] = max(int(cols["ep_last"][slot]), int(ts.max()))
        cols["ep_count"][slot] += rows.size
        if len(ep.samples) < 5:
            ep.samples.extend(str(e) for e in ev.event_id[rows[: 5 - len(ep.samples)]])
        top = int(np.argmax(score))
        if float(score[top]) > float(cols["ep_peak"][slot]):
            cols["ep_peak"][slot] = score[top]
            ep.evidence = {
                **{k: v for k, v in evidence[top].items() if k != "label"},
                "model_id": str(ev.model_id[rows[top]]),
                "queries_before": int(cols["ep_seq0"][slot]),
                "peak_event_id": str(ev.event_id[rows[top]]),
            }
        table.cols.mark(np.array([slot]))

    @staticmethod
    def _placeholder(table: EpisodeTable, et: str, keyspace: KeySpace, slot: int) -> Episode:
        start = int(table.cols.cols["ep_start"][slot])
        key = str(keyspace[et].keys_of(np.array([slot]))[0])
        return Episode(entity_name(et, key), "", "", start, start)

    def _close(self, et: str, table: EpisodeTable, slot: int, alerts: list[AlertChange]) -> None:
        ep = table.episodes.get(slot)
        if ep is not None and ep.opened_now:  # opened and closed in one batch: say it fired
            alerts.append(self._alert(et, table, slot, "firing"))
        if ep is not None:
            alerts.append(self._alert(et, table, slot, "resolved"))
        table.episodes.pop(slot, None)
        cols = table.cols.cols
        for name, (_, default) in EPISODE_COLUMNS.items():
            cols[name][slot] = default
        table.cols.mark(np.array([slot]))

    def advance(self, tables: Mapping[str, EpisodeTable], watermark_ms: int) -> Output:
        """Close the episodes whose last flagged event is ``close_ms`` behind."""
        alerts: list[AlertChange] = []
        for et, table in tables.items():
            if not table.episodes:
                continue
            slots = np.fromiter(table.episodes, np.int64, len(table.episodes))
            due = slots[table.cols.cols["ep_last"][slots] + self.close_ms <= watermark_ms]
            for slot in np.sort(due).tolist():
                self._close(et, table, slot, alerts)
        if not alerts:
            return EMPTY
        alerts.sort(key=lambda a: (a.ts_ms, a.entity_type, a.entity))
        return Output(alerts=tuple(alerts))

    @staticmethod
    def evict(table: EpisodeTable, slots: I64) -> None:
        table.cols.ensure(int(slots.max()) + 1 if slots.size else 0)
        table.cols.clear(slots)
        for slot in slots.tolist():
            table.episodes.pop(slot, None)
            table.saved.discard(slot)  # the eviction deletes the key's rows

    @staticmethod
    def snapshot(tables: Mapping[str, EpisodeTable], keyspace: KeySpace) -> Snapshot:
        """Changed keyed rows, and the extras (entity, model, samples, evidence) of open
        episodes as per-key blobs, so they move with their key's partition."""
        extras = snapshot_extras(tables, keyspace)
        keyed = tuple(t.cols.snapshot(keyspace[et]) for et, t in tables.items())
        return Snapshot(keyed=keyed, extras=tuple(extras))

    def restore(
        self, tables: Mapping[str, EpisodeTable], snapshot: Snapshot, keyspace: KeySpace
    ) -> None:
        restore_keyed(self.name, tables, snapshot, keyspace)

        def placeholder(et: str, ks: KeySpace, slot: int) -> Episode:
            return self._placeholder(tables[et], et, ks, slot)

        restore_episodes(self.name, tables, snapshot, keyspace, Episode, placeholder)
