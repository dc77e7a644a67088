"""``inferwatch demo``: the whole pipeline on one machine, scored against the simulator's truth.

An embedded Kafka broker (``streams.sim.broker``); the ``default`` simulated traffic, with event
times ending now, produced keyed by api key to ``inferwatch.events.v1`` from a background thread
and paced on the worker group's committed offsets (the broker's retention would otherwise delete
events nobody read); in the main thread a Worker with a KafkaSource writing to the store and
serving the local API, so ``inferwatch alerts`` works from another terminal meanwhile. When the
group has committed everything produced, the producer thread asks the worker to stop; the worker
checkpoints and returns, and ``streams.sim.scoring`` scores its alerts against the truth.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from detectors.registry import create_all
from streams.api.server import serve_api
from streams.cli.demo_report import print_summary as print_summary  # re-exported for the CLI
from streams.sim.broker import MockCluster, produce_paced, wait_for
from streams.sim.scoring import Evaluation, evaluate
from streams.sim.simulate import Truth, simulate
from streams.sources.base import SourceError
from streams.sources.kafka import KafkaSource
from streams.store import directory as store_dir
from streams.store.store import Store, StoreError, StoreLock, TransientStoreError, parse_dsn
from streams.worker.loop import Counters, Worker, WorkerSettings

TOPIC = "inferwatch.events.v1"
GROUP = "inferwatch-demo"
SCENARIO = "default"
DEMO_DIR = "demo"  # inside the store directory: the simulated traffic and its truth
EVENTS_FILE = "events.jsonl"
TRUTH_FILE = "events.truth.json"  # what ``inferwatch simulate`` names it beside events.jsonl
MAX_LAG = 40_000  # messages in all; the per-partition byte budget is the tighter bound
# Checkpoints (and so commits) every second keep the paced producer moving.
SETTINGS = WorkerSettings(batch_max=5_000, checkpoint_s=1.0)
CATCH_UP_TIMEOUT_S = 120.0
ALIGN_MS = 10 * 60_000  # a multiple of every detector window and hop (rate buckets, PSI windows)


class DemoError(Exception):
    """The demo cannot run as asked (the store is elsewhere, in use, or not ours to clear)."""


@dataclass(frozen=True, slots=True)
class DemoResult:
    truth: Truth
    evaluation: Evaluation
    counters: Counters
    produced: int
    stored_events: int
    distinct_events: int
    elapsed_s: float
    interrupted: bool
    prior_events: int  # events the store held before this run (--keep)
    store_dir: Path
    events_path: Path
    truth_path: Path


def prepare_store(store: str, fresh: bool) -> Path:
    """The store directory, if it is new, empty or an inferwatch store
    (``streams/store/directory.py``)
    that no process holds; with ``fresh``, emptied first, unless it is the root, a home
    directory, or above the current directory or a home."""
    try:
        dsn = parse_dsn(store)
    except StoreError as exc:
        raise DemoError(str(exc)) from None
    if dsn.path is None:
        raise DemoError(f"the demo runs on an embedded store (chdb:DIR), not {dsn}")
    path, lock = dsn.path, StoreLock(dsn.path)
    try:
        kind, entries = store_dir.inspect(path)
        if kind is store_dir.Kind.foreign:
            raise store_dir.foreign_error(path, entries)
        if lock.held_elsewhere():
            raise DemoError(
                f"store {path} is in use by pid {lock.owner()}; stop it or pass --store"
            )
        if fresh and kind is not store_dir.Kind.missing:
            store_dir.clear(path)
    except (StoreError, store_dir.StoreDirError, OSError) as exc:
        raise DemoError(str(exc)) from None
    return path


def recent_traffic(events: int, seed: int, now_ms: int) -> tuple[Iterator[bytes], Truth]:
    """The ``default`` scenario shifted so that its event times end in the last ``ALIGN_MS``
    before ``now_ms`` (recent data is what ``--since`` and the store's retention expect). The
    start is a whole multiple of ``ALIGN_MS``, like the simulator's default start, so windows fall
    on the traffic the same way at any time of day and a seed gives the same alerts every run."""
    _, probe = simulate(SCENARIO, events, seed)
    start_ms = (now_ms - (probe.end_ts_ms - probe.start_ts_ms)) // ALIGN_MS * ALIGN_MS
    return simulate(SCENARIO, events, seed, start_ms=start_ms)


class _Stopped(Exception):
    """The worker is stopping (interrupted, or failed): the producer gives up quietly."""


class ProducerThread(threading.Thread):
    """Writes the traffic to the JSONL file and the topic, then waits until the group has
    committed all of it and sets ``stop`` (the worker's ``stop_requested``)."""

    def __init__(
        self, cluster: MockCluster, lines: Iterable[bytes], path: Path, stop: threading.Event
    ) -> None:
        super().__init__(name="inferwatch-demo-producer", daemon=True)
        self.cluster, self.lines, self.path, self.stop = cluster, lines, path, stop
        self.produced = 0
        self.finished = False  # everything produced was consumed and committed
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.path.open("wb") as out:
                produce_paced(
                    self.cluster, TOPIC, _recorded(self.lines, out), GROUP, MAX_LAG,
                    alive=self._alive, progress=self._progress, timeout_s=CATCH_UP_TIMEOUT_S,
                )  # fmt: skip
            wait_for(
                lambda: self.cluster.caught_up(TOPIC, GROUP), CATCH_UP_TIMEOUT_S,
                "the worker to commit every event", self._alive, every_s=0.2,
            )  # fmt: skip
            self.finished = True
        except _Stopped:
            pass
        except BaseException as exc:  # reported by the main thread once the worker stopped
            self.error = exc
        finally:
            self.stop.set()

    def _alive(self) -> None:
        if self.stop.is_set():
            raise _Stopped

    def _progress(self, produced: int) -> None:
        self.produced = produced


def _recorded(lines: Iterable[bytes], out: IO[bytes]) -> Iterator[bytes]:
    for line in lines:
        out.write(line + b"\n")
        yield line


class LiveView:
    """Progress while the worker runs (called from its run loop): a live bar and counters on a
    terminal, a line every 5 s otherwise."""

    def __init__(self, console: Console, total: int, producer: ProducerThread) -> None:
        self.console, self.total, self.producer = console, total, producer
        self._started = time.monotonic()
        self._last = 0.0
        self._last_line = self._started
        self._live = Live(console=console, transient=True) if console.is_terminal else None

    def __enter__(self) -> LiveView:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()

    def update(self, worker: Worker) -> None:
        now = time.monotonic()
        if now - self._last < 0.2:
            return
        self._last = now
        c = worker.counters
        rejected = sum(c.rejects_total.values())
        consumed = c.events_total + rejected
        line = (
            f"produced {self.producer.produced:,}  consumed {consumed:,}  rejected {rejected:,}  "
            f"findings {c.findings_total:,}  alerts {c.alerts_total:,}  "
            f"{consumed / max(now - self._started, 1e-9):,.0f} events/s"
        )
        if self._live is not None:
            bar = Table.grid(padding=(0, 1))
            bar.add_row(
                "[bold]inferwatch demo[/]",
                ProgressBar(total=self.total, completed=consumed, width=40),
                f"{consumed:,}/{self.total:,} events, {now - self._started:.0f} s",
            )
            self._live.update(Group(bar, Text(f"  {line}")))
        elif now - self._last_line >= 5.0:
            self._last_line = now
            self.console.print(f"  {line}", highlight=False)


def run(events: int, seed: int, store: str, fresh: bool, console: Console) -> DemoResult:
    """The demo end to end; DemoError when the store or the broker cannot be used."""
    directory = prepare_store(store, fresh)
    t0 = time.monotonic()
    try:  # first: the store is created (and marked) before the demo's files go into it
        st = Store(f"chdb:{directory}")
    except (StoreError, TransientStoreError) as exc:
        raise DemoError(str(exc)) from exc
    files = directory / DEMO_DIR
    events_path, truth_path = files / EVENTS_FILE, files / TRUTH_FILE
    try:
        files.mkdir(exist_ok=True)
        lines, truth = recent_traffic(events, seed, int(time.time() * 1000))
        truth_path.write_bytes(truth.to_json())
        prior = int(st.query("SELECT count() FROM events FINAL").first_row[0])
        with MockCluster() as cluster:
            counters, producer = _stream(st, cluster, lines, events_path, console, events)
        evaluation = evaluate(st, truth)
        stored, distinct = st.query(
            "SELECT count(), uniqExact(event_id) FROM events FINAL"
        ).first_row
    finally:
        st.close()
    return DemoResult(
        truth, evaluation, counters, producer.produced, int(stored), int(distinct),
        time.monotonic() - t0, not producer.finished, prior, directory, events_path, truth_path,
    )  # fmt: skip


def _stream(
    st: Store,
    cluster: MockCluster,
    lines: Iterator[bytes],
    events_path: Path,
    console: Console,
    total: int,
) -> tuple[Counters, ProducerThread]:
    """Producer thread and worker until the group has committed everything (or Ctrl-C)."""
    cluster.create_topic(TOPIC)  # before the consumer subscribes
    try:
        src = KafkaSource(cluster.bootstrap, TOPIC, GROUP)
    except SourceError as exc:
        raise DemoError(str(exc)) from exc
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker = Worker(st, src, create_all(), SETTINGS)
        worker.install_signal_handlers()  # Ctrl-C: finish the batch, checkpoint, summarise
        producer = ProducerThread(cluster, lines, events_path, worker.stop_requested)
        api = serve_api(worker)
        try:
            producer.start()
            with LiveView(console, total, producer) as view:
                counters = worker.run(view.update)
        finally:
            worker.stop_requested.set()
            producer.join()
            api.stop()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        src.close()
    if producer.error is not None:
        raise DemoError(f"producing the demo traffic failed: {producer.error}") from producer.error
    return counters, producer
