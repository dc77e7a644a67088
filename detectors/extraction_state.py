"""Keyed state of ``extraction.query_pattern``: its columns, the windowed signal counts, and the
episodes with their alerts (see :mod:`detectors.extraction` for what the signals mean)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np
import numpy.typing as npt

from detectors import kernels
from detectors.base import (
    EMPTY,
    F64,
    I64,
    AlertChange,
    DetectorInput,
    KeyedColumns,
    KeySpace,
    Output,
    Snapshot,
    entity_name,
)
from detectors.episodes import NONE as NONE
from detectors.episodes import restore_episodes, restore_keyed, snapshot_extras
from detectors.query_sketch import DISTS, PROJ_DIM, RING, SW_A, SW_MU, SW_SIGMA, Queries

BLOCK = 128  # queries per window block; a window is the previous block and the current one
# windowed signals: near-duplicate, off-manifold, low-margin, exact repeat, 8 class buckets,
# then queries on the key's lattice base
SIGNALS = ("near_dup", "off_manifold", "low_margin", "repeat")
N_SIG = len(SIGNALS) + 8 + 1
LATTICE = N_SIG - 1

COLUMNS: dict[str, tuple[Any, Any]] = {
    "seq": (np.int64, 0),  # queries seen
    "dseq": (np.int64, 0),  # queries seen that were not exact repeats (they move the window)
    "ring_q": (np.dtype((np.int8, (RING, PROJ_DIM))), 0),  # query t at t % RING
    "ring_h": (np.dtype((np.uint32, (RING,))), 0),
    "dists": (np.dtype((np.uint8, (DISTS,))), 0),  # minimum distances, record r at r % DISTS
    "n_dists": (np.int64, 0),
    "prada_z": (np.float32, 0.0),  # Royston z of the last normality test
    "streak": (np.int32, 0),  # consecutive near-duplicate queries
    "blk": (np.int64, 0),  # block of the current window half
    "cur": (np.dtype((np.int16, (N_SIG,))), 0),
    "prev": (np.dtype((np.int16, (N_SIG,))), 0),
    "last_flag": (np.int64, NONE),  # event time of the last flagged query, kept after episodes
    "blk_all": (np.int64, 0),  # the same over all queries, repeats included: near-duplicates
    "cur_all": (np.dtype((np.int16, (2,))), 0),  # and repeats are a share of all traffic
    "prev_all": (np.dtype((np.int16, (2,))), 0),
    "ep_start": (np.int64, NONE),  # open episode's first flagged event time
    "ep_last": (np.int64, 0),  # its last flagged event time
    "ep_count": (np.int64, 0),  # flagged queries in the episode
    "ep_peak": (np.float32, 0.0),
    "ep_seq0": (np.int64, 0),  # queries seen before the episode opened
    "lat_base": (np.uint32, 0),  # lane hash of the key's lattice base record
    "lat_score": (np.int16, 0),  # +3 per fresh query on the base, -1 off it (floor 0, cap)
}


class CallerParams(NamedTuple):
    """Thresholds of one entity type, indexed by the window's length."""

    thr_near: npt.NDArray[np.int64]
    thr_off: npt.NDArray[np.int64]
    thr_low: npt.NDArray[np.int64]
    streak: float  # streak length that fires
    coverage_bits: float
    prada_alone: bool
    is_key: bool
    explain_ms: int
    lattice: int  # lattice score that fires


class CallerRows(NamedTuple):
    """Per processed row (batch order)."""

    flag: npt.NDArray[np.bool_]
    hit: npt.NDArray[np.bool_]  # (m, 6): near, streak, off, prada, boundary, lattice
    ratios: npt.NDArray[np.float64]  # (m, 6)
    counts: npt.NDArray[np.int32]  # (m, N_SIG) window counts
    n_w: npt.NDArray[np.int64]  # queries in the non-repeat window
    n_all: npt.NDArray[np.int64]  # queries in the all-query window
    streak: npt.NDArray[np.int64]
    z: npt.NDArray[np.float32]  # latest PRADA z
    ent: npt.NDArray[np.float64]  # class entropy of the window, bits
    seq: npt.NDArray[np.int64]  # the key's queries before this one
    covered: npt.NDArray[np.bool_]  # within an episode of the key (explains the row)
    lat: npt.NDArray[np.int16]  # the key's lattice score after the row


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


class Table:
    """All state of one entity type."""

    def __init__(self) -> None:
        self.cols = KeyedColumns(COLUMNS)
        self.episodes: dict[int, Episode] = {}
        self.saved: set[int] = set()  # slots whose episode extras are in the store


