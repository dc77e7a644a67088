"""Wire schema v1 of an inference event: the JSON Schema file and a reference check of one message.

:func:`check_event` is the row-at-a-time reference the fast decoder defers to for every message it
cannot vouch for: it gives each bad message one reason (by the precedence of :data:`PRECEDENCE`)
and each good one a canonical form that the fast path decodes without a fallback.

>>> check_event(b'{"schema_version": 1, "event_id": "e1", "ts": 1735689600000, '
...             b'"model_id": "m", "api_key_id": 7}', Limits())
('wrong_type', "field 'api_key_id': expected string, got number")
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from schemas.batch import Limits
from schemas.timestamps import TS_END_MS as TS_END_MS
from schemas.timestamps import TS_MIN_MS as TS_MIN_MS
from schemas.timestamps import TS_PATTERN as TS_PATTERN
from schemas.timestamps import parse_ts as parse_ts

SCHEMA_PATH = Path(__file__).with_name("event_v1.schema.json")

# Most severe first: a message gets the first reason of this list that applies to it.
PRECEDENCE = (
    "oversize_message",
    "bad_json",
    "duplicate_key",
    "non_finite_number",
    "unknown_schema_version",
    "missing_field",
    "wrong_type",
    "oversize_text",
    "oversize_vector",
    "bad_timestamp",
)

REQUIRED_STRINGS = ("event_id", "model_id", "api_key_id")
OPTIONAL_STRINGS = ("model_version", "tenant", "client_ip", "user_agent", "session_id")
INPUT_FIELDS = ("features", "vector", "prompt", "messages")
OUTPUT_FIELDS = ("label", "scores", "value", "text", "finish_reason")
TOP_FIELDS = frozenset(
    (
        "schema_version",
        "ts",
        *REQUIRED_STRINGS,
        *OPTIONAL_STRINGS,
        "status",
        "latency_ms",
        "tokens_in",
        "tokens_out",
        "input",
        "output",
        "ground_truth",
        "attributes",
    )
)

MAX_SAFE_INT = 2**53  # integer labels beyond this do not survive a float64 round trip
INT64_MAX = 2**63 - 1
STATUS_MAX = 999

Problem = tuple[str, str]


def load_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of wire schema v1, as a fresh dict."""
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return schema


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _as_int(v: Any, lo: int, hi: int) -> int | None:
    """``v`` as an int if it is an integral number in [lo, hi]; 1.0 counts, as in JSON Schema."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    if isinstance(v, float):
        if not v.is_integer():
            return None
        v = int(v)
    return v if lo <= v <= hi else None


class _Parse:
    """json.loads hooks that note duplicate keys at any depth instead of keeping the last one,
    and numbers that are not finite (NaN, Infinity, 1e999, a 400-digit integer)."""

    def __init__(self) -> None:
        self.duplicate: str | None = None
        self.non_finite = False

    def pairs(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d = dict(pairs)
        if len(d) != len(pairs) and self.duplicate is None:
            seen: set[str] = set()
            for k, _ in pairs:
                if k in seen:
                    self.duplicate = k
                    break
                seen.add(k)
        return d

    def number(self, text: str) -> float:
        v = float(text)
        self.non_finite |= not math.isfinite(v)
        return v

    def integer(self, text: str) -> int | float:
        # ints past int64 become floats, as in pyarrow; past float64, inf
        if len(text) <= 20:
            v = int(text)
            if -INT64_MAX - 1 <= v <= INT64_MAX:
                return v
        return self.number(text)


# What makes a parsed message worth a walk: a \u escape of a UTF-16 surrogate, maybe unpaired
# (json.loads keeps those, UTF-8 cannot), or a number long enough to overflow a float.
_WALK_NEEDED = re.compile(rb"\\u[dD][89a-fA-F]|[eE]\+?0*[1-9][0-9]{2}|[0-9]{200}")


def _bad_values(v: Any, path: str, found: dict[str, str]) -> None:
    """Note the first non-finite number and the first lone surrogate anywhere in ``v``."""
    if isinstance(v, float):
        if not math.isfinite(v) and "non_finite_number" not in found:
            found["non_finite_number"] = f"field '{path}': {v!r} is not a finite number"
    elif isinstance(v, str):
        if not v.isascii() and "bad_json" not in found:
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                found["bad_json"] = f"field '{path}': invalid \\u escape (lone surrogate)"
    elif isinstance(v, dict):
        for k, x in v.items():
            sub = f"{path}.{k}" if path else k
            _bad_values(k, sub, found)
            _bad_values(x, sub, found)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _bad_values(x, f"{path}[{i}]", found)


def _parse(raw: bytes) -> Problem | dict[str, Any]:
    hooks = _Parse()
    try:
        obj = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=hooks.pairs,
            parse_int=hooks.integer,
            parse_constant=hooks.number,
        )
    except UnicodeDecodeError as e:
        return "bad_json", f"not UTF-8: {e.reason} at byte {e.start}"
    except json.JSONDecodeError as e:
        return "bad_json", f"invalid JSON: {e.msg} at char {e.pos}" if raw else "empty message"
    except RecursionError:
        return "bad_json", "invalid JSON: nested too deeply"
    if not isinstance(obj, dict):
        return "bad_json", f"top level is {_json_type(obj)}, expected an object"
    found: dict[str, str] = {}
    if hooks.non_finite or _WALK_NEEDED.search(raw):
        _bad_values(obj, "", found)
    if "bad_json" in found:
        return "bad_json", found["bad_json"]
    if hooks.duplicate is not None:
        return "duplicate_key", f"duplicate key '{hooks.duplicate}'"
    if "non_finite_number" in found:
        return "non_finite_number", found["non_finite_number"]
    return obj


class _Checker:
    """Collects every problem of one parsed event and its canonical form."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.problems: list[Problem] = []

    def add(self, reason: str, path: str, what: str) -> None:
        self.problems.append((reason, f"field '{path}': {what}"))

    def wrong(self, path: str, expected: str, v: Any) -> None:
        self.add("wrong_type", path, f"expected {expected}, got {_json_type(v)}")

    def unknown(
        self, obj: dict[str, Any], allowed: frozenset[str] | tuple[str, ...], at: str
    ) -> None:
        for k in obj:
            if k not in allowed:
                self.add("wrong_type", f"{at}{k}", "unknown field (not in schema v1)")

    def text(self, path: str, v: Any, required: bool = False, limited: bool = False) -> Any:
        """A string field; ``limited`` ones (prompt, message contents, output text: the JSON
        Schema's and the fast path's) are held to ``Limits.max_text_bytes``."""
        if v is None and required:
            self.add("missing_field", path, "required")
        elif v is not None and not isinstance(v, str):
            self.wrong(path, "string", v)
        elif limited and v is not None and len(v) * 4 > self.limits.max_text_bytes:
            size = len(v.encode("utf-8"))
            if size > self.limits.max_text_bytes:
                self.add("oversize_text", path, f"{size} bytes, limit {self.limits.max_text_bytes}")
        return v

    def number(self, path: str, v: Any) -> Any:
        if v is not None and not _is_number(v):
            self.wrong(path, "number", v)
        return v

    def integer(self, path: str, v: Any, lo: int, hi: int) -> Any:
        if v is None:
            return None
        n = _as_int(v, lo, hi)
        if n is None:
            self.wrong(path, f"integer {lo}..{hi}" if _is_number(v) else "integer", v)
        return n

    def check(self, ev: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        version = ev.get("schema_version")
        if version is None:
            self.add("missing_field", "schema_version", "required")
        elif _as_int(version, 1, 1) is None:
            self.add("unknown_schema_version", "schema_version", f"{version!r} is not 1")
        out["schema_version"] = 1
        for name in REQUIRED_STRINGS:
            v = ev.get(name)
            if v == "":
                self.add("missing_field", name, "required, got an empty string")
            out[name] = self.text(name, v, required=True)
        for name in OPTIONAL_STRINGS:
            out[name] = self.text(name, ev.get(name))
        out["ts"] = self.ts(ev.get("ts"))
        out["status"] = self.integer("status", ev.get("status"), 0, STATUS_MAX)
        out["latency_ms"] = self.number("latency_ms", ev.get("latency_ms"))
        for name in ("tokens_in", "tokens_out"):
            out[name] = self.integer(name, ev.get(name), 0, INT64_MAX)
        out["input"] = self.input(ev.get("input"))
        out["output"] = self.output(ev.get("output"))
        gt = ev.get("ground_truth")
        if gt is not None and not (isinstance(gt, str) or _is_number(gt)):
            self.wrong("ground_truth", "string or number", gt)
        out["ground_truth"] = gt
        out["attributes"] = self.string_map("attributes", ev.get("attributes"))
        self.unknown(ev, TOP_FIELDS, "")
        return {k: v for k, v in out.items() if v is not None}

    def ts(self, v: Any) -> Any:
        if v is None:
            self.add("missing_field", "ts", "required")
            return None
        if isinstance(v, str):
            ms = parse_ts(v)
            if ms is None:
                self.add("bad_timestamp", "ts", f"{v[:40]!r} is not RFC 3339 with Z or ±hh:mm")
            elif not TS_MIN_MS <= ms < TS_END_MS:
                self.add("bad_timestamp", "ts", f"{v[:40]!r} is outside years 2000..2100")
            return v
        n = _as_int(v, -(2**63), INT64_MAX)
        if n is None and not (_is_number(v) and float(v).is_integer()):
            self.wrong("ts", "RFC 3339 string or integer epoch milliseconds", v)
        elif n is None or not TS_MIN_MS <= n < TS_END_MS:
            self.add("bad_timestamp", "ts", f"{v!r} ms is outside years 2000..2100")
        return n

    def input(self, v: Any) -> Any:
        if not isinstance(v, dict):
            if v is not None:
                self.wrong("input", "object", v)
            return None
        self.unknown(v, INPUT_FIELDS, "input.")
        out: dict[str, Any] = {}
        feats = v.get("features")
        if feats is not None and not isinstance(feats, dict):
            self.wrong("input.features", "object", feats)
        elif feats is not None:
            for k, x in feats.items():
                if isinstance(x, list | dict):
                    self.wrong(f"input.features.{k}", "number, string, boolean or null", x)
            out["features"] = feats
        vec = v.get("vector")
        if vec is not None and not isinstance(vec, list):
            self.wrong("input.vector", "array", vec)
        elif vec is not None:
            for i, x in enumerate(vec):
                if not _is_number(x):
                    self.wrong(f"input.vector[{i}]", "number", x)
                    break
            if len(vec) > self.limits.max_vector_dim:
                self.problems.append(
                    (
                        "oversize_vector",
                        f"field 'input.vector': {len(vec)} values, "
                        f"limit {self.limits.max_vector_dim}",
                    )
                )
            out["vector"] = vec
        out["prompt"] = self.text("input.prompt", v.get("prompt"), limited=True)
        out["messages"] = self.messages(v.get("messages"))
        return {k: x for k, x in out.items() if x is not None}

    def messages(self, v: Any) -> Any:
        if not isinstance(v, list):
            if v is not None:
                self.wrong("input.messages", "array", v)
            return None
        for i, m in enumerate(v):
            path = f"input.messages[{i}]"
            if not isinstance(m, dict):
                self.wrong(path, "object", m)
                continue
            self.unknown(m, ("role", "content"), f"{path}.")
            self.text(f"{path}.role", m.get("role"), required=True)
            self.text(f"{path}.content", m.get("content"), required=True, limited=True)
        return v

    def output(self, v: Any) -> Any:
        if not isinstance(v, dict):
            if v is not None:
                self.wrong("output", "object", v)
            return None
        self.unknown(v, OUTPUT_FIELDS, "output.")
        out: dict[str, Any] = {}
        label = v.get("label")
        if label is not None and not isinstance(label, str):
            label = self.integer("output.label", label, -MAX_SAFE_INT, MAX_SAFE_INT)
        out["label"] = label
        scores = v.get("scores")
        if scores is not None and not isinstance(scores, dict):
            self.wrong("output.scores", "object", scores)
        elif scores is not None:
            for k, x in scores.items():
                self.number(f"output.scores.{k}", x)
            out["scores"] = scores
        out["value"] = self.number("output.value", v.get("value"))
        out["text"] = self.text("output.text", v.get("text"), limited=True)
        out["finish_reason"] = self.text("output.finish_reason", v.get("finish_reason"))
        return {k: x for k, x in out.items() if x is not None}

    def string_map(self, path: str, v: Any) -> Any:
        if v is not None and not isinstance(v, dict):
            self.wrong(path, "object", v)
        elif v is not None:
            for k, x in v.items():
                if x is not None and not isinstance(x, str):
                    self.wrong(f"{path}.{k}", "string", x)
        return v


def check_event(raw: bytes, limits: Limits) -> Problem | dict[str, Any]:
    """``(reason, detail)`` for a message wire schema v1 rejects, else its canonical event.

    The canonical event holds the same values with integral numbers where integers belong
    (``200.0`` -> ``200``) and null optional fields dropped.
    """
    if len(raw) > limits.max_message_bytes:
        return "oversize_message", f"message is {len(raw)} bytes, limit {limits.max_message_bytes}"
    parsed = _parse(raw)
    if isinstance(parsed, tuple):
        return parsed
    checker = _Checker(limits)
    canonical = checker.check(parsed)
    if checker.problems:
        return min(checker.problems, key=lambda p: PRECEDENCE.index(p[0]))
    return canonical
