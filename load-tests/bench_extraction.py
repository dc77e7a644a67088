"""Cost of ``extraction.query_pattern``: microseconds per query and resident memory per key.

    .venv/bin/python load-tests/bench_extraction.py [--callers 1000000] [--batches 20]
        [--naive-callers 100000] [--ip]

1. **Vectorised detector, 64-dim vectors.** A 64-dim five-class logit model gets a reference
   from 2,000 natural vectors. Then ``--callers`` api keys (one query each, batches of 10,000)
   fill the key space: resident-memory growth divided by the keys is the state per tracked api
   key (key -> slot maps included). Then ``--batches`` batches of 10,000 queries from keys drawn
   at random among them are timed: ``update`` only (decode, routing, key lookups and sinks
   excluded; the key lookup is timed separately). ``--ip`` also gives every event a client IP
   (one per four keys), so the address table is tracked too.
2. **Naive reference, written here:** one Python object per key (a deque ring of projected
   queries, block counters, a streak) and a loop over events computing the same near-duplicate,
   repeat and off-manifold window counts from the same per-query geometry; timed on the same
   batches with ``--naive-callers`` objects, and its memory per key measured the same way.
3. **Spine workload:** the ``bench`` scenario (16 numeric features, 500 callers) decoded in
   batches of 10,000; ``update`` time per event, against the spine's 3 µs budget, over all
   batches and after the first (which loads numba's run-time and the cached kernels).

Figures depend on the machine; the README quotes them with the machine and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from detectors.base import DetectorInput, KeySpace, entity_keys  # noqa: E402
from detectors.extraction.query_pattern.detector import QueryPattern  # noqa: E402
from detectors.extraction.query_pattern.state import BLOCK  # noqa: E402
from detectors.models.reference_store import ReferenceStore  # noqa: E402
from detectors.models.routing import FeatureIndex, route  # noqa: E402
from detectors.query.sketch import RING  # noqa: E402
from schemas.batch import EventBatch, empty_batch  # noqa: E402

DIM, BATCH = 64, 10_000
_rng = np.random.default_rng(64)
_CENTRES = _rng.standard_normal((5, DIM))
_W = _rng.normal(0, 0.5, (5, DIM))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    return _CENTRES[rng.integers(0, 5, n)] + rng.normal(0, 0.8, (n, DIM))


def batch(keys: np.ndarray, x: np.ndarray, t0: int, ip: bool) -> EventBatch:
    n = keys.size

    def obj(v: Any) -> np.ndarray:
        return np.asarray(v, object)

    ips = obj([f"10.{k % 200}.{(k // 200) % 250}.{k // 50_000}" for k in (keys // 4).tolist()])
    return dataclasses.replace(
        empty_batch(),
        event_id=obj([f"e{t0 + i}" for i in range(n)]),
        ts_ms=1_767_225_600_000 + t0 + np.arange(n, dtype=np.int64),
        model_id=obj(["vec64"] * n),
        api_key_id=obj([f"key_{k:012x}" for k in keys.tolist()]),
        model_version=obj(["1"] * n),
        tenant=obj([""] * n),
        client_ip=ips if ip else obj([""] * n),
        user_agent=obj([""] * n),
        session_id=obj([""] * n),
        status=np.full(n, 200, np.int32),
        latency_ms=np.full(n, np.nan),
        tokens_in=np.full(n, -1, np.int64),
        tokens_out=np.full(n, -1, np.int64),
        num_values=np.zeros((n, 0)),
        cat_codes=np.zeros((n, 0), np.int32),
        vector=x,
        vector_len=np.full(n, DIM, np.int32),
        prompt=obj([""] * n),
        output_label=obj([""] * n),
        score_labels=tuple(f"c{i}" for i in range(5)),
        scores=x @ _W.T,
        output_value=np.full(n, np.nan),
        output_text=obj([""] * n),
        finish_reason=obj([""] * n),
        ground_truth=obj([""] * n),
        attributes=obj([""] * n),
        partition=np.zeros(n, np.int32),
        offset=np.arange(n, dtype=np.int64),
        payload_bytes=np.full(n, 500, np.int32),
    )


class NaiveKey:
    """One object per key: what the naive reference keeps."""

    __slots__ = ("blk", "cur", "prev", "ring", "seq", "streak")

    def __init__(self) -> None:
        self.ring: deque[tuple[bytes, int]] = deque(maxlen=RING)
        self.seq = 0
        self.cur = [0, 0, 0]
        self.prev = [0, 0, 0]
        self.blk = 0
        self.streak = 0


def naive_update(keys: dict[str, NaiveKey], b: EventBatch, qs: Any, near_thr: int) -> int:
    flagged = 0
    for i in range(b.n):
        st = keys.get(b.api_key_id[i])
        if st is None:
            st = keys[b.api_key_id[i]] = NaiveKey()
        q = qs.q[i].astype(np.int32)
        h = int(qs.h[i])
        best, repeat = 1 << 30, False
        for cq, ch in st.ring:
            d2 = int(((np.frombuffer(cq, np.int8).astype(np.int32) - q) ** 2).sum())
            if d2 == 0 and ch == h:
                repeat = True
            elif d2 < best:
                best = d2
        near = not repeat and best <= qs.near[i] ** 2
        st.streak = st.streak + 1 if near else (st.streak if repeat else 0)
        blk = st.seq // BLOCK
        if blk != st.blk:
            st.prev, st.cur, st.blk = st.cur, [0, 0, 0], blk
        st.cur[0] += near
        st.cur[1] += bool(qs.off[i]) and not repeat
        st.cur[2] += repeat
        flagged += st.cur[0] + st.prev[0] >= near_thr
        st.ring.append((qs.q[i].tobytes(), h))
        st.seq += 1
    return flagged


def reference(ip: bool) -> tuple[dict[tuple[str, str], Any], FeatureIndex]:
    rng = np.random.default_rng(1)
    store, index = ReferenceStore(max_caller_share=1.0), FeatureIndex()
    b = batch(np.arange(2_000), vectors(rng, 2_000), 0, ip)
    store.update(b, route(b, index))
    return store.frozen(), index


def vectorised(callers: int, n_batches: int, ip: bool) -> dict[str, float]:
    refs, index = reference(ip)
    det, ks = QueryPattern(), KeySpace()
    rng = np.random.default_rng(2)

    cpu: list[float] = []

    def feed(keys: np.ndarray, t0: int, timed: bool) -> tuple[float, float]:
        b = batch(keys, vectors(rng, keys.size), t0, ip)
        t1 = time.perf_counter()
        slots = {et: ks[et].lookup(entity_keys(b, et), b.ts_ms, b.partition)
                 for et in det.entity_types}  # fmt: skip
        t2 = time.perf_counter()
        inp = DetectorInput(b, slots, ks, 0, route(b, index), refs)
        t3, c3 = time.perf_counter(), time.process_time()
        det.update(inp)
        t4 = time.perf_counter()
        if timed:  # CPU time of the process: less sensitive than wall time to a loaded machine
            cpu.append(time.process_time() - c3)
        return t2 - t1, t4 - t3

    feed(np.arange(BATCH), 0, False)  # warm-up: imports, first allocation
    rss0 = rss_bytes()
    for a in range(BATCH, callers, BATCH):
        feed(np.arange(a, min(a + BATCH, callers)), a, False)
    grown = rss_bytes() - rss0
    lookups, updates = [], []
    for j in range(n_batches):
        lk, up = feed(rng.integers(0, callers, BATCH), callers + j * BATCH, True)
        lookups.append(lk)
        updates.append(up)
    return {
        "callers": float(ks["api_key"].size),
        "rss_per_key_B": grown / max(callers - BATCH, 1),
        "state_row_B": float(det.tables["api_key"].cols.dtype.itemsize),
        "update_us_per_query_median": float(np.median(updates)) / BATCH * 1e6,
        "update_us_per_query_p90": float(np.quantile(updates, 0.9)) / BATCH * 1e6,
        "update_cpu_us_per_query_median": float(np.median(cpu)) / BATCH * 1e6,
        "lookup_us_per_query_median": float(np.median(lookups)) / BATCH * 1e6,
    }


def naive(callers: int, n_batches: int) -> dict[str, float]:
    refs, index = reference(False)
    det = QueryPattern()
    rng = np.random.default_rng(2)
    keys: dict[str, NaiveKey] = {}
    thr = int(det.thr_near[2 * BLOCK])

    geometry: list[float] = []

    def feed(ids: np.ndarray, t0: int) -> float:
        b = batch(ids, vectors(rng, ids.size), t0, False)
        inp = DetectorInput(b, {}, KeySpace(), 0, route(b, index), refs)
        t0_ = time.perf_counter()
        qs = det._queries(inp)  # the same per-query geometry, timed apart
        t1 = time.perf_counter()
        naive_update(keys, b, qs, thr)
        geometry.append(t1 - t0_)
        return time.perf_counter() - t1

    rss0 = rss_bytes()
    for a in range(0, callers, BATCH):
        feed(np.arange(a, min(a + BATCH, callers)), a)
    grown = rss_bytes() - rss0
    times = [feed(rng.integers(0, callers, BATCH), callers + j * BATCH) for j in range(n_batches)]
    return {
        "callers": float(len(keys)),
        "rss_per_key_B": grown / callers,
        "loop_us_per_query_median": float(np.median(times)) / BATCH * 1e6,
        "geometry_us_per_query_median": float(np.median(geometry[-n_batches:])) / BATCH * 1e6,
    }


def spine_inputs(det: Any, events: int) -> Iterator[DetectorInput]:
    """The spine benchmark's events (scenario ``bench``) decoded, keyed, routed and through the
    reference store in batches, as the worker hands them to ``det``."""
    from schemas.decode import decode
    from streams.sim.simulate import simulate

    lines, _ = simulate("bench", events, seed=5)
    raw = list(lines)
    ks, index, store = KeySpace(), FeatureIndex(), ReferenceStore()
    for a in range(0, len(raw), BATCH):
        b = decode(raw[a : a + BATCH]).batch
        slots = {et: ks[et].lookup(entity_keys(b, et), b.ts_ms, b.partition)
                 for et in det.entity_types}  # fmt: skip
        views = route(b, index)
        store.update(b, views)
        yield DetectorInput(b, slots, ks, 0, views, store.frozen())


def spine(events: int) -> dict[str, float]:
    det = QueryPattern()
    total, cpu, n = 0.0, 0.0, 0
    first_s, first_n = 0.0, 0  # numba's run-time and cached kernels load on the first batch
    for inp in spine_inputs(det, events):
        t1, c1 = time.perf_counter(), time.process_time()
        det.update(inp)
        took = time.perf_counter() - t1
        total += took
        cpu += time.process_time() - c1
        n += inp.events.n
        if not first_n:
            first_s, first_n = took, inp.events.n
    return {
        "events": float(n),
        "update_us_per_event": total / n * 1e6,
        "update_cpu_us_per_event": cpu / n * 1e6,
        "update_us_per_event_after_first_batch": (total - first_s) / max(n - first_n, 1) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callers", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--naive-callers", type=int, default=100_000)
    parser.add_argument("--naive-batches", type=int, default=3)
    parser.add_argument("--spine-events", type=int, default=200_000)
    parser.add_argument("--ip", action="store_true")
    parser.add_argument("--only", choices=["vectorised", "naive", "spine"])
    args = parser.parse_args()
    print("load average before:", os.getloadavg(), flush=True)
    if args.only in (None, "vectorised"):
        print("vectorised", vectorised(args.callers, args.batches, args.ip), flush=True)
    if args.only in (None, "naive"):
        print("naive", naive(args.naive_callers, args.naive_batches), flush=True)
    if args.only in (None, "spine"):
        print("spine", spine(args.spine_events), flush=True)
    print("load average after:", os.getloadavg(), flush=True)


if __name__ == "__main__":
    main()
