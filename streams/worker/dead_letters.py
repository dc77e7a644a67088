"""Dead-letter rows: what the store keeps of a rejected message, redacted like an event.

Events store prompts and output text redacted with a keyed fingerprint (``records._text``); a
dead letter used to keep the whole message in clear, so one wrong-typed field left its prompt,
output text and PII in the store, and nothing bounded it. A dead letter now keeps:

- ``reason``, ``detail`` (at most 1,000 characters), ``field`` (the offending field's path,
  e.g. ``input.features.age``) and ``event_id`` (where the message has a string one);
- ``structure``: the message's shape as JSON, at most 4 KiB. Numbers, booleans and nulls are
  kept (each cut to 32 characters), and strings only where events keep them in clear
  (identifiers, ``ts``, labels, feature and attribute values; each cut to 64 characters).
  Every other string, prompts, message contents and output text above all, becomes
  ``"[redacted N chars, hmac H]"`` with H the events' keyed HMAC of that text, so a prompt in a
  dead letter can be matched with ``events.prompt_hmac``. A message that is not JSON (or is
  over the size limit) has no structure;
- ``fingerprint``: the keyed fingerprint of the whole message (as ``events.fingerprint``), and
  for ``conflicting_event_id`` the stored version's in ``stored_fingerprint``;
- ``raw``: empty, unless raw text storage is configured (``store_text = "raw"``): then at most
  64 KiB of the message. ``raw_bytes`` is always its full size.

The way back to the message is the source's: the DLQ topic keeps the raw message (who may read
it is the operator's to decide), and a file source's rows name the file (``source``) and the
byte offset of the line (``source_offset``).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from schemas.batch import Reject
from schemas.event_schema import OPTIONAL_STRINGS, REQUIRED_STRINGS
from streams.sources.base import Skipped
from streams.store import fingerprint
from streams.store import rows as records

MAX_DETAIL_CHARS = 1_000
MAX_STRUCTURE_BYTES = 4_096
MAX_RAW_BYTES = 65_536  # kept only with store_text = "raw"
MAX_PARSE_BYTES = 1 << 20  # larger messages are oversize: not parsed for their structure
MAX_TEXT_CHARS = 64  # of a string kept in clear
MAX_NUMBER_CHARS = 32
MAX_FIELD_CHARS = 256
MAX_DEPTH = 8
# strings events store in clear, by path; ``*`` is any one key
CLEAR = frozenset(
    (*REQUIRED_STRINGS, *OPTIONAL_STRINGS, "ts", "ground_truth", "output.label",
     "output.finish_reason", "input.features.*", "attributes.*")
)  # fmt: skip
_FIELD = re.compile(r"^(?:field|duplicate key) '(.*?)'(?::|$)", re.DOTALL)


class _Object(list[tuple[str, Any]]):
    """A JSON object as its (key, value) pairs, duplicates kept."""


class _Number(str):
    """A JSON number as its source text (no conversion: 1e999 or 5,000 digits stay text)."""


def _parse(raw: bytes) -> Any:
    hooks = {"parse_float": _Number, "parse_int": _Number, "parse_constant": _Number}
    return json.loads(raw, object_pairs_hook=_Object, **hooks)  # type: ignore[arg-type]


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _clear(path: str) -> bool:
    head, _, _ = path.rpartition(".")
    return path in CLEAR or (head + ".*") in CLEAR


class _Shape:
    """Renders a parsed message as redacted JSON within a byte budget."""

    def __init__(self, hmac_key: bytes) -> None:
        self.key = hmac_key
        # a leaf or key is at most ~400 bytes (64 characters, escaped) and each of the 8 levels
        # closes with a short marker, so stopping 1 KiB early keeps the whole within the cap
        self.left = MAX_STRUCTURE_BYTES - 1024

    def render(self, value: Any, path: str, depth: int) -> str:
        if isinstance(value, _Object | list):
            return self.container(value, path, depth)
        if isinstance(value, _Number):
            ok = len(value) <= MAX_NUMBER_CHARS and math.isfinite(float(value))
            out = str(value) if ok else json.dumps(_cut(value, MAX_NUMBER_CHARS))
        elif isinstance(value, str):
            if _clear(path):
                out = json.dumps(_cut(value, MAX_TEXT_CHARS))
            else:
                hmac = records.text_hmac(self.key, value)
                out = json.dumps(f"[redacted {len(value)} chars, hmac {hmac}]")
        else:
            out = json.dumps(value)  # true, false, null
        self.left -= len(out)
        return out

    def container(self, value: Any, path: str, depth: int) -> str:
        is_object = isinstance(value, _Object)
        if depth >= MAX_DEPTH:
            out = json.dumps(f"[{len(value)} {'keys' if is_object else 'items'} deeper]")
            self.left -= len(out)
            return out
        parts: list[str] = []
        for i, item in enumerate(value):
            if self.left <= 0:
                more = f"+{len(value) - i} more"
                parts.append(f'"...": "{more}"' if is_object else json.dumps(more))
                break
            if is_object:
                name, child = item
                sub = f"{path}.{name}" if path else name
                head = json.dumps(_cut(name, MAX_TEXT_CHARS)) + ": "
                self.left -= len(head)
                parts.append(head + self.render(child, sub, depth + 1))
            else:
                parts.append(self.render(item, f"{path}[{i}]", depth + 1))
        self.left -= 2 + 2 * len(parts)
        body = ", ".join(parts)
        return "{" + body + "}" if is_object else "[" + body + "]"


def redact(raw: bytes, hmac_key: bytes) -> tuple[str, str]:
    """(event_id, structure) of a rejected message; ``("", "")`` when it is not JSON."""
    if len(raw) > MAX_PARSE_BYTES:
        return "", ""
    try:
        parsed = _parse(raw)
    except (ValueError, RecursionError):
        return "", ""
    event_id = ""
    if isinstance(parsed, _Object):
        ids = [v for k, v in parsed if k == "event_id" and type(v) is str]
        event_id = _cut(ids[0], MAX_FIELD_CHARS) if ids else ""
        event_id = event_id.encode("utf-8", "replace").decode()  # lone surrogates
    shape = _Shape(hmac_key).render(parsed, "", 0)
    return event_id, shape if len(shape) <= MAX_STRUCTURE_BYTES else '"[over the cap]"'


def field_of(detail: str) -> str:
    """The field path a reject's detail names (``field 'x.y': ...``), else ``""``."""
    match = _FIELD.match(detail)
    return _cut(match.group(1), MAX_FIELD_CHARS) if match else ""


