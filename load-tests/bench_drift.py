"""Cost of ``drift.features``: microseconds per event, two ways.

1. The matrix path: 100 numeric features, a pre-built float32 matrix fed in batches of 10,000
   events (binning, hop histograms, and every test family evaluated at every hop of 100 events),
   the way ``load-tests/eval_drift.py`` runs its controls.
2. On the spine's benchmark workload (``streams.sim.simulate`` scenario ``bench``, decoded by the
   worker's pipeline in batches of 10,000 with every other shipped detector on): the time spent
   in ``drift.features``' own ``update`` and ``advance``, per event.

CPU time is the calling thread's (``time.thread_time``): the process's CPU time also counts
the library thread pools the decoder and the other detectors leave running, which made it read
up to twice the wall time of ``drift.features``' calls on the spine.

    .venv/bin/python load-tests/bench_drift.py [--batches 100] [--repeats 3] [--spine 200000]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detectors.drift.bins import build_layout
from detectors.drift.features.detector import FeatureDrift


def matrix(batches: int, repeats: int, features: int = 100, batch: int = 10_000) -> None:
    rng = np.random.default_rng(1)
    names = tuple(f"f{j}" for j in range(features))
    layout = build_layout(names, (False,) * features, rng.normal(size=(2_000, features)))
    data = rng.standard_normal((batches * batch, features), dtype=np.float32)
    runs = []
    for _ in range(repeats):
        eng = FeatureDrift().track_for_matrix("m", layout)
        eng.feed(layout.codes(data[:batch]))  # warm-up: first window, allocations
        t_codes = t_feed = 0.0
        cpu0 = time.thread_time()
        for a in range(batch, data.shape[0], batch):
            t0 = time.perf_counter()
            codes = layout.codes(data[a : a + batch])
            t1 = time.perf_counter()
            eng.feed(codes)
            t2 = time.perf_counter()
            t_codes += t1 - t0
            t_feed += t2 - t1
        n = data.shape[0] - batch
        cpu = (time.thread_time() - cpu0) / n * 1e6
        runs.append((t_codes / n * 1e6, t_feed / n * 1e6, cpu))
    total = [a + b for a, b, _ in runs]
    best = runs[int(np.argsort(total)[len(total) // 2])]
    print(
        f"matrix path, {features} features, batches of {batch:,}, hop 100, window 500: "
        f"{statistics.median(total):.2f} us/event wall (median of {repeats}; runs "
        f"{', '.join(f'{t:.2f}' for t in total)}); binning {best[0]:.2f}, hop histograms + "
        f"tests {best[1]:.2f}; thread CPU time {statistics.median(r[2] for r in runs):.2f} "
        "us/event "
        "(wall time inflates on a loaded machine, CPU time much less)"
    )


class Timed:
    """Forwards to a detector and adds up the time spent in it."""

    def __init__(self, det: Any) -> None:
        self.det = det
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.det, name)

    def update(self, batch: Any) -> Any:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return self.det.update(batch)
        finally:
            self.seconds += time.perf_counter() - t0
            self.cpu_seconds += time.thread_time() - c0

    def advance(self, watermark_ms: int) -> Any:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return self.det.advance(watermark_ms)
        finally:
            self.seconds += time.perf_counter() - t0
            self.cpu_seconds += time.thread_time() - c0


def spine(events: int, batch: int = 10_000) -> None:
    from detectors.registry import create, names
    from streams.sim.simulate import write
    from streams.worker.pipeline import Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.jsonl"
        write("bench", events, 1, path)
        lines = path.read_bytes().splitlines()
    others = [create(n) for n in names() if n != "drift.features"]
    timed = Timed(FeatureDrift())
    pipe = Pipeline([*others, timed])  # type: ignore[list-item]
    t0 = time.perf_counter()
    alerts = 0
    for a in range(0, len(lines), batch):
        part = lines[a : a + batch]
        res = pipe.process(part, np.zeros(len(part), np.int32), np.arange(a, a + len(part)))
        alerts += sum(1 for d, _ in res.alerts if d is timed)
    wall = time.perf_counter() - t0
    cols = {k: len(t.layout.names) for k, t in timed.det._tracks.items()}
    print(
        f"spine workload (scenario bench, {events:,} events, batches of {batch:,}): drift.features "
        f"{timed.seconds / events * 1e6:.2f} us/event wall, "
        f"{timed.cpu_seconds / events * 1e6:.2f} thread CPU, inside update+advance; whole pipeline "
        f"{wall / events * 1e6:.1f} us/event; tracks and columns {cols}; drift alerts {alerts}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spine", type=int, default=200_000, help="0 to skip")
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, Python {platform.python_version()}")
    matrix(args.batches, args.repeats)
    if args.spine:
        spine(args.spine)


if __name__ == "__main__":
    main()
