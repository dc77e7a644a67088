"""Hostile input (issue 4, item 5): property tests and a seeded mutation fuzzer against the
decoder, every registered detector and the dead-letter table.

Whatever arrives, the worker must not crash or hang; every message is either stored as an event
or lands in ``dead_letters`` with a reason and a detail; and every message that wire schema v1
allows is accepted. What is valid is decided here by an oracle independent of the decoder: the
JSON Schema (jsonschema) plus the checks the schema's description leaves to the decoder
(duplicate keys, non-finite numbers, the calendar and year range of ``ts``, sizes in bytes).

The seed is ``INFERWATCH_FUZZ_SEED`` (default :data:`DEFAULT_SEED`) and is printed with the
counts (``pytest -s``, or ``-rA``), so a failure replays with the same messages.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from detectors.models.routing import MAX_COLUMNS, FeatureIndex, route
from detectors.registry import create_all, names
from schemas.batch import REJECT_REASONS, Limits
from schemas.decode import decode
from schemas.event_schema import load_schema
from schemas.timestamps import TS_END_MS, TS_MIN_MS
from streams.sources.base import Polled, SourceBase
from streams.store.store import Store
from streams.worker.loop import Worker, WorkerSettings
from streams.worker.pipeline import Pipeline
from tests.support.fuzzer import Fuzzer

DEFAULT_SEED = 20261203
SEED = int(os.environ.get("INFERWATCH_FUZZ_SEED", DEFAULT_SEED))
FUZZ_MESSAGES = 100_000
BIG_ODDS = 0.0  # megabyte messages and 30,000-name objects: in the load test and regressions
BATCH = 1_000
LIMITS = Limits()
VALIDATOR = Draft202012Validator(load_schema())
TEXT_PATHS = (("input", "prompt"), ("output", "text"))
_TS = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


# --- the oracle -------------------------------------------------------------------------------


class _Invalid(Exception):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({k for k, _ in pairs}) != len(pairs):
        raise _Invalid("duplicate key")
    return dict(pairs)


def _constant(name: str) -> float:
    raise _Invalid(name)


def _all_finite_and_utf8(root: Any) -> bool:
    """No number beyond float64, no lone surrogate, at any depth (a loop: depth is hostile)."""
    todo = [root]
    while todo:
        v = todo.pop()
        if isinstance(v, dict):
            todo.extend(v)
            todo.extend(v.values())
        elif isinstance(v, list):
            todo.extend(v)
        elif isinstance(v, float | int) and not isinstance(v, bool):
            try:
                if not math.isfinite(float(v)):
                    return False
            except OverflowError:  # an integer past float64
                return False
        elif isinstance(v, str) and not v.isascii():
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate from a \u escape
                return False
    return True


def _ts_ms(ts: Any) -> int | None:
    """Epoch ms of a ts the JSON Schema allowed (its pattern bounds every field but the day)."""
    if not isinstance(ts, str):
        return int(ts)
    m = _TS.fullmatch(ts)
    if m is None:
        return None
    y, mo, d, h, mi, s, frac, zone = m.groups()
    sign = -1 if zone[0] == "-" else 1
    offset = (
        timedelta(0)
        if zone in "Zz"
        else sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:]))
    )
    try:
        moment = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=timezone(offset))
    except ValueError:  # 30 February
        return None
    return int(moment.timestamp()) * 1000 + int(((frac or ".")[1:] + "000")[:3])


def oracle(raw: bytes) -> dict[str, Any] | None:
    """The event if wire schema v1 allows ``raw``, else None; independent of schemas/."""
    if len(raw) > LIMITS.max_message_bytes:
        return None
    try:
        ev = json.loads(raw.decode("utf-8"), object_pairs_hook=_pairs, parse_constant=_constant)
    except (UnicodeDecodeError, ValueError, RecursionError, _Invalid):
        return None
    if not isinstance(ev, dict) or not _all_finite_and_utf8(ev) or not VALIDATOR.is_valid(ev):
        return None
    ts = _ts_ms(ev["ts"])
    if ts is None or not TS_MIN_MS <= ts < TS_END_MS:
        return None
    texts = [(ev.get(a) or {}).get(b) for a, b in TEXT_PATHS]
    texts += [m["content"] for m in (ev.get("input") or {}).get("messages") or []]
    if any(t is not None and len(t.encode()) > LIMITS.max_text_bytes for t in texts):
        return None
    return ev


# --- accounting -------------------------------------------------------------------------------


def conflicts(messages: list[bytes], events: dict[int, dict[str, Any]]) -> set[int]:
    """The valid messages that reuse an earlier valid message's event_id with other bytes:
    the worker refuses them (conflicting_event_id) and keeps the first version."""
    first: dict[str, bytes] = {}
    out = set()
    for i in sorted(events):
        raw = first.setdefault(events[i]["event_id"], messages[i])
        if raw != messages[i]:
            out.add(i)
    return out


def check_accounting(messages: list[bytes], rows: list[int], rejects: list[Any]) -> None:
    """Every message once: accepted exactly when the oracle allows it and it reuses no earlier
    message's event_id with other bytes, else rejected with a reason and a detail."""
    assert sorted(rows + [r.index for r in rejects]) == list(range(len(messages)))
    for r in rejects:
        assert r.reason in REJECT_REASONS and r.detail and r.raw == messages[r.index], r
    accepted = set(rows)
    events = {i: ev for i, m in enumerate(messages) if (ev := oracle(m)) is not None}
    reused = conflicts(messages, events)
    for i, m in enumerate(messages):
        valid = i in events and i not in reused
        reason = next((r.reason for r in rejects if r.index == i), None)
        assert valid == (i in accepted), (f"seed {SEED}", i, reason, m[:300])


