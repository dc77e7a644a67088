"""Cost of ``privacy.query_probing``: microseconds per event on the spine's workload, and per
query with many keys.

    .venv/bin/python load-tests/bench_privacy.py [--only spine|keys] [--spine-events 200000]
        [--callers 1000000] [--batches 20]

1. **Spine** (``--only spine``): the ``bench`` scenario (one 16-feature tabular model, 500
   callers, ~500-byte events) decoded in batches of 10,000, the reference store fed as the worker
   feeds it; ``update`` time per event (wall and CPU time of the process), against the issue's
   2 µs budget, and the same without the batch that calibrated the model (a one-time cost per
   model version: part 1's sketch and the radii). Like ``bench_extraction.py --only spine``.
2. **Keys** (``--only keys``): ``bench_extraction.py``'s 64-dim five-class logit model;
   ``--callers`` api keys fill the key space (resident-memory growth per key, key maps
   included), then ``--batches`` batches of 10,000 queries from random keys are timed.

The load average is printed before and after: the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "load-tests"))

from bench_extraction import BATCH, batch, reference, rss_bytes, spine_inputs, vectors  # noqa: E402

from detectors.base import DetectorInput, KeySpace, entity_keys  # noqa: E402
from detectors.models.routing import route  # noqa: E402
from detectors.privacy.query_probing.detector import QueryProbing  # noqa: E402


def spine(events: int) -> dict[str, float]:
    det = QueryProbing()
    total, cpu, n, timed = 0.0, 0.0, 0, 0
    steady, steady_n = 0.0, 0  # batches after the one that calibrated the model
    for inp in spine_inputs(det, events):
        b = inp.events
        known = len(det._cal)
        t1, c1 = time.perf_counter(), time.process_time()
        det.update(inp)
        took = time.perf_counter() - t1
        total += took
        cpu += time.process_time() - c1
        n += b.n
        timed += int(bool(inp.references))
        if len(det._cal) == known and known:
            steady += took
            steady_n += b.n
    return {
        "events": float(n),
        "batches_with_a_reference": float(timed),
        "update_us_per_event": total / n * 1e6,
        "update_cpu_us_per_event": cpu / n * 1e6,
        "steady_us_per_event": steady / max(steady_n, 1) * 1e6,  # the one-time calibration out
    }


def keys(callers: int, n_batches: int) -> dict[str, float]:
    refs, index = reference(False)
    det, ks = QueryProbing(), KeySpace()
    rng = np.random.default_rng(2)
    updates: list[float] = []

    def feed(ids: np.ndarray, t0: int, timed: bool) -> None:
        b = batch(ids, vectors(rng, ids.size), t0, False)
        slots = {"api_key": ks["api_key"].lookup(entity_keys(b, "api_key"), b.ts_ms, b.partition)}
        inp = DetectorInput(b, slots, ks, 0, route(b, index), refs)
        t1 = time.perf_counter()
        det.update(inp)
        if timed:
            updates.append(time.perf_counter() - t1)

    feed(np.arange(BATCH), 0, False)
    rss0 = rss_bytes()
    for a in range(BATCH, callers, BATCH):
        feed(np.arange(a, min(a + BATCH, callers)), a, False)
    grown = rss_bytes() - rss0
    for j in range(n_batches):
        feed(rng.integers(0, callers, BATCH), callers + j * BATCH, True)
    return {
        "callers": float(ks["api_key"].size),
        "rss_per_key_B": grown / max(callers - BATCH, 1),
        "state_row_B": float(det.tables["api_key"].cols.dtype.itemsize),
        "update_us_per_query_median": float(np.median(updates)) / BATCH * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["spine", "keys"])
    parser.add_argument("--spine-events", type=int, default=200_000)
    parser.add_argument("--callers", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    print("load average before:", os.getloadavg(), flush=True)
    if args.only in (None, "spine"):
        print("spine", spine(args.spine_events), flush=True)
    if args.only in (None, "keys"):
        print("keys", keys(args.callers, args.batches), flush=True)
    print("load average after:", os.getloadavg(), flush=True)


if __name__ == "__main__":
    main()