def caller_rows(
    cols: dict[str, npt.NDArray[Any]],
    dirty: npt.NDArray[np.bool_],
    slots: npt.NDArray[np.int64],
    rows: npt.NDArray[np.int64],
    qs: Queries,
    ts: npt.NDArray[np.int64],
    params: CallerParams,
) -> CallerRows:
    """Every row (batch order; ``slots`` its key's slot) against its key's state, which is
    updated in place, by the compiled row-at-a-time pass of :mod:`detectors.kernels`."""
    m, cap = rows.size, cols["seq"].size
    q = np.ascontiguousarray(qs.q[rows])
    out = CallerRows(
        np.zeros(m, bool), np.zeros((m, 6), bool), np.zeros((m, 6)), np.zeros((m, N_SIG), np.int32),
        np.zeros(m, np.int64), np.zeros(m, np.int64), np.zeros(m, np.int64),
        np.zeros(m, np.float32), np.zeros(m), np.zeros(m, np.int64), np.zeros(m, bool),
        np.zeros(m, np.int16),
    )  # fmt: skip
    kernels.caller_pass(
        slots, q.view(np.int64)[:, 0], q, qs.h[rows], qs.off[rows], qs.low[rows],
        qs.bucket[rows], qs.near[rows], qs.prada[rows], qs.h_prior[rows], ts,
        cols["seq"], cols["dseq"], cols["ring_q"].view(np.int64).reshape(cap, RING),
        cols["ring_q"], cols["ring_h"], cols["dists"], cols["n_dists"], cols["prada_z"],
        cols["streak"], cols["blk"], cols["cur"], cols["prev"], cols["blk_all"],
        cols["cur_all"], cols["prev_all"], cols["last_flag"], dirty,
        params.thr_near, params.thr_off, params.thr_low, float(params.streak),
        float(params.coverage_bits), params.prada_alone, params.is_key, params.explain_ms,
        BLOCK, SW_A, SW_MU, SW_SIGMA, *out[:11], qs.lanes[rows], cols["lat_base"],
        cols["lat_score"], params.lattice, out.lat,
    )  # fmt: skip
    return out


def segments(slots: I64) -> tuple[I64, I64, I64]:
    """For rows sorted by slot: segment start per row's segment, segment id per row, starts."""
    n = slots.size
    brk = np.ones(n, bool)
    brk[1:] = slots[1:] != slots[:-1]
    starts = np.flatnonzero(brk)
    seg_id = np.cumsum(brk) - 1
    return starts[seg_id], seg_id, starts


def window_counts(
    flags: npt.NDArray[np.int16],
    seq: I64,
    seg_id: I64,
    blk0: I64,
    cur0: npt.NDArray[np.int16],
    prev0: npt.NDArray[np.int16],
) -> tuple[npt.NDArray[np.int32], I64, I64, I64]:
    """Counts of every signal over each query's window (previous block + current block up to
    and including the query), for rows sorted by (key, seq); ``blk0``, ``cur0``, ``prev0`` are
    the stored state per row's key. Returns counts, and per row the new (blk, cur, prev) rows
    are read from the last row of each key: (counts, last-group block, totals, prev totals)."""
    n = seq.size
    b = seq // BLOCK
    brk = np.ones(n, bool)
    brk[1:] = (seg_id[1:] != seg_id[:-1]) | (b[1:] != b[:-1])
    gstart = np.flatnonzero(brk)
    gid = np.cumsum(brk) - 1
    f = flags.astype(np.int32)
    cs = np.cumsum(f, axis=0)
    before = np.where(gstart[:, None] > 0, cs[np.maximum(gstart - 1, 0)], 0)
    within = cs - before[gid]
    gb = b[gstart]
    gblk0, gcur0, gprev0 = blk0[gstart], cur0[gstart].astype(np.int32), prev0[gstart]
    base = np.where((gb == gblk0)[:, None], gcur0, 0)
    gend = np.append(gstart[1:], n) - 1
    total = base + within[gend]
    same_prev = np.zeros(gstart.size, bool)
    same_prev[1:] = (seg_id[gstart[1:]] == seg_id[gstart[:-1]]) & (gb[1:] == gb[:-1] + 1)
    prev_total = np.roll(total, 1, axis=0)
    prev = np.where(
        same_prev[:, None],
        prev_total,
        np.where(
            (gb == gblk0 + 1)[:, None],
            gcur0,
            np.where((gb == gblk0)[:, None], gprev0.astype(np.int32), 0),
        ),
    )
    counts = prev[gid] + base[gid] + within
    return counts.astype(np.int32), gb, total, prev


