"""Helpers for tests that need Kafka: a worker subprocess, and an in-process worker run until a
condition. The mock cluster and paced producing are production code (``streams.broker``, which
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streams.broker import MockCluster, keys_of, produce_paced, wait_for

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

REPO = Path(__file__).resolve().parents[1]
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
