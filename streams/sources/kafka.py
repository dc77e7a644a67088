"""Kafka source: one member of a consumer group whose positions follow the worker's checkpoints.

Offsets are never committed automatically: the worker commits at its checkpoints, after the
sinks flushed and its state was saved (docs/architecture.md). Partitions move with the
cooperative-sticky assignor. On assignment the worker loads the partitions' state and returns
the store's positions, which win over the broker's committed offsets (the state matches the
store); a partition with neither starts at ``start_from``. On revocation the worker checkpoints
(and so commits) before the partitions go.

``auto.offset.reset`` is ``error``: when a position has fallen below the log start because
retention deleted unread events, the source records the gap (partition, from, to) in ``gaps``
for the worker to report, and continues at the log start. It never skips silently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from schemas.batch import Reject
from streams.sources.base import Polled, Rebalance, SourceBase, SourceError
from streams.sources.kafka_config import DEFAULT_CONSUMER, FIXED_CONSUMER, START_FROM, parse_spec
from streams.sources.retention_gap import RetentionGap

log = logging.getLogger(__name__)

# A commit refused because the group is rebalancing (or this member was just fenced, in which
# case the partitions are revoked or lost next and the retry skips them).
REBALANCING_COMMIT_ERRORS = (
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
)


DLQ_MESSAGE_BYTES = 16 << 20  # the DLQ producer's message.max.bytes unless configured
DLQ_HEAD_BYTES = 512 << 10  # what is kept of a message the DLQ topic refuses as too large


class KafkaSource(SourceBase):
    """Consumer-group source for the worker; ``set_rebalance`` wires in its hooks."""

    rebalances: ClassVar[bool] = True
    has_dlq: ClassVar[bool] = True

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group_id: str = "inferwatch",
        start_from: str = "earliest",
        config: Mapping[str, str] | None = None,
        dlq_topic: str | None = None,
        timeout_s: float = 10.0,
        commit_retry_s: float = 120.0,
    ) -> None:
        if start_from not in START_FROM:
            raise SourceError(f"start_from {start_from!r}: expected earliest or latest")
        config = dict(config or {})
        clash = sorted(k for k in FIXED_CONSUMER if k in config and config[k] != FIXED_CONSUMER[k])
        if clash:
            raise SourceError(
                f"kafka config sets {', '.join(clash)}; inferwatch fixes these "
                f"({', '.join(f'{k}={FIXED_CONSUMER[k]}' for k in clash)}) so that offsets are "
                "committed only after a checkpoint"
            )
        self.bootstrap = bootstrap
        self.topic = topic
        self.group_id = group_id
        self.start_from = start_from
        self.dlq_topic = dlq_topic or f"{topic}.dlq"
        self.timeout_s = timeout_s
        self.commit_retry_s = commit_retry_s
        self.name = f"kafka://{bootstrap}/{topic}"
        self.gaps: list[RetentionGap] = []  # drained by the worker (``take_gaps``)
        self._config = config  # security settings etc., shared with the DLQ producer
        self._rebalance = Rebalance()
        self._assigned: set[int] = set()
        self._position: dict[int, int] = {}  # next offset to read, where known
        self._commit_enabled = True
        self._pending_commit: dict[int, int] = {}
        self._commit_failing_since: float | None = None
        self._closing = False
        self._paused = False
        self._lag: dict[int, int] = {}
        self._fatal: KafkaError | None = None
        self._producer: Any = None
        self._dlq_failed: list[str] = []
        self._dlq_too_large: list[tuple[bytes, list[Any]]] = []  # refused by the broker
        consumer_conf = {
            **DEFAULT_CONSUMER,
            **config,
            **FIXED_CONSUMER,
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "error_cb": self._on_error,
        }
        try:
            self._consumer = Consumer(consumer_conf)
            self._consumer.subscribe(
                [topic], on_assign=self._assign_cb, on_revoke=self._revoke_cb, on_lost=self._lost_cb
            )
        except KafkaException as exc:
            raise SourceError(f"{self.name}: cannot create the consumer: {exc}") from exc

    # ------------------------------------------------------------------ Source protocol

    def set_rebalance(
        self,
        on_revoke: Callable[[set[int]], None],
        on_assign: Callable[[set[int]], dict[int, int]],
    ) -> None:
        self._rebalance = Rebalance(on_revoke=on_revoke, on_assign=on_assign)

    def assigned(self) -> set[int]:
        return set(self._assigned)

    @property
    def exhausted(self) -> bool:
        return False  # a topic never ends

    def poll(self, max_messages: int, timeout_s: float) -> Polled:
        msgs = self._consumer.consume(max(1, max_messages), timeout_s)
        if self._fatal is not None:
            raise SourceError(f"{self.name}: fatal consumer error: {self._fatal.str()}")
        if self._pending_commit:
            self._commit_pending()
        values: list[bytes] = []
        parts: list[int] = []
        offsets: list[int] = []
        next_offsets: dict[int, int] = {}
        assigned = self._assigned
        for msg in msgs:
            err = msg.error()
            if err is not None:
                self._partition_error(msg, err, next_offsets)
                continue
            p = msg.partition()
            if p not in assigned:  # fetched before a revocation; the new owner reads it
                continue
            off: int = msg.offset()  # type: ignore[assignment]  # None only on errors
            values.append(msg.value() or b"")
            parts.append(p)
            offsets.append(off)
            next_offsets[p] = off + 1
        self._position.update(next_offsets)
        self._update_lag()
        return Polled(
            values, np.asarray(parts, np.int32), np.asarray(offsets, np.int64), next_offsets
        )

    def pause(self) -> None:
        """Stop fetching from every assigned partition (and those assigned while paused)."""
        self._paused = True
        self._consumer.pause([TopicPartition(self.topic, p) for p in sorted(self._assigned)])

    def resume(self) -> None:
        """Fetch again, from the position after the last message handed out."""
        self._paused = False
        parts = sorted(self._assigned)
        self._consumer.resume([TopicPartition(self.topic, p) for p in parts])
        for p in parts:
            if p in self._position:
                self._reposition(p, self._position[p])

    def idle(self, timeout_s: float) -> None:
        """Poll while paused: heartbeats, rebalance callbacks and group membership go on; a
        message fetched before the pause is dropped (``resume`` seeks back to it)."""
        self._consumer.consume(100, timeout_s)
        self._update_lag(cached=False)  # paused partitions fetch nothing: ask the broker
        if self._fatal is not None:
            raise SourceError(f"{self.name}: fatal consumer error: {self._fatal.str()}")

    def take_gaps(self) -> list[RetentionGap]:
        gaps, self.gaps = self.gaps, []
        return gaps

    def lag(self) -> dict[int, int]:
        """Messages behind the end of each assigned partition, as of the last poll. Other
        threads (the metrics endpoint) read this copy: a call into the consumer from another
        thread waits for the poll loop's lock, which it may never get."""
        return dict(self._lag)

    def _update_lag(self, cached: bool = True) -> None:
        out: dict[int, int] = {}
        for p, pos in self._position.items():
            try:
                _, high = self._consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), timeout=1.0, cached=cached
                )
            except KafkaException:
                continue  # the broker did not answer: keep the partition out of this reading
            if high is not None and high >= 0:
                out[p] = max(0, high - pos)
        self._lag = out

    def seek(self, positions: dict[int, int]) -> None:
        """Move assigned partitions; others get their position from the worker on assignment."""
        for p, off in positions.items():
            if p in self._assigned:
                self._reposition(p, off)

    def commit(self, positions: dict[int, int]) -> None:
        """Synchronously commit exactly ``positions`` of the partitions this member owns.

        The broker refuses commits while the group rebalances. The store already holds these
        positions (they win on assignment), so such a commit is retried at the next poll, once
        the group is stable, unless a newer one replaces it; failing for ``commit_retry_s``
        raises."""
        self._pending_commit = {p: off for p, off in positions.items() if off >= 0}
        self._commit_pending()

    def _commit_pending(self) -> None:
        offsets = [
            TopicPartition(self.topic, p, off)
            for p, off in sorted(self._pending_commit.items())
            if p in self._assigned
        ]
        if not offsets or not self._commit_enabled:
            self._pending_commit = {}
            return
        try:
            result = self._consumer.commit(offsets=offsets, asynchronous=False)
            errors = [tp.error for tp in result or [] if tp.error is not None]
        except KafkaException as exc:
            errors = [exc.args[0]]
        if not errors:
            self._pending_commit = {}
            self._commit_failing_since = None
            return
        err = errors[0]
        deferrable = isinstance(err, KafkaError) and (
            err.code() in REBALANCING_COMMIT_ERRORS or err.retriable()
        )
        now = time.monotonic()
        since = self._commit_failing_since = self._commit_failing_since or now
        if not deferrable or now - since > self.commit_retry_s:
            raise SourceError(f"{self.name}: commit failed: {err}")
        log.info("%s: commit deferred to the next poll: %s", self.name, err)

    def send_dlq(
        self,
        rejects: Sequence[Reject],
        partition: npt.NDArray[np.int32],
        offset: npt.NDArray[np.int64],
    ) -> None:
        """Produce the raw bytes of ``rejects`` to the DLQ topic and wait for the broker. The
        DLQ is where a rejected message is kept whole (the store keeps it redacted), so a
        message the DLQ topic refuses as too large is sent again as its first
        ``DLQ_HEAD_BYTES`` with a ``truncated_from`` header (its whole size): the source
        partition and offset in the headers still lead to the original."""
        if not rejects:
            return
        producer = self._dlq_producer()
        for r in rejects:
            headers = [
                ("reason", r.reason.encode()),
                ("detail", r.detail[:1000].encode("utf-8", "replace")),
                ("source_partition", str(int(partition[r.index])).encode()),
                ("source_offset", str(int(offset[r.index])).encode()),
            ]
            self._produce_dlq(producer, r.raw, headers)
        remaining = producer.flush(self.timeout_s)
        if self._dlq_too_large:
            again, self._dlq_too_large = self._dlq_too_large, []
            for value, headers in again:
                self._produce_dlq(producer, value, headers, truncate=True)
            remaining = producer.flush(self.timeout_s)
        if remaining or self._dlq_failed:
            failed, self._dlq_failed = self._dlq_failed, []
            raise SourceError(
                f"{self.name}: {remaining} DLQ messages undelivered after {self.timeout_s}s; "
                f"errors: {failed[:3]}"
            )

    def _produce_dlq(
        self, producer: Any, value: bytes, headers: list[Any], truncate: bool = False
    ) -> None:
        while True:
            if truncate and len(value) > DLQ_HEAD_BYTES:
                headers = [*headers, ("truncated_from", str(len(value)).encode())]
                value, truncate = value[:DLQ_HEAD_BYTES], False
            try:
                producer.produce(
                    self.dlq_topic, value=value, headers=headers, on_delivery=self._delivered
                )
                return
            except BufferError:  # local queue full: let deliveries drain
                producer.poll(0.1)
            except KafkaException as exc:
                too_large = exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
                if not too_large or len(value) <= DLQ_HEAD_BYTES:
                    raise SourceError(f"{self.name}: DLQ produce failed: {exc}") from exc
                truncate = True

    def close(self) -> None:
        """Leave the group. The worker checkpointed already; a revocation now commits nothing
        (after a crash, committing would skip the batch that failed)."""
        if self._closing:
            return
        self._closing = True
        try:
            if self._producer is not None:
                self._producer.flush(self.timeout_s)
        finally:
            self._consumer.close()

    # ------------------------------------------------------------------ rebalance callbacks

    def _assign_cb(self, consumer: Any, tps: list[Any]) -> None:
        parts = {tp.partition for tp in tps if tp.topic == self.topic}
        # cooperative rebalances call this with nothing new too
        stored = self._rebalance.on_assign(parts) if parts and not self._closing else {}
        start = {p: off for p, off in stored.items() if p in parts}
        missing = sorted(parts - start.keys())
        if missing:
            asked = [TopicPartition(self.topic, p) for p in missing]
            for tp in consumer.committed(asked, timeout=self.timeout_s):
                if tp.error is not None:
                    raise SourceError(f"{self.name}: committed offsets: {tp.error}")
                if tp.offset >= 0:
                    start[tp.partition] = tp.offset
        default = START_FROM[self.start_from]
        self._assigned |= parts
        self._position.update(start)
        tps = [TopicPartition(self.topic, p, start.get(p, default)) for p in sorted(parts)]
        consumer.incremental_assign(tps)
        if self._paused and tps:
            consumer.pause(tps)

    def _revoke_cb(self, consumer: Any, tps: list[Any]) -> None:
        parts = {tp.partition for tp in tps if tp.topic == self.topic}
        if parts and not self._closing:
            self._rebalance.on_revoke(parts)  # checkpoints and commits while still the owner
        self._forget(parts)
        consumer.incremental_unassign(tps)

    def _lost_cb(self, consumer: Any, tps: list[Any]) -> None:
        """The group moved on without us (session timeout): save and drop, but commit nothing,
        since another member may own the partitions already."""
        parts = {tp.partition for tp in tps if tp.topic == self.topic}
        self._commit_enabled = False
        try:
            if parts and not self._closing:
                self._rebalance.on_revoke(parts)
        finally:
            self._commit_enabled = True
        self._forget(parts)
        consumer.incremental_unassign(tps)

    # ------------------------------------------------------------------ internals

    def _forget(self, parts: set[int]) -> None:
        self._assigned -= parts
        for p in parts:
            self._position.pop(p, None)

    def _partition_error(self, msg: Any, err: KafkaError, next_offsets: dict[int, int]) -> None:
        code = err.code()
        if code == KafkaError._PARTITION_EOF:
            return
        p = msg.partition()
        if code in (KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE) and (
            p in self._assigned
        ):
            self._out_of_range(p, msg.offset(), err, next_offsets)
            return
        if code in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
            raise SourceError(
                f"{self.name}: topic {self.topic!r} does not exist on {self.bootstrap}; create it "
                f"or fix the topic in the source ({err.str()})"
            )
        raise SourceError(f"{self.name}: partition {p}: {err.str()}")

    def _out_of_range(
        self, p: int, failed_at: int, err: KafkaError, next_offsets: dict[int, int]
    ) -> None:
        position = failed_at if failed_at >= 0 else self._position.get(p)
        if position is None:
            raise SourceError(f"{self.name}: partition {p} has no position: {err.str()}")
        low, high = self._consumer.get_watermark_offsets(
            TopicPartition(self.topic, p), timeout=self.timeout_s, cached=False
        )
        if position > high:
            raise SourceError(
                f"{self.name}: partition {p}: position {position} is past the end of the log "
                f"({high}); was the topic recreated? Reset group {self.group_id!r} or use a new "
                "store"
            )
        if position < low:
            self.gaps.append(RetentionGap(self.topic, p, position, low))
            position = low
        self._reposition(p, position)
        next_offsets[p] = position
        self._position[p] = position

    def _reposition(self, p: int, offset: int) -> None:
        # seek() is refused on a partition whose fetcher stopped on an error; re-assigning
        # the partition at the offset works in every state.
        tp = TopicPartition(self.topic, p)
        self._consumer.incremental_unassign([tp])
        self._consumer.incremental_assign([TopicPartition(self.topic, p, offset)])

    def _dlq_producer(self) -> Any:
        if self._producer is None:
            conf = {k: v for k, v in self._config.items() if k not in DEFAULT_CONSUMER}
            # librdkafka's producer refuses messages over 1 MB by default, but a rejected message
            # is often an oversize one that the source topic accepted: try to keep it whole
            conf.setdefault("message.max.bytes", str(DLQ_MESSAGE_BYTES))
            try:
                self._producer = Producer({**conf, "bootstrap.servers": self.bootstrap})
            except KafkaException as exc:
                raise SourceError(f"{self.name}: cannot create the DLQ producer: {exc}") from exc
        return self._producer

    def _delivered(self, err: KafkaError | None, msg: Any) -> None:
        if err is None:
            return
        if err.code() == KafkaError.MSG_SIZE_TOO_LARGE and len(msg.value()) > DLQ_HEAD_BYTES:
            self._dlq_too_large.append((msg.value(), msg.headers() or []))
        else:
            self._dlq_failed.append(err.str())

    def _on_error(self, err: KafkaError) -> None:
        # librdkafka retries transport errors itself; only fatal ones end the consumer.
        if err.fatal():
            self._fatal = err
        else:
            log.warning("%s: %s", self.name, err.str())


def open_kafka(spec: str, config: Mapping[str, str] | None = None) -> KafkaSource:
    """``kafka://HOST:PORT[,HOST:PORT]/TOPIC[?group=G&start_from=earliest|latest]``.

    >>> open_kafka("kafka://broker:9092")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    streams.sources.base.SourceError: source 'kafka://broker:9092': no topic; expected ...
    """
    bootstrap, topic, params = parse_spec(spec)
    return KafkaSource(
        bootstrap,
        topic,
        group_id=params.get("group", "inferwatch"),
        start_from=params.get("start_from", "earliest"),
        config=config,
    )
