"""Per-key reductions over the rows of a batch sorted by key (a key's rows form one contiguous
segment), and the two-block windows of per-key counts the query detectors keep: a window is a
key's previous block of ``BLOCK`` queries and its current one, so a batch cut anywhere gives the
same counts."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]

BLOCK = 128  # queries per window block; a window is the previous block and the current one


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