class ListSource(SourceBase):
    """The messages of a list, ``batch`` at a time, as partition 0 at offsets 0, 1, ..."""

    def __init__(self, messages: list[bytes], name: str) -> None:
        self.messages, self.name, self.at = messages, name, 0

    def poll(self, max_messages: int, timeout_s: float) -> Polled:
        part = self.messages[self.at : self.at + max_messages]
        offsets = np.arange(self.at, self.at + len(part), dtype=np.int64)
        self.at += len(part)
        return Polled(part, np.zeros(len(part), np.int32), offsets, {0: self.at})

    def seek(self, positions: dict[int, int]) -> None:
        self.at = positions.get(0, 0)

    def commit(self, positions: dict[int, int]) -> None:
        pass

    def assigned(self) -> set[int]:
        return {0}

    @property
    def exhausted(self) -> bool:
        return self.at >= len(self.messages)

    def close(self) -> None:
        pass


# --- property tests ---------------------------------------------------------------------------

texts = st.text(max_size=12)
finite = st.floats(allow_nan=False, allow_infinity=False)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), finite, texts)
json_any = st.recursive(
    json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3)
)
events = st.fixed_dictionaries(
    {
        "schema_version": st.sampled_from([1, 1.0]),
        "event_id": st.text(min_size=1, max_size=8),
        "ts": st.one_of(
            st.integers(TS_MIN_MS, TS_END_MS - 1),
            st.datetimes(datetime(2000, 1, 2), datetime(2100, 12, 30)).map(
                lambda d: d.isoformat() + "Z"
            ),
        ),
        "model_id": st.sampled_from(["fraud", "risk", "chat", "m\u00e9"]),
        "api_key_id": st.text(min_size=1, max_size=4),
    },
    optional={
        "client_ip": texts,
        "status": st.one_of(st.none(), st.integers(0, 999)),
        "latency_ms": st.one_of(st.none(), finite),
        "tokens_out": st.integers(0, 2**63 - 1),
        "input": st.fixed_dictionaries(
            {},
            optional={
                "features": st.dictionaries(texts, json_leaf, max_size=5),
                "vector": st.lists(finite, max_size=5),
                "messages": st.lists(
                    st.fixed_dictionaries({"role": texts, "content": texts}), max_size=2
                ),
            },
        ),
        "output": st.fixed_dictionaries(
            {},
            optional={
                "label": st.one_of(texts, st.integers(-(2**53), 2**53)),
                "scores": st.dictionaries(texts, st.one_of(st.none(), finite), max_size=4),
                "value": finite,
            },
        ),
        "ground_truth": st.one_of(texts, finite),
        "attributes": st.dictionaries(texts, st.one_of(st.none(), texts), max_size=3),
        "x": json_any,  # unknown: a reject
    },
)


def encode(ev: dict[str, Any]) -> bytes:
    return json.dumps(ev, ensure_ascii=False).encode("utf-8", "surrogatepass")


