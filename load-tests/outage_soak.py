"""A long store outage against a real worker process: by default 60 s of every store call
failing (``INFERWATCH_FAULT=sink_outage``) while a paced producer keeps writing to the mock Kafka
cluster. Prints, once a second, the worker's resident memory, whether it is paused, its consumer
lag and the webhook deliveries; then checks that every event is stored once, that the
``pipeline.sink_paused`` alert reached the webhook firing and resolved, and that the worker's
memory stayed flat while paused.

    .venv/bin/python load-tests/outage_soak.py [--outage-s 60] [--events 20000] [--rate 200]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import orjson  # noqa: E402

from streams.api.client import read_api_file  # noqa: E402
from streams.sim.broker import MockCluster, keys_of  # noqa: E402
from streams.sim.simulate import simulate  # noqa: E402
from streams.store.store import Store  # noqa: E402


class Receiver:
    def __init__(self) -> None:
        self.keys: list[str] = []
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                rec.keys.append(self.headers["Idempotency-Key"])
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric(store_dir: Path, name: str) -> float | None:
    info = read_api_file(store_dir)
    if info is None:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{info.port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    values = [float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name)]
    return sum(values) if values else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outage-s", type=float, default=60.0)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=200.0, help="events per second produced")
    args = ap.parse_args()

    start_ms = int(time.time() * 1000) - 3_600_000
    lines = list(simulate("default", args.events, 21, start_ms=start_ms)[0])
    topic, group = "soak.events.v1", "soak"
    receiver = Receiver()
    with MockCluster() as cluster, tempfile.TemporaryDirectory() as tmp:
        store_dir = Path(tmp) / "store"
        cluster.create_topic(topic)
        env = {
            **os.environ,
            "INFERWATCH_FAULT": f"sink_outage:3:{args.outage_s}",
            "INFERWATCH_KAFKA_SESSION_TIMEOUT_MS": "6000",
        }
        cmd = [sys.executable, "-m", "streams.cli", "run", "--source",
               cluster.source(topic, group), "--store", f"chdb:{store_dir}", "-q",
               "--checkpoint-s", "1", "--webhook", receiver.url]  # fmt: skip
        log = open(Path(tmp) / "worker.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log)
        produced = 0
        t0 = time.monotonic()
        samples: list[tuple[float, float, float | None, float | None]] = []
        try:
            while produced < len(lines) or not cluster.caught_up(topic, group):
                due = min(len(lines), int((time.monotonic() - t0) * args.rate))
                if due > produced:
                    part = lines[produced:due]
                    cluster.produce(topic, part, keys_of(part))
                    produced = due
                if proc.poll() is not None:
                    raise SystemExit(f"worker exited with {proc.returncode}")
                paused = metric(store_dir, "inferwatch_sink_paused")
                lag = metric(store_dir, "inferwatch_consumer_lag_messages")
                samples.append((time.monotonic() - t0, rss_mib(proc.pid), paused, lag))
                t, rss, paused_now, lag_now = samples[-1]
                print(
                    f"t={t:6.1f}s  rss={rss:7.1f} MiB  paused={paused_now}  lag={lag_now}  "
                    f"produced={produced:,}  webhook={len(receiver.keys)}",
                    flush=True,
                )
                if time.monotonic() - t0 > args.outage_s + 600:
                    raise SystemExit("not caught up 10 minutes after the outage")
                time.sleep(1.0)
            committed = cluster.committed(topic, group)
            marks = cluster.watermarks(topic)
            lost = {p: low - committed.get(p, 0) for p, (low, _) in marks.items()
                    if low > committed.get(p, 0)}  # fmt: skip
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
        with Store(f"chdb:{store_dir}") as store:
            counts = dict(
                store.query(
                    "SELECT event_id, count() FROM events FINAL GROUP BY event_id"
                ).result_rows
            )
            outage = store.query(
                "SELECT alert_id, status FROM alerts FINAL WHERE detector = 'pipeline.sink_paused'"
            ).result_rows
    ids = {orjson.loads(line)["event_id"] for line in lines}
    paused_rss = [rss for _, rss, p, _ in samples if p == 1.0]
    paused_s = sum(1 for *_, p, _ in samples if p == 1.0)
    print(f"\nproduced {len(lines):,} events at {args.rate:.0f}/s; outage {args.outage_s:.0f} s")
    print(f"paused for about {paused_s} s (1 s samples)")
    if paused_rss:
        print(f"worker RSS while paused: {min(paused_rss):.1f} .. {max(paused_rss):.1f} MiB")
    stored_once = set(counts) == ids and set(counts.values()) == {1}
    print(f"partitions whose retention passed the committed offset: {lost or 'none'}")
    print(f"every event stored exactly once: {stored_once} ({len(counts):,} stored)")
    print(f"pipeline.sink_paused alerts in the store: {outage}")
    hook = [k for k in receiver.keys if outage and k.startswith(outage[0][0])]
    print(f"webhook deliveries of it: {hook}")
    ok = not lost and stored_once and len(outage) == 1 and len(hook) == 2 and paused_s > 0
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