def group_index(seq: I64, seg_id: I64) -> I64:
    """Group (key, block) number of every row, as :func:`window_counts` numbers them."""
    brk = np.ones(seq.size, bool)
    brk[1:] = (seg_id[1:] != seg_id[:-1]) | (seq[1:] // BLOCK != seq[:-1] // BLOCK)
    out: I64 = np.cumsum(brk) - 1
    return out


def segmented_cummax(values: I64, seg_id: I64) -> I64:
    """Running maximum of ``values`` restarting at each (contiguous) segment."""
    if values.size == 0:
        return values
    distinct, rank = np.unique(values, return_inverse=True)
    width = int(distinct.size)
    acc = np.maximum.accumulate(seg_id * width + rank)
    out: I64 = distinct[acc - seg_id * width]
    return out


def entropy_bits(counts: npt.NDArray[Any]) -> F64:
    c = counts.astype(np.float64)
    tot = c.sum(axis=1, keepdims=True)
    p = np.divide(c, tot, out=np.zeros_like(c), where=tot > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out: F64 = -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=1)
    return out


def alert_for(
    et: str, table: Table, slot: int, status: str, close_after_ms: int, name: str
) -> AlertChange:
    cols = table.cols.cols
    ep = table.episodes[slot]
    ev = ep.evidence
    who = {"api_key": "api key", "client_ip": "client IP", "session": "session"}[et]
    shown = ep.entity if et != "api_key" or len(ep.entity) <= 12 else ep.entity[:8] + "…"
    kind = ev.get("kind", "extraction")
    what = "evasion probing" if kind == "evasion" else "model extraction"
    count = int(cols["ep_count"][slot])
    summary = (
        f"{who} {ep.entity} on {ep.model_id}: {', '.join(ev.get('signals', []))} "
        f"after {ev.get('queries_before', '?')} queries; {count} flagged queries in the episode "
        f"(window of {ev.get('window', '?')} queries)."
    )
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
        title=f"Query pattern: {what} by {who} {shown}",
        summary=summary,
        evidence=dict(ev),
        event_count=count,
        sample_event_ids=tuple(ep.samples),
        linked_entities=((et, ep.entity),),
        detector=name,
    )


class Episodes:
    """The episode half of :class:`detectors.extraction.QueryPattern`: a loop over the few
    flagged keys of a batch and the open episodes, never over all keys or events; and the
    state plumbing (evict, snapshot, restore)."""

    name: ClassVar[str]
    tables: dict[str, Table]
    close_ms: int

    def _episodes(
        self,
        et: str,
        table: Table,
        batch: DetectorInput,
        rows: I64,
        slots: I64,
        score: npt.NDArray[np.float64],
        evidence: list[dict[str, Any]],
        alerts: list[AlertChange],
    ) -> None:
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
                alerts.append(alert_for(et, table, slot, "firing", self.close_ms, self.name))
                ep.touched = ep.opened_now = False

    def _extend(
        self,
        et: str,
        table: Table,
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
            ep = table.episodes[slot] = self._placeholder(et, batch.keyspace, slot)
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

    def _placeholder(self, et: str, keyspace: KeySpace, slot: int) -> Episode:
        start = int(self.tables[et].cols.cols["ep_start"][slot])
        key = str(keyspace[et].keys_of(np.array([slot]))[0])
        return Episode(entity_name(et, key), "", "", start, start)

    def _close(self, et: str, table: Table, slot: int, alerts: list[AlertChange]) -> None:
        ep = table.episodes.get(slot)
        if ep is not None and ep.opened_now:  # opened and closed in one batch: say it fired
            alerts.append(alert_for(et, table, slot, "firing", self.close_ms, self.name))
        if ep is not None:
            alerts.append(alert_for(et, table, slot, "resolved", self.close_ms, self.name))
        table.episodes.pop(slot, None)
        cols = table.cols.cols
        for name in ("ep_start", "ep_last", "ep_count", "ep_peak", "ep_seq0"):
            cols[name][slot] = COLUMNS[name][1]
        table.cols.mark(np.array([slot]))

    def advance(self, watermark_ms: int) -> Output:
        """Close the episodes whose last flagged query is ``close_after_s`` behind."""
        alerts: list[AlertChange] = []
        for et, table in self.tables.items():
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

    def evict(self, entity_type: str, slots: I64) -> None:
        table = self.tables[entity_type]
        table.cols.ensure(int(slots.max()) + 1 if slots.size else 0)
        table.cols.clear(slots)
        for slot in slots.tolist():
            table.episodes.pop(slot, None)
            table.saved.discard(slot)  # the eviction deletes the key's rows

    def snapshot(self, keyspace: KeySpace) -> Snapshot:
        """Changed keyed rows, and the extras (entity, model, samples, evidence) of open
        episodes as per-key blobs, so they move with their key's partition. Nothing is
        model-level: the per-model geometry is derived from the references."""
        extras = snapshot_extras(self.tables, keyspace)
        keyed = tuple(t.cols.snapshot(keyspace[et]) for et, t in self.tables.items())
        return Snapshot(keyed=keyed, extras=tuple(extras))

    def restore(self, snapshot: Snapshot, keyspace: KeySpace) -> None:
        restore_keyed(self.name, self.tables, snapshot, keyspace)
        restore_episodes(self.name, self.tables, snapshot, keyspace, Episode, self._placeholder)