def flip(raw: bytes, at: int, byte: int) -> bytes:
    at %= len(raw) + 1
    return raw[:at] + bytes([byte]) + raw[at + 1 :]


hostile = st.one_of(
    events.map(encode),
    st.builds(flip, events.map(encode), st.integers(0, 500), st.integers(0, 255)),
    st.builds(lambda ev, n: encode(ev)[:n], events, st.integers(0, 200)),
    st.integers(0, 2**32).map(lambda seed: Fuzzer(seed).message()[0]),
    st.binary(max_size=64),
    json_any.map(lambda v: json.dumps(v).encode()),
)


@settings(
    max_examples=2_000,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(hostile, min_size=1, max_size=10))
def test_fuzz_any_batch_is_accounted_for_and_every_detector_survives_it(
    messages: list[bytes],
) -> None:
    pipeline = Pipeline(create_all())
    n = len(messages)
    result = pipeline.process(messages, np.zeros(n, np.int32), np.arange(n, dtype=np.int64))
    decoded = result.decoded
    assert decoded.batch.n == len(decoded.rows)
    check_accounting(messages, decoded.rows.tolist(), list(decoded.rejects))


# --- the mutation fuzzer, through a worker into chdb ------------------------------------------


# Known, reported, not ours to fix here: streams/store/rows.py stores input.vector as Float32, so a
# valid 1e308 is stored as inf, with numpy's overflow warning. Only that warning is let through.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_fuzz_mutations_through_every_detector_into_the_dead_letter_table(
    tmp_path: Path, record_property: Any
) -> None:
    print(f"\nfuzz seed {SEED} (replay: INFERWATCH_FUZZ_SEED={SEED})", flush=True)
    made = list(Fuzzer(SEED, big_odds=BIG_ODDS).messages(FUZZ_MESSAGES))
    messages = [m for m, _, _ in made]
    # the oracle judges every message the fuzzer cannot vouch for, and every fifth of the
    # others to keep the fuzzer honest (jsonschema takes ~0.5 ms a message)
    events: dict[int, dict[str, Any]] = {}
    for i, (m, kind, valid) in enumerate(made):
        if valid is None or i % 5 == 0:
            ev = oracle(m)
            assert valid in (None, ev is not None), (f"seed {SEED}", kind, m[:300])
            if ev is not None:
                events[i] = ev
        elif valid:
            events[i] = json.loads(m)
    for i in conflicts(messages, events):
        del events[i]  # a reused event_id with other bytes: refused, the first version stays
    good = sorted(events)
    detectors = create_all()
    assert [d.name for d in detectors] == names()
    # reused ids are caught however far apart in event time (the oracle does not model expiry)
    settings = WorkerSettings(batch_max=BATCH, checkpoint_events=20 * BATCH, checkpoint_s=3600,
                              event_id_window_s=1e10)  # fmt: skip
    with Store(f"chdb:{tmp_path / 'store'}") as store:
        counters = Worker(store, ListSource(messages, f"fuzz:{SEED}"), detectors, settings).run()
        stored = [r[0] for r in store.query("SELECT source_offset FROM events").result_rows]
        distinct = store.query("SELECT count() FROM events FINAL").result_rows[0][0]
        dead = store.query(
            "SELECT source_offset, reason, detail FROM dead_letters FINAL ORDER BY source_offset"
        ).result_rows
    by_reason = Counter(r[1] for r in dead)
    summary = (
        f"fuzz seed {SEED}: {len(messages)} messages, {counters.events_total} accepted "
        f"({len(good)} valid by the oracle), {len(dead)} dead letters "
        + ", ".join(f"{k}={v}" for k, v in sorted(by_reason.items()))
        + f"; kinds: {dict(Counter(k.split(':')[0] for _, k, _ in made).most_common())}"
        + f"; worker seconds: { {k: round(v, 1) for k, v in counters.stage_s.items()} }"
    )
    print(summary, flush=True)
    record_property("fuzz", summary)
    # nothing good dropped, nothing bad stored, every message accounted for once
    assert counters.events_total == len(good), f"seed {SEED}"
    assert sum(counters.rejects_total.values()) == len(messages) - len(good)
    assert counters.events_total + len(dead) == len(messages)
    assert [r[0] for r in dead] == [i for i in range(len(messages)) if i not in events]
    assert all(r[1] in REJECT_REASONS and r[2] for r in dead)
    assert dict(by_reason) == counters.rejects_total
    # a replayed or colliding (model_id, event_id) is read once (FINAL), by design
    keys = {(ev["model_id"], ev["event_id"]) for ev in events.values()}
    assert distinct == len(keys), f"seed {SEED}"
    assert set(stored) <= set(good) and len(stored) <= len(good)


