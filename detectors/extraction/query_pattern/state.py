"""Keyed state of ``extraction.query_pattern``: its columns, the compiled per-caller pass over
them, and what its alerts say (see :mod:`detectors.extraction.query_pattern.detector` for what the
signals mean)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from detectors.base import NONE
from detectors.episodes import EPISODE_COLUMNS, Episode
from detectors.keyed.segments import BLOCK as BLOCK
from detectors.query import kernels
from detectors.query.sketch import DISTS, PROJ_DIM, RING, SW_A, SW_MU, SW_SIGMA, Queries

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
    **EPISODE_COLUMNS,  # the open episode (its place in the row is part of the saved format)
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
    updated in place, by the compiled row-at-a-time pass of :mod:`detectors.query.kernels`."""
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


def describe(et: str, ep: Episode, count: int) -> tuple[str, str]:
    """The title and summary of a query-pattern alert."""
    ev = ep.evidence
    who = {"api_key": "api key", "client_ip": "client IP", "session": "session"}[et]
    shown = ep.entity if et != "api_key" or len(ep.entity) <= 12 else ep.entity[:8] + "…"
    kind = ev.get("kind", "extraction")
    what = "evasion probing" if kind == "evasion" else "model extraction"
    summary = (
        f"{who} {ep.entity} on {ep.model_id}: {', '.join(ev.get('signals', []))} "
        f"after {ev.get('queries_before', '?')} queries; {count} flagged queries in the episode "
        f"(window of {ev.get('window', '?')} queries)."
    )
    return f"Query pattern: {what} by {who} {shown}", summary
