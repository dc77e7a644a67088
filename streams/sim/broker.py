"""The embedded Kafka test broker: confluent-kafka's mock cluster, keyed producing, and producing
paced on a consumer group's lag.

The mock cluster (the README, "Kafka") speaks the Kafka protocol on loopback while the producer
that created it lives, in this process; other processes reach it at ``bootstrap``. Topics are
created on first use with 4 partitions. Each partition keeps about 5 MiB and silently deletes
older messages, so a producer that must not lose events paces on the group's committed offsets
(``produce_paced``). ``inferwatch demo``, the tests and the benchmarks use it; real deployments
use a real Kafka.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

# What a partition can hold of the messages a group has not committed past: the mock keeps
# ~5 MiB per partition (values, keys and ~30 bytes of record overhead each), trimmed message by
# message, so 4 MiB leaves room for the overhead and for a margin.
PARTITION_BUDGET_BYTES = 4 << 20
RECORD_OVERHEAD_BYTES = 64  # counted per message against the budget (generous)

Delivery = Callable[[KafkaError | None, Any], None]


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


class MockCluster:
    """A one-broker mock Kafka cluster and the clients that feed and inspect it."""

    def __init__(self) -> None:
        self._producer: Any = Producer({"test.mock.num.brokers": 1, "linger.ms": 5, "log_level": 4})
        brokers = self._producer.list_topics(timeout=10).brokers.values()
        self.bootstrap = ",".join(f"{b.host}:{b.port}" for b in brokers)
        self._consumers: dict[str, Any] = {}
        self._failed: list[str] = []

    def __enter__(self) -> MockCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def source(self, topic: str, group: str = "", start_from: str = "") -> str:
        """The ``kafka://`` source spec of ``topic`` on this cluster."""
        query = "&".join(f"{k}={v}" for k, v in (("group", group), ("start_from", start_from)) if v)
        return f"kafka://{self.bootstrap}/{topic}" + (f"?{query}" if query else "")

    def create_topic(self, topic: str) -> list[int]:
        """Create ``topic`` (a metadata request auto-creates it); returns its partitions."""
        return self.partitions(topic)

    def produce(
        self,
        topic: str,
        values: Iterable[bytes],
        keys: Iterable[bytes | None] | None = None,
        partition: int | None = None,
        on_delivery: Delivery | None = None,
    ) -> int:
        """Produce and wait for delivery; returns the number of messages. A message the broker
        refused raises (after the others were delivered)."""
        n = 0
        extra: dict[str, Any] = {} if partition is None else {"partition": partition}

        def delivered(err: KafkaError | None, msg: Any) -> None:
            if err is not None:
                self._failed.append(err.str())
            if on_delivery is not None:
                on_delivery(err, msg)

        key_iter = iter(keys) if keys is not None else None
        for value in values:
            key = next(key_iter) if key_iter is not None else None
            while True:
                try:
                    self._producer.produce(
                        topic, value=value, key=key, on_delivery=delivered, **extra
                    )
                    break
                except BufferError:  # local queue full: let deliveries drain
                    self._producer.poll(0.05)
            n += 1
            if n % 2000 == 0:
                self._producer.poll(0)
        if self._producer.flush(30):
            raise TimeoutError(f"undelivered messages to {topic}")
        if self._failed:
            failed, self._failed = self._failed, []
            raise RuntimeError(f"{len(failed)} messages to {topic} failed: {failed[:3]}")
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
        """(low, high) offsets of every partition: the first kept and the next to be written."""
        c = self._consumer("inferwatch-watermarks")
        out: dict[int, tuple[int, int]] = {}
        for p in self.partitions(topic):
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
            out[p] = (low, high)
        return out

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
        return all(
            done.get(p, -1) == high for p, (low, high) in self.watermarks(topic).items() if high
        )

    def read_all(self, topic: str, timeout_s: float = 20.0) -> list[Any]:
        """Every message still in ``topic``, read without a group."""
        ends = self.watermarks(topic)
        c = Consumer(
            {"bootstrap.servers": self.bootstrap, "group.id": "inferwatch-reader",
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
                    p, off = int(msg.partition() or 0), int(msg.offset() or 0)
                    if off + 1 >= ends[p][1]:
                        todo.discard(p)
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
    """The events topic is keyed by api_key_id (docs/architecture.md).

    >>> keys_of([b'{"api_key_id": "key_1", "ts": 1}'])
    [b'key_1']
    """
    return [orjson.loads(line)["api_key_id"].encode() for line in lines]


class Backlog:
    """Bytes this producer wrote to each partition, by offset, so that the bytes a group has
    not committed past are known (the mock trims by bytes, not by messages)."""

    def __init__(self) -> None:
        self._log: dict[int, deque[tuple[int, int]]] = {}
        self._bytes: dict[int, int] = {}

    def delivered(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            return  # the cluster raises for it
        size = len(msg.value() or b"") + len(msg.key() or b"") + RECORD_OVERHEAD_BYTES
        p = msg.partition()
        self._log.setdefault(p, deque()).append((msg.offset(), size))
        self._bytes[p] = self._bytes.get(p, 0) + size

    def behind(self, committed: dict[int, int]) -> dict[int, int]:
        """Bytes per partition at or past the group's committed offset."""
        for p, log in self._log.items():
            done = committed.get(p, -1)
            while log and log[0][0] < done:
                self._bytes[p] -= log.popleft()[1]
        return dict(self._bytes)


def chunked(lines: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    """Lists of up to ``size`` lines.

    >>> [len(c) for c in chunked([b"x"] * 5, 2)]
    [2, 2, 1]
    """
    part: list[bytes] = []
    for line in lines:
        part.append(line)
        if len(part) == size:
            yield part
            part = []
    if part:
        yield part


def produce_paced(
    cluster: MockCluster,
    topic: str,
    lines: Iterable[bytes],
    group: str,
    max_lag: int,
    alive: Callable[[], None] | None = None,
    chunk: int = 1000,
    timeout_s: float = 120.0,
    *,
    max_lag_bytes: int = PARTITION_BUDGET_BYTES,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Produce ``lines`` keyed by api_key_id, a chunk at a time, never letting ``group`` fall
    more than ``max_lag`` messages (in all) or ``max_lag_bytes`` (on any partition) behind, so
    retention never deletes what the group has not committed past. ``alive`` raises to abort;
    ``progress`` gets the number of messages delivered so far. Returns that number."""
    backlog = Backlog()
    sent = 0
    for part in chunked(lines, chunk):
        keys = keys_of(part)
        size = sum(len(v) + len(k) + RECORD_OVERHEAD_BYTES for v, k in zip(part, keys, strict=True))
        if size > max_lag_bytes:
            raise ValueError(
                f"a chunk of {len(part)} messages is {size:,} bytes, over the per-partition "
                f"budget of {max_lag_bytes:,}: use a smaller chunk"
            )

        def room(n: int = len(part), size: int = size) -> bool:
            done = cluster.committed(topic, group)
            marks = cluster.watermarks(topic)
            behind = sum(high - max(low, done.get(p, low)) for p, (low, high) in marks.items())
            worst = max(backlog.behind(done).values(), default=0)
            return behind + n <= max_lag and worst + size <= max_lag_bytes

        wait_for(room, timeout_s, f"group {group} to catch up on {topic}", alive, every_s=0.05)
        sent += cluster.produce(topic, part, keys, on_delivery=backlog.delivered)
        if progress is not None:
            progress(sent)
    return sent
