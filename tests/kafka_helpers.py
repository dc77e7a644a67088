"""Helpers for tests that need Kafka: confluent-kafka's mock cluster, paced producing, and a
worker subprocess.

The mock cluster (DESIGN.md section 8) lives while the producer that created it lives, in this
process; a worker subprocess reaches it on loopback. Every topic gets 4 partitions on first
produce, and each partition keeps about 5 MiB and silently deletes older messages, so producers
pace on the consumer group's lag unless a test wants that loss.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

REPO = Path(__file__).resolve().parents[1]
SESSION = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}
SESSION_ENV = {
    "INFERWATCH_KAFKA_SESSION_TIMEOUT_MS": SESSION["session.timeout.ms"],
    "INFERWATCH_KAFKA_HEARTBEAT_INTERVAL_MS": SESSION["heartbeat.interval.ms"],
}


def wait_for(
    condition: Callable[[], bool],
    timeout_s: float,
    what: str,
    alive: Callable[[], None] | None = None,
    every_s: float = 0.1,
) -> None:
    """Poll ``condition`` until true; ``alive`` raises if what we wait on has died."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)


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


class MockCluster:
    """A one-broker mock Kafka cluster and the clients tests use to feed and inspect it."""

    def __init__(self) -> None:
        self._producer: Any = Producer({"test.mock.num.brokers": 1, "linger.ms": 5, "log_level": 4})
        brokers = self._producer.list_topics(timeout=10).brokers.values()
        self.bootstrap = ",".join(f"{b.host}:{b.port}" for b in brokers)
        self._consumers: dict[str, Any] = {}

    def source(self, topic: str, group: str = "", start_from: str = "") -> str:
        query = "&".join(f"{k}={v}" for k, v in (("group", group), ("start_from", start_from)) if v)
        return f"kafka://{self.bootstrap}/{topic}" + (f"?{query}" if query else "")

    def produce(
        self,
        topic: str,
        values: Iterable[bytes],
        keys: Iterable[bytes | None] | None = None,
        partition: int | None = None,
    ) -> int:
        """Produce and wait for delivery; returns the number of messages."""
        n = 0
        extra = {} if partition is None else {"partition": partition}
        key_iter = iter(keys) if keys is not None else None
        for value in values:
            key = next(key_iter) if key_iter is not None else None
            while True:
                try:
                    self._producer.produce(topic, value=value, key=key, **extra)
                    break
                except BufferError:
                    self._producer.poll(0.05)
            n += 1
            if n % 2000 == 0:
                self._producer.poll(0)
        if self._producer.flush(30):
            raise TimeoutError(f"undelivered messages to {topic}")
        return n

    def _consumer(self, group: str) -> Any:
        """A client of ``group`` that never joins it: it reads committed offsets only."""
        if group not in self._consumers:
            self._consumers[group] = Consumer(
                {"bootstrap.servers": self.bootstrap, "group.id": group, "log_level": 4}
            )
        return self._consumers[group]

    def partitions(self, topic: str) -> list[int]:
        meta = self._producer.list_topics(topic, timeout=10).topics[topic]
        return sorted(meta.partitions)

    def watermarks(self, topic: str) -> dict[int, tuple[int, int]]:
        c = self._consumer("inferwatch-tests")
        return {
            p: tuple(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False))
            for p in self.partitions(topic)
        }

    def committed(self, topic: str, group: str) -> dict[int, int]:
        tps = [TopicPartition(topic, p) for p in self.partitions(topic)]
        out = self._consumer(group).committed(tps, timeout=10)
        return {tp.partition: tp.offset for tp in out if tp.offset >= 0}

    def lag(self, topic: str, group: str) -> int:
        """Messages the group has not committed past yet (still readable ones only)."""
        done = self.committed(topic, group)
        return sum(
            high - max(low, done.get(p, low)) for p, (low, high) in self.watermarks(topic).items()
        )

    def caught_up(self, topic: str, group: str) -> bool:
        done = self.committed(topic, group)
        return all(done.get(p, -1) == high for p, (_, high) in self.watermarks(topic).items())

    def read_all(self, topic: str, timeout_s: float = 20.0) -> list[Any]:
        """Every message still in ``topic``, read without a group."""
        ends = self.watermarks(topic)
        c = Consumer(
            {"bootstrap.servers": self.bootstrap, "group.id": "inferwatch-tests-reader",
             "enable.auto.commit": False, "log_level": 4}
        )  # fmt: skip
        try:
            c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
            out: list[Any] = []
            todo = {p for p, (low, high) in ends.items() if high > low}
            deadline = time.monotonic() + timeout_s
            while todo and time.monotonic() < deadline:
                for msg in c.consume(1000, 0.5):
                    if msg.error():
                        raise RuntimeError(f"reading {topic}: {msg.error()}")
                    out.append(msg)
                    if msg.offset() + 1 >= ends[msg.partition()][1]:
                        todo.discard(msg.partition())
            if todo:
                raise TimeoutError(f"partitions {sorted(todo)} of {topic} not read to the end")
            return out
        finally:
            c.close()

    def close(self) -> None:
        for c in self._consumers.values():
            c.close()
        self._consumers = {}
        if self._producer is not None:
            self._producer.flush(5)
            self._producer = None  # the cluster goes with the last reference
            gc.collect()


def keys_of(lines: Sequence[bytes]) -> list[bytes]:
    """The events topic is keyed by api_key_id (DESIGN.md section 2)."""
    return [orjson.loads(line)["api_key_id"].encode() for line in lines]


def produce_paced(
    cluster: MockCluster,
    topic: str,
    lines: Sequence[bytes],
    group: str,
    max_lag: int,
    alive: Callable[[], None] | None = None,
    chunk: int = 1000,
    timeout_s: float = 120.0,
) -> None:
    """Produce keyed ``lines`` without ever letting ``group`` fall more than ``max_lag`` messages
    behind, so the mock cluster's retention never deletes what the group has not read."""
    keys = keys_of(lines)
    for start in range(0, len(lines), chunk):
        wait_for(
            lambda: cluster.lag(topic, group) + chunk <= max_lag,
            timeout_s,
            f"group {group} to catch up on {topic}",
            alive,
            every_s=0.2,
        )
        cluster.produce(topic, lines[start : start + chunk], keys[start : start + chunk])


class WorkerProcess:
    """``inferwatch run`` in a subprocess; output goes to files (a full pipe would block it)."""

    def __init__(self, source: str, store_dir: Path, log_dir: Path, *args: str) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.store_dir = store_dir
        self.stdout_path = log_dir / "worker.out"
        self.stderr_path = log_dir / "worker.err"
        cmd = [sys.executable, "-m", "streams.cli", "run", "--source", source]
        cmd += ["--store", f"chdb:{store_dir}", "-q", *args]
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=err, cwd=REPO, env={**os.environ, **SESSION_ENV}
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
