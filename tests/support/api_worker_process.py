"""A real worker process for tests/system/test_api.py: owns a store, serves the API, idles until
SIGTERM, then checkpoints and stops cleanly.

A file source ends at end of file, so a test that needs a worker alive while the CLI talks to it
runs this instead: the real Worker with a source that never delivers and never ends.

    python -m tests.support.api_worker_process DIR
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from streams.api.server import serve_api
from streams.sources.base import Polled, SourceBase
from streams.store.store import Store
from streams.worker.loop import Worker, WorkerSettings

SETTINGS = WorkerSettings(poll_timeout_s=0.05, checkpoint_s=3600, checkpoint_events=1 << 30)


class IdleSource(SourceBase):
    """Never delivers, never ends; reports a fixed consumer lag like the Kafka source will."""

    name = "idle:test"

    def __init__(self, lag: dict[int, int] | None = None) -> None:
        self._lag = dict(lag or {})

    def poll(self, max_messages: int, timeout_s: float) -> Polled:
        time.sleep(timeout_s)
        return Polled([], np.zeros(0, np.int32), np.zeros(0, np.int64), {})

    def seek(self, positions: dict[int, int]) -> None:
        pass

    def commit(self, positions: dict[int, int]) -> None:
        pass

    def assigned(self) -> set[int]:
        return {0}

    @property
    def exhausted(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def lag(self) -> dict[int, int]:
        return dict(self._lag)


def main(directory: Path) -> None:
    with Store(f"chdb:{directory}") as store:
        worker = Worker(store, IdleSource({0: 7}), [], SETTINGS)
        worker.install_signal_handlers()
        api = serve_api(worker)
        try:
            worker.run()
        finally:
            api.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
