"""Helpers for tests that need Kafka: a worker subprocess, and an in-process worker run until a
condition. The mock cluster and paced producing are production code (``streams.sim.broker``, which
``inferwatch demo`` uses); they are re-exported here for the tests.

The mock cluster (the README, "Kafka") lives while the producer that created it lives, in this
process; a worker subprocess reaches it on loopback. Every topic gets 4 partitions on first
produce, and each partition keeps about 5 MiB and silently deletes older messages, so producers
pace on the consumer group's lag unless a test wants that loss.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from detectors.registry import create_all
from streams.sim.broker import MockCluster, keys_of, produce_paced, wait_for
from streams.sim.simulate import simulate
from streams.sources.kafka import KafkaSource
from streams.store.store import Store
from streams.worker.loop import Worker, WorkerSettings

__all__ = [
    "REPO",
    "SESSION",
    "SESSION_ENV",
    "MockCluster",
    "WorkerProcess",
    "keys_of",
    "produce_paced",
    "run_worker_until",
    "wait_for",
]

REPO = Path(__file__).resolve().parents[2]
SESSION = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}
SESSION_ENV = {
    "INFERWATCH_KAFKA_SESSION_TIMEOUT_MS": SESSION["session.timeout.ms"],
    "INFERWATCH_KAFKA_HEARTBEAT_INTERVAL_MS": SESSION["heartbeat.interval.ms"],
}


def run_worker_until(worker: Any, done: Callable[[Any], bool], timeout_s: float) -> Any:
    """Run an in-process worker until ``done(worker)``; it then checkpoints and returns. On
    timeout it raises from inside the run loop, so nothing more is committed."""
    deadline = time.monotonic() + timeout_s

    def progress(w: Any) -> None:
        if done(w):
            w.stop_requested.set()
        elif time.monotonic() > deadline:
            raise TimeoutError(f"worker not done after {timeout_s}s: {w.counters}")

    return worker.run(progress)


class WorkerProcess:
    """``inferwatch run`` in a subprocess; output goes to files (a full pipe would block it)."""

    def __init__(
        self,
        source: str,
        store_dir: Path,
        log_dir: Path,
        *args: str,
        env: dict[str, str] | None = None,
    ) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.store_dir = store_dir
        self.stdout_path = log_dir / "worker.out"
        self.stderr_path = log_dir / "worker.err"
        cmd = [sys.executable, "-m", "streams.cli", "run", "--source", source]
        cmd += ["--store", f"chdb:{store_dir}", "-q", *args]
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=err,
                cwd=REPO,
                env={**os.environ, **SESSION_ENV, **(env or {})},
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"worker exited with {self.proc.returncode}:\n{self.stderr[-4000:]}"
            )

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait: the worker finishes its batch, checkpoints and leaves the group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


SETTINGS = WorkerSettings(batch_max=2_000, checkpoint_s=0.5, poll_timeout_s=0.1)


def events(n: int, seed: int) -> list[bytes]:
    # recent event times: the events table's TTL (30 days) would drop the simulator's default
    # 2026-01-01 start within a second of the insert once the wall clock is past it
    lines, _ = simulate("default", n, seed, start_ms=int(time.time() * 1000) - 3_600_000)
    return list(lines)


def event_ids(lines: list[bytes]) -> set[str]:
    return {orjson.loads(line)["event_id"] for line in lines}


@pytest.fixture
def cluster() -> Iterator[MockCluster]:
    mock = MockCluster()
    yield mock
    mock.close()


def source(cluster: MockCluster, topic: str, group: str, **kw: Any) -> KafkaSource:
    return KafkaSource(cluster.bootstrap, topic, group, config=SESSION, **kw)


def keys_by_partition(worker: Worker, partitions: set[int]) -> set[tuple[str, str, int]]:
    out = set()
    for et, slots in worker.pipeline.keyspace.maps.items():
        active = slots.active_slots()
        parts = slots.partition[active].tolist()
        for key, p in zip(slots.keys_of(active).tolist(), parts, strict=True):
            if p in partitions:
                out.add((et, key, p))
    return out


class RecordingWorker(Worker):
    """A worker that records what moved at each rebalance. Two workers here share one Store
    (one chdb client) from two threads, so every store access goes through one lock."""

    def __init__(self, lock: threading.RLock, *args: Any, **kw: Any) -> None:
        self.lock = lock
        self.revoked: list[tuple[set[int], set[tuple[str, str, int]], set[Any]]] = []
        self.assigned: list[tuple[set[int], set[tuple[str, str, int]], dict[int, int]]] = []
        with lock:
            super().__init__(*args, **kw)

    def checkpoint(self) -> None:
        with self.lock:
            super().checkpoint()

    def on_revoke(self, partitions: set[int]) -> None:
        with self.lock:
            before = keys_by_partition(self, partitions)
            super().on_revoke(partitions)
            self.revoked.append((set(partitions), before, keys_by_partition(self, partitions)))

    def on_assign(self, partitions: set[int]) -> dict[int, int]:
        with self.lock:
            positions = super().on_assign(partitions)
            self.assigned.append((set(partitions), keys_by_partition(self, partitions), positions))
            return positions


class Runner(threading.Thread):
    def __init__(self, worker: Worker, src: KafkaSource) -> None:
        super().__init__(daemon=True)
        self.worker, self.src = worker, src
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:
            self.error = exc
        finally:
            self.src.close()

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"worker thread failed: {self.error!r}") from self.error


def run_to_end(
    store: Store,
    cluster: MockCluster,
    topic: str,
    group: str,
    settings: WorkerSettings = SETTINGS,
    timeout_s: float = 90,
) -> Worker:
    """An in-process worker that reads ``topic`` up to its current end, then stops cleanly."""
    ends = cluster.watermarks(topic)
    src = source(cluster, topic, group)
    try:
        worker = Worker(store, src, create_all(), settings)
        run_worker_until(
            worker,
            lambda w: all(
                w.next_offsets.get(p, -1) >= hi for p, (lo, hi) in ends.items() if hi > lo
            ),
            timeout_s=timeout_s,
        )
    finally:
        src.close()
    return worker
