"""The fair pool a reference is built from: which events of a (model, version) it keeps, and when
it may freeze (the design is argued in ``docs/references.md``).

Every successful event is offered, in arrival order. Let ``s_c`` be the events seen from caller
``c`` (``api_key_id``), ``C`` the callers seen and ``N`` the reference size (2,000):

- **Water-filling.** The ``N`` events of the reference are split max-min fairly across callers:
  each caller gets ``min(s_c, level)`` of them, with the level as low as still makes ``N``. A
  big caller cannot crowd out a small one; a small one gives all it sent.
- **Share cap relative to the callers seen.** No caller may hold more than
  ``share_cap(C)`` of the reference: all of it with one caller, at most half once a second
  one exists, ``1 / sqrt(C)`` beyond four callers, never below ``max_caller_share`` (5%).
- **Freeze** at the first event after which the fair split fits under the cap
  (``sum_c min(s_c, cap) >= N``). One caller: after exactly ``N`` events. Several callers of
  similar volume: after ``N`` events too. A flooding caller among slow ones: once the others
  have sent enough to hold their share, however long that takes -- never on a count of events
  seen (``pipeline.detection_blind`` says so meanwhile).
- **Spread in event time.** A caller's rows are a uniform sample of all its events so far:
  the ``min(s_c, level)`` with the smallest hash of their ``event_id`` (a bottom-k sketch), not
  its first ones, so a burst at launch does not stand for the caller.

The pool keeps, per caller, its rows of the current split (the level only falls as events
arrive, and a bottom-k sample of a growing set only loses rows, so a dropped row is never
needed again): at most ``N + C`` rows. Everything is a function of the events in arrival order:
any cut into batches gives the same pool, freeze point and reference.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
StrArray = npt.NDArray[np.object_]


def share_cap(callers: int, floor: float) -> float:
    """The largest share of the reference one caller may hold when ``callers`` were seen.

    >>> [round(share_cap(c, 0.05), 3) for c in (1, 2, 4, 6, 20, 200, 1000)]
    [1.0, 0.5, 0.5, 0.408, 0.224, 0.071, 0.05]
    >>> share_cap(6, 1.0)  # max_caller_share 1.0: no cap (a reference from a file)
    1.0
    """
    if callers <= 1:
        return 1.0
    return max(floor, min(0.5, 1.0 / math.sqrt(callers)))


def cap_events(callers: int, floor: float, n_events: int) -> int:
    return max(1, int(share_cap(callers, floor) * n_events + 1e-9))


def water_level(counts: I64, n_events: int) -> int:
    """Smallest level ``t`` with ``sum(min(counts, t)) >= n_events``; the largest count when
    the counts do not reach ``n_events`` (everything is kept).

    >>> water_level(np.array([1500, 300, 200]), 1000)
    500
    >>> water_level(np.array([10, 5]), 100)
    10
    """
    if counts.size == 0:
        return 0
    top = int(counts.max())
    if int(counts.sum()) <= n_events:
        return top
    s = np.sort(counts)
    below = np.concatenate([[0], np.cumsum(s)])  # sum of the i smallest
    # for level t: sum(min(s, t)) = below[i] + t * (len - i), i = number of counts < t
    lo, hi = 1, top
    while lo < hi:
        mid = (lo + hi) // 2
        i = int(np.searchsorted(s, mid, side="left"))
        if int(below[i]) + mid * (s.size - i) >= n_events:
            hi = mid
        else:
            lo = mid + 1
    return lo


def quotas(counts: I64, n_events: int) -> I64:
    """Rows per caller of a reference of exactly ``min(n_events, sum(counts))`` rows: the fair
    split, the last row at the level going to the callers seen first."""
    level = water_level(counts, n_events)
    q = np.minimum(counts, max(level - 1, 0))
    short = min(n_events, int(counts.sum())) - int(q.sum())
    at_level = np.flatnonzero(counts >= level)
    q[at_level[:short]] += 1
    return q


def row_hash(event_ids: StrArray) -> npt.NDArray[np.uint32]:
    """A fixed 32-bit hash of each event id (CRC-32: the same in every process)."""
    return np.fromiter((zlib.crc32(str(e).encode()) for e in event_ids), np.uint32, len(event_ids))


def freeze_point(
    prior: I64, caller: I64, n_events: int, floor: float, callers_before: int
) -> int | None:
    """Index of the event after which the pool may freeze, or None. ``prior`` counts per caller
    before the batch (zeros for callers new in it), ``caller`` the events' callers."""
    n = caller.size
    if n == 0 or int(prior.sum()) + n < n_events:
        return None
    order = np.argsort(caller, kind="stable")
    grouped = caller[order]
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - np.searchsorted(grouped, grouped, side="left")
    count_after = prior[caller] + rank + 1  # the caller's events including this one
    first = (prior[caller] == 0) & (rank == 0)
    seen = callers_before + np.cumsum(first)
    distinct, at = np.unique(seen, return_inverse=True)  # new callers are few per batch
    caps = np.array([cap_events(int(c), floor, n_events) for c in distinct.tolist()], np.int64)
    caps = caps[at]
    cut = np.flatnonzero(np.diff(caps)) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [n]])
    current = prior.copy()
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        m = int(caps[a])
        base = int(np.minimum(current, m).sum())
        total = base + np.cumsum(count_after[a:b] <= m)
        hit = np.flatnonzero(total >= n_events)
        if hit.size:
            return int(a + int(hit[0]))
        current += np.bincount(caller[a:b], minlength=current.size)
    return None
