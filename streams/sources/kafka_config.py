"""Where a Kafka source comes from: the ``kafka://`` spec, librdkafka settings from the
environment, and the consumer settings the source fixes or defaults."""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlsplit

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END

from streams.sources.base import SourceError

SCHEME = "kafka://"
START_FROM = {"earliest": OFFSET_BEGINNING, "latest": OFFSET_END}
SPEC_PARAMS = ("group", "start_from")
ENV_PREFIX = "INFERWATCH_KAFKA_"
# Set by the source: what exactly-once-after-checkpoint needs. A config that tries to change
# them is refused rather than silently overridden.
FIXED_CONSUMER = {
    "enable.auto.commit": "false",
    "enable.auto.offset.store": "false",
    "auto.offset.reset": "error",
    "partition.assignment.strategy": "cooperative-sticky",
}
DEFAULT_CONSUMER = {"session.timeout.ms": "45000", "heartbeat.interval.ms": "3000"}
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_HOST_PORT = re.compile(r"^[A-Za-z0-9.\-]+:(\d{1,5})$|^\[[0-9A-Fa-f:.]+\]:(\d{1,5})$")


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """(bootstrap, topic, parameters) of a ``kafka://`` spec; a SourceError says what is wrong.

    >>> parse_spec("kafka://a:9092,b:9093/inferwatch.events.v1?group=g1")
    ('a:9092,b:9093', 'inferwatch.events.v1', {'group': 'g1'})
    """
    expected = "expected kafka://HOST:PORT[,HOST:PORT]/TOPIC[?group=G&start_from=earliest|latest]"

    def bad(why: str) -> SourceError:
        return SourceError(f"source {spec!r}: {why}; {expected}")

    if not spec.startswith(SCHEME):
        raise bad("not a kafka:// source")
    parts = urlsplit(spec)
    if parts.fragment:
        raise bad(f"unexpected fragment #{parts.fragment}")
    hosts = parts.netloc.split(",") if parts.netloc else []
    if not hosts:
        raise bad("no broker address")
    for host in hosts:
        m = _HOST_PORT.match(host)
        if m is None or not 0 < int(m.group(1) or m.group(2)) < 65536:
            raise bad(f"broker address {host!r} is not HOST:PORT")
    topic = parts.path.lstrip("/")
    if not topic:
        raise bad("no topic")
    if not _TOPIC.match(topic) or topic in (".", ".."):
        raise bad(f"topic {topic!r} is not a valid Kafka topic name (letters, digits, . _ -)")
    params: dict[str, str] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise bad(f"cannot parse parameters {parts.query!r}") from None
    for key, value in pairs:
        if key not in SPEC_PARAMS:
            raise bad(f"unknown parameter {key!r} (known: {', '.join(SPEC_PARAMS)})")
        if key in params:
            raise bad(f"parameter {key!r} given twice")
        if not value:
            raise bad(f"parameter {key!r} is empty")
        params[key] = value
    if params.get("start_from", "earliest") not in START_FROM:
        raise bad(f"start_from={params['start_from']!r} is not earliest or latest")
    return ",".join(hosts), topic, params


def config_from_env(environ: Mapping[str, str]) -> dict[str, str]:
    """librdkafka settings from ``INFERWATCH_KAFKA_*``: ``INFERWATCH_KAFKA_SASL_MECHANISM=PLAIN``
    sets ``sasl.mechanism``; a ``_FILE`` suffix reads the value from a file (secrets).

    >>> config_from_env({"INFERWATCH_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "HOME": "/root"})
    {'security.protocol': 'SASL_SSL'}
    """
    out: dict[str, str] = {}
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or len(name) == len(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key.endswith("_file"):
            path = value
            key = key[: -len("_file")]
            try:
                with open(path, encoding="utf-8") as fh:
                    value = fh.read().strip()
            except OSError as exc:
                raise SourceError(f"{name}={path}: cannot read: {exc.strerror}") from None
        out[key.replace("_", ".")] = value
    return out