@pytest.mark.timeout(60)  # hang protection only: it takes seconds, and took ten minutes
def test_fuzz_many_feature_names_decode_in_linear_time() -> None:
    # regression: pyarrow's struct_field costs time in the number of fields per call, so a
    # 400 KB message with 30,000 feature names took about ten minutes field by field
    feats = {f"f{i}": i for i in range(30_000)}
    ev = {"schema_version": 1, "event_id": "e", "ts": TS_MIN_MS, "model_id": "m", "api_key_id": "k"}
    raw = json.dumps({**ev, "input": {"features": feats}, "attributes": {"a": "b"}}).encode()
    d = decode([raw, raw.replace(b'"e"', b'"e2"')])
    assert d.batch.n == 2 and len(d.batch.num_names) == 30_000
    assert d.batch.num_values[1, d.batch.num_names.index("f29999")] == 29_999.0


@pytest.mark.parametrize("field", ["event_id", "api_key_id", "user_agent"])
def test_fuzz_long_identifiers_are_judged_the_same_with_or_without_bad_neighbours(
    field: str,
) -> None:
    # regression: the reference check held every string to the text limit, the fast path only
    # prompts, message contents and output text (as the JSON Schema says): a long event_id was
    # accepted alone and rejected beside a bad message
    ev = {"schema_version": 1, "event_id": "e", "ts": TS_MIN_MS, "model_id": "m", "api_key_id": "k"}
    raw = json.dumps({**ev, field: "x" * (LIMITS.max_text_bytes + 1)}).encode()
    assert oracle(raw) is not None
    assert decode([raw]).batch.n == 1
    assert decode([raw, b"{"]).batch.n == 1


@pytest.mark.parametrize(
    ("where", "value"),
    [("features", {"a": 1}), ("features", [1, 2]), ("scores", {"a": 1}), ("scores", ["x"])],
)
def test_fuzz_an_object_where_a_number_belongs_is_rejected_beside_good_messages(
    where: str, value: Any
) -> None:
    # regression: after the bad row was filtered out its column kept the object's type, and
    # casting it to float64 raised, so one such message crashed the worker on every replay
    ev = {"schema_version": 1, "event_id": "e", "ts": TS_MIN_MS, "model_id": "m", "api_key_id": "k"}
    part = "input" if where == "features" else "output"
    good = json.dumps({**ev, part: {where: {"n": 1}}}).encode()
    bad = json.dumps({**ev, part: {where: {"x": value}}}).encode()
    messages = [good, bad, good]
    d = decode(messages)
    assert d.batch.n == 2 and [(r.index, r.reason) for r in d.rejects] == [(1, "wrong_type")]
    check_accounting(messages, d.rows.tolist(), list(d.rejects))


@pytest.mark.timeout(60)  # hang protection only: it takes seconds, and took minutes
def test_fuzz_many_string_feature_names_route_in_linear_time() -> None:
    # regression: routing looked each categorical name up in the batch's names, a quadratic
    # that made one message with 40,000 string features take minutes
    ev = {"schema_version": 1, "event_id": "e", "ts": TS_MIN_MS, "model_id": "m", "api_key_id": "k"}
    many = {f"c{i}": "x" for i in range(40_000)}
    raw = json.dumps({**ev, "input": {"features": many}}).encode()
    other = json.dumps({**ev, "event_id": "e2", "input": {"features": {"c0": "y"}}}).encode()
    index = FeatureIndex()
    view = route(decode([raw, other]).batch, index)["m"]
    at = view.feature_names.index("c0")
    assert view.categorical[at] and view.features[:, at].tolist() == [0.0, 1.0]
    # one message cannot widen the model for good: at most MAX_COLUMNS names per model, and a
    # later batch routes on the same columns
    assert len(view.feature_names) == MAX_COLUMNS and "c39999" not in view.feature_names
    again = route(decode([other, raw.replace(b'"e"', b'"e3"')]).batch, index)["m"]
    assert again.feature_names == view.feature_names
    assert again.features[:, at].tolist() == [1.0, 0.0]