def table(
    source: str,
    rejects: Sequence[Reject],
    partition: npt.NDArray[np.int32],
    offset: npt.NDArray[np.int64],
    fingerprints: npt.NDArray[np.uint64],
    stored: dict[int, int],
    hmac_key: bytes,
    store_raw: bool = False,
) -> pa.Table:
    """The ``dead_letters`` rows of one batch's rejects; ``fingerprints`` per message."""
    rows = []
    for r in rejects:
        event_id, shape = redact(r.raw, hmac_key)
        previous = stored.get(r.index)
        rows.append(
            {
                "reason": r.reason,
                "detail": _cut(r.detail, MAX_DETAIL_CHARS),
                "event_id": event_id,
                "field": field_of(r.detail),
                "structure": shape,
                "fingerprint": fingerprint.hex_of(fingerprints[r.index]),
                "stored_fingerprint": "" if previous is None else fingerprint.hex_of(previous),
                "raw": r.raw[:MAX_RAW_BYTES] if store_raw else b"",
                "raw_bytes": len(r.raw),
            }
        )
    idx = np.array([r.index for r in rejects], np.int64)
    return _table(source, rows, partition[idx], offset[idx])


def skipped_table(source: str, skipped: Sequence[Skipped], limit_bytes: int) -> pa.Table:
    """Rows for lines a file source refused unread (over ``limit_bytes``): no structure and no
    fingerprint (the line was never held whole); the file and offset lead to it."""
    rows = [
        {
            "reason": "oversize_message",
            "detail": f"line is {s.length} bytes, limit {limit_bytes}; skipped unread",
            "event_id": "", "field": "", "structure": "", "fingerprint": "",
            "stored_fingerprint": "", "raw": b"", "raw_bytes": s.length,
        }
        for s in skipped
    ]  # fmt: skip
    part = np.array([s.partition for s in skipped], np.int32)
    return _table(source, rows, part, np.array([s.offset for s in skipped], np.int64))


def _table(
    source: str,
    rows: list[dict[str, Any]],
    partition: npt.NDArray[np.int32],
    offset: npt.NDArray[np.int64],
) -> pa.Table:
    now = int(time.time() * 1000)
    n = len(rows)
    s = pa.string()

    def col(name: str) -> list[Any]:
        return [r[name] for r in rows]

    return pa.table(
        {
            "source": pa.array([source] * n, s),
            "source_partition": pa.array(partition, pa.int32()),
            "source_offset": pa.array(offset, pa.int64()),
            "reason": pa.array(col("reason"), s),
            "detail": pa.array(col("detail"), s),
            "event_id": pa.array(col("event_id"), s),
            "field": pa.array(col("field"), s),
            "structure": pa.array(col("structure"), s),
            "fingerprint": pa.array(col("fingerprint"), s),
            "stored_fingerprint": pa.array(col("stored_fingerprint"), s),
            "raw": pa.array(col("raw"), pa.binary()),
            "raw_bytes": pa.array(col("raw_bytes"), pa.uint64()),
            "gap_to": pa.array([-1] * n, pa.int64()),
            "received_at": pa.array([now] * n, records.TS),
        }
    )
