"""Throughput of the spine: file -> worker -> chdb, per stage and end to end, beside a baseline.

    .venv/bin/python load-tests/bench_pipeline.py [--runs 3] [--small 100000] [--large 400000]
        [--exclude drift.features]   # every shipped detector but these: what one of them adds

End-to-end events/s is (large - small) / (t_large - t_small) over two replays of simulated
tabular events (scenario ``bench``: ~500 bytes, 16 numeric features, two-class scores, 500
callers) with every shipped detector on, so start-up (imports, chdb, migrations) cancels out;
the median of ``--runs`` runs is printed. The baseline is a plain per-event loop: ``json.loads``,
a dict per event, one ``client.insert`` of row lists per 10,000-event batch, into the same chdb.
Per-stage microseconds per event come from the worker's own stage timers on the large run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


EXCLUDE: set[str] = set()  # registry names left out (--exclude)


def detectors() -> list[Any]:
    from detectors.registry import create, names

    return [create(n) for n in names() if n not in EXCLUDE]


def worker_run(path: Path, store_dir: Path) -> tuple[float, dict[str, float], int]:
    from streams.sources.base import FileSource
    from streams.store.store import Store
    from streams.worker.loop import Worker, WorkerSettings

    t0 = time.perf_counter()
    source = FileSource(path)
    with Store(f"chdb:{store_dir}") as store:
        counters = Worker(store, source, detectors(), WorkerSettings()).run()
    source.close()
    return time.perf_counter() - t0, dict(counters.stage_s), counters.events_total


def kafka_run(path: Path, store_dir: Path) -> tuple[float, dict[str, float], int]:
    """Produce the file to the embedded broker (paced on the group's lag, in a thread) while a
    worker consumes it into chdb; the clock runs until every event is committed."""
    import threading

    from streams.sim.broker import MockCluster, produce_paced
    from streams.sources.kafka import KafkaSource
    from streams.store.store import Store
    from streams.worker.loop import Worker, WorkerSettings

    topic, group = "inferwatch.events.v1", "bench"
    lines = path.read_bytes().splitlines()
    settings = WorkerSettings(checkpoint_s=1.0, checkpoint_events=20_000)
    with MockCluster() as cluster, Store(f"chdb:{store_dir}") as store:
        cluster.create_topic(topic)
        source = KafkaSource(cluster.bootstrap, topic, group)
        worker = Worker(store, source, detectors(), settings)
        done = threading.Event()

        def produce() -> None:
            produce_paced(cluster, topic, lines, group, 30_000, timeout_s=300)
            while not cluster.caught_up(topic, group):
                time.sleep(0.05)
            done.set()
            worker.stop_requested.set()

        t0 = time.perf_counter()
        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        counters = worker.run()
        secs = time.perf_counter() - t0
        thread.join()
        source.close()
    assert done.is_set() and counters.events_total == len(lines), counters
    return secs, dict(counters.stage_s), counters.events_total


def baseline_run(path: Path, store_dir: Path) -> float:
    """The naive way: one Python dict per event, row lists, one insert per batch."""
    from streams.store.store import Store

    cols = ["event_id", "ts", "model_id", "api_key_id", "client_ip", "features", "scores"]
    t0 = time.perf_counter()
    with Store(f"chdb:{store_dir}") as store, path.open("rb") as fh:
        rows: list[list[object]] = []
        for line in fh:
            ev = json.loads(line)
            ts = ev["ts"]
            rows.append(
                [
                    ev["event_id"],
                    _parse_ts(ts),
                    ev["model_id"],
                    ev["api_key_id"],
                    ev.get("client_ip", ""),
                    ev.get("input", {}).get("features", {}),
                    ev.get("output", {}).get("scores", {}),
                ]
            )
            if len(rows) == 10_000:
                store.client.insert("events", rows, column_names=cols)
                rows = []
        if rows:
            store.client.insert("events", rows, column_names=cols)
    return time.perf_counter() - t0


def _parse_ts(ts: str | int) -> dt.datetime:
    if isinstance(ts, int):
        return dt.datetime.fromtimestamp(ts / 1000, dt.UTC)
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))


def in_subprocess(kind: str, path: Path) -> dict[str, object]:
    """Each run in a fresh process with a fresh store: chdb allows one store per process."""
    with tempfile.TemporaryDirectory() as tmp:
        code = (
            f"import json,sys; sys.path.insert(0, {str(ROOT)!r}); import importlib.util as u; "
            f"s=u.spec_from_file_location('b', {__file__!r}); b=u.module_from_spec(s); "
            f"s.loader.exec_module(b); b.EXCLUDE.update({sorted(EXCLUDE)!r}); "
            f"print(json.dumps(b.one({kind!r}, {str(path)!r}, {str(Path(tmp) / 'store')!r})))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def one(kind: str, path: str, store_dir: str) -> dict[str, object]:
    if kind in ("worker", "kafka"):
        run = worker_run if kind == "worker" else kafka_run
        secs, stages, n = run(Path(path), Path(store_dir))
        return {"seconds": secs, "stages": stages, "events": n}
    return {"seconds": baseline_run(Path(path), Path(store_dir))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--large", type=int, default=400_000)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--only", choices=["worker", "kafka", "baseline"], default=None)
    parser.add_argument("--exclude", action="append", default=[], help="a registry name")
    args = parser.parse_args()
    EXCLUDE.update(args.exclude)
    from streams.sim.simulate import write

    with tempfile.TemporaryDirectory() as tmp:
        small, large = Path(tmp) / "small.jsonl", Path(tmp) / "large.jsonl"
        write("bench", args.small, 1, small)
        write("bench", args.large, 1, large)
        size = large.stat().st_size / args.large
        print(f"machine: {platform.machine()}, {platform.python_version()}, bytes/event {size:.0f}")
        if EXCLUDE:
            print(f"detectors left out: {', '.join(sorted(EXCLUDE))}")
        kinds = ["worker", "kafka"] + ([] if args.skip_baseline else ["baseline"])
        kinds = [args.only] if args.only else kinds
        for kind in kinds:
            rates, whole, stage_runs = [], [], []
            for _ in range(args.runs):
                a = in_subprocess(kind, small)
                b = in_subprocess(kind, large)
                rate = (args.large - args.small) / (float(b["seconds"]) - float(a["seconds"]))
                rates.append(rate)
                whole.append(args.large / float(b["seconds"]))
                if kind != "baseline":
                    stage_runs.append(b["stages"])
            what = "kafka -> chdb" if kind == "kafka" else "file -> chdb "
            print(
                f"{kind:9} {what}: {statistics.median(rates):>10,.0f} events/s "
                f"(runs: {', '.join(f'{r:,.0f}' for r in rates)})"
            )
            print(
                f"{'':9} {'whole run':13}: {statistics.median(whole):>10,.0f} events/s "
                f"({args.large:,} events over the whole run, start-up included; runs: "
                f"{', '.join(f'{r:,.0f}' for r in whole)})"
            )
            if stage_runs:
                stages = stage_runs[len(stage_runs) // 2]
                assert isinstance(stages, dict)
                for stage, secs in stages.items():
                    print(f"    {stage:34} {secs / args.large * 1e6:7.2f} us/event")


if __name__ == "__main__":
    main()
