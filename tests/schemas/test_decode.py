"""Decoder of wire schema v1: rejects with reasons, columns, and agreement with the JSON Schema."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from schemas.batch import REJECT_REASONS, Decoded, EventBatch, Limits
from schemas.decode import decode, ts_text_ms
from schemas.event_schema import TS_END_MS, TS_MIN_MS, check_event, load_schema, parse_ts

TS = "2025-03-01T12:00:00Z"
TS_MS = 1_740_830_400_000


def event(i: int, **fields_: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "schema_version": 1,
        "event_id": f"e{i}",
        "ts": TS,
        "model_id": "fraud",
        "api_key_id": f"k{i % 3}",
        "input": {"features": {"amount": 10.5 + i, "country": "FR", "new": i % 2 == 0}},
        "output": {"label": "ok", "scores": {"fraud": 0.1, "ok": 0.9}},
    }
    ev.update(fields_)
    return ev


def enc(ev: Any) -> bytes:
    return json.dumps(ev).encode()


N_GOOD = 40  # more than a refused block that is checked message by message without a scan


def with_bad(bad: list[bytes], n_good: int = N_GOOD) -> tuple[list[bytes], list[int]]:
    """Good messages with the bad ones in the middle; returns messages and the bad positions."""
    good = [enc(event(i)) for i in range(n_good)]
    half = n_good // 2
    return good[:half] + bad + good[half:], list(range(half, half + len(bad)))


def assert_rejected(bad: list[bytes], reason: str, mention: str | None, **kw: Any) -> Decoded:
    messages, positions = with_bad(bad)
    d = decode(messages, **kw)
    assert [r.index for r in d.rejects] == positions
    for r in d.rejects:
        assert r.reason == reason, r
        assert r.raw == messages[r.index]
        assert r.detail
        if mention is not None:
            assert mention in r.detail, r
    assert d.batch.event_id.tolist() == [f"e{i}" for i in range(N_GOOD)]
    assert d.rows.tolist() == [i for i in range(len(messages)) if i not in positions]
    return d


def test_decode_rejects_bad_json_and_keeps_good_messages() -> None:
    bad = [
        b"",
        b"   ",
        b'{"schema_version": 1',
        b"[1, 2]",
        b'"text"',
        enc(event(9)) + b" trailing",
        enc(event(9)) + enc(event(10)),
        b"\xef\xbb\xbf" + enc(event(9)),
        enc(event(9)).replace(b'"e9"', b'"e\n9"'),
        enc(event(9)).replace(b'"e9"', b'"e\xff9"'),
        enc(event(9)).replace(b'"e9"', b'"e\\ud8009"'),
        b'{"a":' + b"[" * 20_000 + b"]" * 20_000 + b"}",
    ]
    assert_rejected(bad, "bad_json", None)


def test_decode_accepts_newlines_between_tokens() -> None:
    pretty = json.dumps(event(0), indent=2).replace("\n", "\r\n").encode()
    assert decode([pretty]).batch.event_id.tolist() == ["e0"]


def test_decode_rejects_non_finite_number_and_keeps_good_messages() -> None:
    bad = [
        enc(event(9)).replace(b'"ts"', b'"latency_ms": NaN, "ts"'),
        enc(event(9)).replace(b'"amount": 19.5', b'"amount": Infinity'),
        enc(event(9)).replace(b'"fraud": 0.1', b'"fraud": -Infinity'),
        enc(event(9)).replace(b'"fraud": 0.1', b'"fraud": 1e400'),
        enc(event(9)).replace(b'"fraud": 0.1', b'"fraud": 1' + b"0" * 400 + b".5"),
    ]
    d = assert_rejected(bad, "non_finite_number", "field '")
    assert [r.detail.split("'")[1] for r in d.rejects] == [
        "latency_ms",
        "input.features.amount",
        "output.scores.fraud",
        "output.scores.fraud",
        "output.scores.fraud",
    ]


def test_decode_rejects_duplicate_key_and_keeps_good_messages() -> None:
    bad = [
        enc(event(9)).replace(b'"api_key_id"', b'"api_key_id": "victim", "api_key_id"'),
        enc(event(9)).replace(b'"country"', b'"country": "US", "country"'),
        enc(event(9)).replace(b'"api_key_id"', b'"api_key_id": "x", "\\u0061pi_key_id"'),
    ]
    d = assert_rejected(bad, "duplicate_key", "'")
    assert [r.detail for r in d.rejects] == [
        "duplicate key 'api_key_id'",
        "duplicate key 'country'",
        "duplicate key 'api_key_id'",
    ]


def test_decode_rejects_wrong_type_and_keeps_good_messages() -> None:
    cases = {
        "api_key_id": enc(event(9, api_key_id=42)),
        "status": enc(event(9, status="200")),
        "tokens_in": enc(event(9, tokens_in=-1)),
        "input.features.x": enc(event(9, input={"features": {"x": [1]}})),
        "input.vector[1]": enc(event(9, input={"vector": [1, "2"]})),
        "output.label": enc(event(9, output={"label": 1.5})),
        "output.scores.ok": enc(event(9, output={"scores": {"ok": True}})),
        "ground_truth": enc(event(9, ground_truth=[1])),
        "attributes.region": enc(event(9, attributes={"region": 3})),
        "surprise": enc(event(9, surprise=None)),
        "input.extra": enc(event(9, input={"extra": 1})),
        "ts": enc(event(9, ts=True)),
    }
    d = assert_rejected(list(cases.values()), "wrong_type", None)
    for r, name in zip(d.rejects, cases, strict=True):
        assert f"field '{name}'" in r.detail, r
    assert d.rejects[0].detail == "field 'api_key_id': expected string, got number"


def test_decode_rejects_missing_field_and_keeps_good_messages() -> None:
    no_key = event(9)
    del no_key["api_key_id"]
    cases = {
        "api_key_id": enc(no_key),
        "event_id": enc(event(9, event_id="")),
        "model_id": enc(event(9, model_id=None)),
        "input.messages[1].content": enc(
            event(9, input={"messages": [{"role": "user", "content": "hi"}, {"role": "bot"}]})
        ),
    }
    d = assert_rejected(list(cases.values()), "missing_field", None)
    for r, name in zip(d.rejects, cases, strict=True):
        assert f"field '{name}'" in r.detail, r


def test_decode_rejects_unknown_schema_version_and_keeps_good_messages() -> None:
    bad = [enc(event(9, schema_version=2)), enc(event(9, schema_version="1"))]
    assert_rejected(bad, "unknown_schema_version", "schema_version")


def test_decode_rejects_oversize_message_and_keeps_good_messages() -> None:
    bad = [enc(event(9, input={"prompt": "x" * 1000}))]
    assert_rejected(bad, "oversize_message", "1000", limits=Limits(max_message_bytes=1000))


def test_decode_rejects_oversize_text_and_keeps_good_messages() -> None:
    cases = {
        "input.prompt": enc(event(9, input={"prompt": "é" * 60})),
        "input.messages[0].content": enc(
            event(9, input={"messages": [{"role": "user", "content": "x" * 101}]})
        ),
        "output.text": enc(event(9, output={"text": "y" * 101})),
    }
    d = assert_rejected(
        list(cases.values()), "oversize_text", None, limits=Limits(max_text_bytes=100)
    )
    for r, name in zip(d.rejects, cases, strict=True):
        assert f"field '{name}'" in r.detail, r


def test_decode_rejects_oversize_vector_and_keeps_good_messages() -> None:
    bad = [enc(event(9, input={"vector": [0.5] * 9}))]
    assert_rejected(bad, "oversize_vector", "input.vector", limits=Limits(max_vector_dim=8))


def test_decode_rejects_bad_timestamp_and_keeps_good_messages() -> None:
    bad = [
        enc(event(9, ts="2025-03-01T12:00:00")),
        enc(event(9, ts="2025-02-30T12:00:00Z")),
        enc(event(9, ts="2025-03-01T24:00:00Z")),
        enc(event(9, ts="1999-12-31T23:59:59Z")),
        enc(event(9, ts="2000-01-01T00:30:00+01:00")),
        enc(event(9, ts="yesterday")),
        enc(event(9, ts=1_740_830_400)),
        enc(event(9, ts=10**30)),
    ]
    assert_rejected(bad, "bad_timestamp", "field 'ts'")


def test_decode_reports_the_most_severe_reason_first() -> None:
    # duplicate key beats NaN, which beats a missing field, which beats a wrong type
    both = b'{"a": NaN, "a": 1}'
    nan_and_missing = b'{"schema_version": 1, "latency_ms": NaN}'
    missing_and_wrong = enc({"schema_version": 1, "event_id": 5, "ts": TS, "model_id": "m"})
    version_and_missing = enc({"schema_version": 2})
    oversize_and_bad_ts = enc(event(9, ts="now", input={"vector": [1.0] * 9}))
    d = decode(
        [both, nan_and_missing, missing_and_wrong, version_and_missing, oversize_and_bad_ts],
        limits=Limits(max_vector_dim=8),
    )
    assert [r.reason for r in d.rejects] == [
        "duplicate_key",
        "non_finite_number",
        "missing_field",
        "unknown_schema_version",
        "oversize_vector",
    ]
    assert {r.reason for r in d.rejects} <= set(REJECT_REASONS)


def test_decode_accepts_logits_as_scores() -> None:
    d = decode([enc(event(0, output={"scores": {"fraud": -3.5, "ok": 7.25, "z": 0}}))])
    assert d.batch.score_labels == ("fraud", "ok", "z")
    assert d.batch.scores.tolist() == [[-3.5, 7.25, 0.0]]


def test_decode_converts_rfc3339_offsets_and_fractions_to_utc_ms() -> None:
    texts = [
        "2025-03-01T14:00:00.123456+02:00",
        "2025-03-01t11:30:00.9-00:30",
        "2025-03-01 12:00:00z",
    ]
    d = decode([enc(event(i, ts=t)) for i, t in enumerate(texts)])
    expected = [TS_MS + 123, TS_MS + 900, TS_MS]
    assert d.batch.ts_ms.tolist() == expected
    iso = [t.replace("t", "T").replace("z", "+00:00") for t in texts]
    assert [int(datetime.fromisoformat(t).timestamp() * 1000) for t in iso] == expected


def test_decode_takes_integer_ts_as_epoch_ms() -> None:
    d = decode([enc(event(0, ts=TS_MS + 5)), enc(event(1, ts=float(TS_MS)))])
    assert d.batch.ts_ms.tolist() == [TS_MS + 5, TS_MS]
    assert d.batch.ts_ms.dtype == np.int64


def test_decode_mixes_string_and_integer_ts_in_one_batch() -> None:
    d = decode([enc(event(0, ts=TS_MS)), enc(event(1)), enc(event(2, ts=TS_MS + 1))])
    assert d.batch.ts_ms.tolist() == [TS_MS, TS_MS, TS_MS + 1]


def test_decode_turns_integer_labels_into_text() -> None:
    d = decode([enc(event(0, output={"label": 1})), enc(event(1, output={"label": 2.0}))])
    assert d.batch.output_label.tolist() == ["1", "2"]
    d = decode([enc(event(0, output={"label": 3})), enc(event(1))])
    assert d.batch.output_label.tolist() == ["3", "ok"]


def test_decode_joins_message_contents_into_the_prompt() -> None:
    chat = {
        "messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    }
    d = decode(
        [
            enc(event(0, input=chat)),
            enc(event(1, input={"prompt": "plain"})),
            enc(event(2, input={**chat, "prompt": "wins"})),
            enc(event(3, input={"messages": []})),
        ]
    )
    assert d.batch.prompt.tolist() == ["be nice\nhi", "plain", "wins", ""]


def test_decode_defaults_missing_optional_fields() -> None:
    minimal = {"schema_version": 1, "event_id": "e", "ts": TS, "model_id": "m", "api_key_id": "k"}
    b = decode([enc(minimal), enc({**minimal, "tenant": None, "status": None})]).batch
    for name in ("model_version", "tenant", "client_ip", "user_agent", "session_id", "prompt"):
        assert getattr(b, name).tolist() == ["", ""]
    for name in ("output_label", "output_text", "finish_reason", "ground_truth", "attributes"):
        assert getattr(b, name).tolist() == ["", ""]
    assert b.status.tolist() == [200, 200] and b.status.dtype == np.int32
    assert np.isnan(b.latency_ms).all() and np.isnan(b.output_value).all()
    assert b.tokens_in.tolist() == [-1, -1] and b.tokens_out.tolist() == [-1, -1]
    assert b.num_names == () and b.cat_names == () and b.score_labels == ()
    assert b.num_values.shape == (2, 0) and b.vector.shape == (2, 0)
    assert b.vector_len.tolist() == [0, 0]


def test_decode_builds_feature_vector_and_attribute_columns() -> None:
    messages = [
        enc(event(0, input={"features": {"b": 1, "a": "x", "c": None}, "vector": [1, 2.5]})),
        enc(
            event(1, input={"features": {"a": "w", "b": True}}, attributes={"z": "1", "a": 'é"\n'})
        ),
        enc(event(2, input={"features": {"b": 2.5}, "vector": []}, attributes={})),
    ]
    b = decode(messages).batch
    assert b.num_names == ("b",) and b.num_values.tolist() == [[1.0], [1.0], [2.5]]
    assert b.cat_names == ("a",) and b.cat_values == (("w", "x"),)
    assert b.cat_codes.tolist() == [[1], [0], [-1]]
    assert b.vector_len.tolist() == [2, 0, 0]
    np.testing.assert_array_equal(b.vector, [[1.0, 2.5], [np.nan, np.nan], [np.nan, np.nan]])
    expected_attrs = json.dumps({"z": "1", "a": 'é"\n'}, sort_keys=True, separators=(",", ":"))
    assert b.attributes.tolist() == ["", expected_attrs.replace("\\u00e9", "é"), "{}"]


def test_decode_passes_through_partition_offset_and_payload_size() -> None:
    messages, _ = with_bad([b"nope"], n_good=4)
    d = decode(messages, partition=np.full(5, 3), offset=np.arange(100, 105))
    assert d.batch.partition.tolist() == [3] * 4 and d.batch.partition.dtype == np.int32
    assert d.batch.offset.tolist() == [100, 101, 103, 104]
    assert d.batch.payload_bytes.tolist() == [len(messages[i]) for i in (0, 1, 3, 4)]


def test_decode_of_nothing_is_an_empty_batch() -> None:
    d = decode([])
    assert d.batch.n == 0 and d.rows.tolist() == [] and d.rejects == ()


def assert_same_batch(a: EventBatch, b: EventBatch, skip: tuple[str, ...] = ("offset",)) -> None:
    for f in fields(EventBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name in skip:
            continue
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype, f.name
            np.testing.assert_array_equal(x, y, err_msg=f.name)
        else:
            assert x == y, f.name


def odd_but_valid(i: int) -> bytes:
    kinds = [
        enc(event(i, input={"features": {"a": 1}})),
        enc(event(i, input={"features": {"a": "x"}}, ts=TS_MS)),
        enc(event(i, status=404.0, output={"label": 7})),
        enc(event(i, input={"vector": [1, 2, 3]}, ground_truth=0.25)),
        enc(event(i, attributes={"k": "v"}, ground_truth="ok")),
        b"  " + enc(event(i)),
    ]
    return kinds[i % len(kinds)]


@pytest.mark.parametrize("n_good", [6, 60])
def test_decode_gives_the_same_columns_with_or_without_bad_neighbours(n_good: int) -> None:
    # conflicting feature types, mixed ts types and integral floats force scans, splits and the
    # canonical second pass; none of it may show in the columns
    good = [odd_but_valid(i) for i in range(n_good)]
    bad = [b"{", enc(event(99, ts="now")), enc(event(99, status=True)), b'{"a":1,"a":2}']
    mixed = list(good)
    for k, m in enumerate(bad):
        mixed.insert(1 + k * (n_good // len(bad) + 1), m)
    alone, together = decode(good), decode(mixed)
    assert len(alone.rejects) == 0 and len(together.rejects) == 4
    assert_same_batch(alone.batch, together.batch)
    singles = [decode([m]).batch for m in good[:6]]
    assert [b.status.tolist() for b in singles] == [[200], [200], [404], [200], [200], [200]]
    for i, single in enumerate(singles):
        assert row_view(single, 0) == row_view(alone.batch, i)
    assert "a" in alone.batch.num_names and "a" in alone.batch.cat_names
    assert alone.batch.ground_truth.tolist()[:6] == ["", "", "", "0.25", "ok", ""]


# --- property tests -------------------------------------------------------------------------

names = st.sampled_from(["a", "b", "x.y", "", "é", 'q"t', "ts"])
texts = st.text(max_size=8)
finite = st.floats(allow_nan=False, allow_infinity=False)
numbers = st.one_of(st.integers(-(2**70), 2**70), finite)
offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
moments = st.datetimes(datetime(2000, 1, 2), datetime(2100, 12, 30), timezones=offsets)


def ts_text(moment: datetime, zulu: bool) -> str:
    text = moment.isoformat()
    return text[:-6] + "Z" if zulu and text.endswith("+00:00") else text


def optional(s: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), s)


events = st.fixed_dictionaries(
    {
        "schema_version": st.just(1),
        "event_id": st.text(min_size=1, max_size=6),
        "ts": st.one_of(
            st.integers(TS_MIN_MS, TS_END_MS - 1), st.builds(ts_text, moments, st.booleans())
        ),
        "model_id": st.sampled_from(["m1", "m2"]),
        "api_key_id": st.text(min_size=1, max_size=4),
    },
    optional={
        "tenant": optional(texts),
        "status": optional(st.integers(0, 999)),
        "latency_ms": optional(numbers),
        "tokens_in": optional(st.integers(0, 2**63 - 1)),
        "input": optional(
            st.fixed_dictionaries(
                {},
                optional={
                    "features": st.dictionaries(
                        names, st.one_of(st.none(), st.booleans(), numbers, texts), max_size=4
                    ),
                    "vector": st.lists(numbers, max_size=4),
                    "prompt": optional(texts),
                    "messages": st.lists(
                        st.fixed_dictionaries({"role": texts, "content": texts}), max_size=3
                    ),
                },
            )
        ),
        "output": optional(
            st.fixed_dictionaries(
                {},
                optional={
                    "label": optional(st.one_of(texts, st.integers(-(2**53), 2**53))),
                    "scores": st.dictionaries(names, optional(numbers), max_size=3),
                    "value": optional(finite),
                    "text": optional(texts),
                },
            )
        ),
        "ground_truth": optional(st.one_of(texts, st.integers(-1000, 1000))),
        "attributes": optional(st.dictionaries(texts, optional(texts), max_size=3)),
    },
)


def nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


ROW_STRINGS = (
    *("event_id", "model_id", "api_key_id", "tenant", "prompt", "output_label"),
    *("output_text", "ground_truth", "attributes"),
)


def row_view(b: EventBatch, i: int) -> dict[str, Any]:
    """One row of a batch as plain values, independent of the batch's other rows."""
    row = {name: getattr(b, name)[i] for name in ROW_STRINGS}
    row["ts_ms"] = int(b.ts_ms[i])
    row["status"] = int(b.status[i])
    row["tokens_in"] = int(b.tokens_in[i])
    row["latency_ms"] = nan_to_none(b.latency_ms[i])
    row["output_value"] = nan_to_none(b.output_value[i])
    row["num"] = {
        k: v for k, v in zip(b.num_names, b.num_values[i].tolist(), strict=True) if v == v
    }
    row["cat"] = {
        k: b.cat_values[j][c]
        for j, (k, c) in enumerate(zip(b.cat_names, b.cat_codes[i], strict=True))
        if c >= 0
    }
    row["vector"] = b.vector[i, : b.vector_len[i]].tolist()
    row["scores"] = {
        k: v for k, v in zip(b.score_labels, b.scores[i].tolist(), strict=True) if v == v
    }
    return row


def int_if_integral(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def expected_view(ev: dict[str, Any]) -> dict[str, Any]:
    """The naive row-at-a-time reading of one valid event."""
    inp, out = ev.get("input") or {}, ev.get("output") or {}
    ts = ev["ts"]
    if isinstance(ts, str):
        moment = datetime.fromisoformat(ts)
        ts = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    feats = inp.get("features") or {}
    messages = inp.get("messages")
    prompt = inp.get("prompt")
    if prompt is None:
        prompt = "\n".join(m["content"] for m in messages) if messages is not None else ""
    attrs = ev.get("attributes")
    truth = ev.get("ground_truth")
    return {
        "event_id": ev["event_id"],
        "model_id": ev["model_id"],
        "api_key_id": ev["api_key_id"],
        "tenant": ev.get("tenant") or "",
        "prompt": prompt,
        "output_label": "" if out.get("label") is None else str(int_if_integral(out["label"])),
        "output_text": out.get("text") or "",
        "ground_truth": "" if truth is None else str(truth),
        "attributes": ""
        if attrs is None
        else json.dumps(
            {k: v for k, v in attrs.items() if v is not None},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        ),
        "ts_ms": int(ts),
        "status": 200 if ev.get("status") is None else ev["status"],
        "tokens_in": -1 if ev.get("tokens_in") is None else ev["tokens_in"],
        "latency_ms": None if ev.get("latency_ms") is None else float(ev["latency_ms"]),
        "output_value": None if out.get("value") is None else float(out["value"]),
        "num": {k: float(v) for k, v in feats.items() if v is not None and not isinstance(v, str)},
        "cat": {k: v for k, v in feats.items() if isinstance(v, str)},
        "vector": [float(v) for v in inp.get("vector") or []],
        "scores": {k: float(v) for k, v in (out.get("scores") or {}).items() if v is not None},
    }


bad_messages = st.sampled_from(
    [
        b"",
        b"{",
        b"[]",
        b'{"a":1,"a":2}',
        b'{"schema_version":1,"x":NaN}',
        enc(event(0, ts="now")),
        enc(event(0, status=math.nan)),
        enc(event(0, api_key_id=5)),
        enc(event(0, extra=None)),
        enc(event(0)) + b" " + enc(event(1)),
        enc(event(0, input={"vector": [1, None]})),
    ]
)
# valid, but not what the fast path reads at its first attempt
odd_events = st.sampled_from(
    [
        event(0, status=200.0, schema_version=1.0, output={"label": 2.0}),
        event(1, ts=float(TS_MS)),
        event(2, input={"features": {"amount": "high", "new": 1}}),
        event(3, ts=TS_MS, ground_truth="yes"),
    ]
)
encodings = st.sampled_from(
    [
        lambda ev: json.dumps(ev).encode(),
        lambda ev: json.dumps(ev, ensure_ascii=False).encode(),
        lambda ev: json.dumps(ev, indent=1).encode(),
        lambda ev: b" \r\n" + json.dumps(ev, ensure_ascii=False, separators=(",", ":")).encode(),
    ]
)


def check_rows_against_reference(
    evs: list[dict[str, Any]], bad: list[bytes], data: st.DataObject
) -> None:
    messages = [data.draw(encodings)(ev) for ev in evs]
    slots = sorted(
        data.draw(st.lists(st.integers(0, len(messages)), min_size=len(bad), max_size=len(bad)))
    )
    for shift, (slot, m) in enumerate(zip(slots, bad, strict=True)):
        messages.insert(slot + shift, m)
    d = decode(messages)
    bad_at = {r.index for r in d.rejects}
    assert len(bad_at) == len(bad)
    assert d.rows.tolist() == [i for i in range(len(messages)) if i not in bad_at]
    for row, ev in enumerate(evs):
        assert row_view(d.batch, row) == expected_view(ev)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events, min_size=1, max_size=8), st.lists(bad_messages, max_size=3), st.data())
def test_decode_rows_match_a_naive_reference_in_any_batch(
    evs: list[dict[str, Any]], bad: list[bytes], data: st.DataObject
) -> None:
    check_rows_against_reference(evs, bad, data)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    st.lists(st.one_of(events, odd_events), min_size=40, max_size=120),
    st.lists(bad_messages, max_size=12),
    st.data(),
)
def test_decode_rows_match_a_naive_reference_in_large_batches(
    evs: list[dict[str, Any]], bad: list[bytes], data: st.DataObject
) -> None:
    # past the sizes where a refused block is checked message by message: scans, splits, and
    # canonical passes grouped by type
    check_rows_against_reference(evs, bad, data)


def mutate(raw: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    for at, piece in edits:
        at %= len(raw) + 1
        raw = raw[:at] + piece + raw[at + len(piece) // 2 :]
    return raw


json_bytes = st.sampled_from(
    [b'"', b",", b":", b"{", b"}", b"[", b"]", b"NaN", b"1e999", b"\n", b" "]
)
edits = st.lists(
    st.tuples(st.integers(0, 400), st.one_of(json_bytes, st.binary(max_size=3))), max_size=3
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(st.binary(max_size=40), st.builds(mutate, events.map(enc), edits)), max_size=6
    )
)
def test_decode_never_raises_and_accounts_for_every_message_once(messages: list[bytes]) -> None:
    d = decode(messages)
    seen = d.rows.tolist() + [r.index for r in d.rejects]
    assert sorted(seen) == list(range(len(messages)))
    assert d.batch.n == len(d.rows)
    for r in d.rejects:
        assert r.reason in REJECT_REASONS and r.raw == messages[r.index]
    for i, m in enumerate(messages):
        reference = check_event(m, Limits())
        if i in d.rows:
            assert isinstance(reference, dict), (m, reference)
        else:
            assert reference == next((r.reason, r.detail) for r in d.rejects if r.index == i)


def edit_text(text: str, edits: list[tuple[int, str]]) -> str:
    for at, piece in edits:
        at %= len(text) + 1
        text = text[:at] + piece + text[at + 1 :]
    return text


ts_like = st.one_of(
    st.builds(ts_text, moments, st.booleans()),
    st.builds(
        edit_text,
        st.builds(ts_text, moments, st.booleans()),
        st.lists(st.tuples(st.integers(0, 40), st.sampled_from([*"09-:.+TtZz é", ""])), max_size=2),
    ),
    st.text(alphabet="0123456789-:.+Zz T", max_size=32),
)


TS_EDGES = [
    "2025-03-01T12:00:00.Z",  # a point without digits
    "2025-03-01T12:00:00.+01:00",
    "2025-03-01T12:00:00.1234Z",
    "2025-03-01T12:00:00.12a4Z",
    "2024-02-29T00:00:00Z",
    "2025-02-29T00:00:00Z",
    "2100-02-29T00:00:00Z",
    "2000-02-29T23:59:59.999-23:59",
    "2025-03-01T12:00:00+0100",
    "2025-03-01T12:00:00+24:00",
    "2025-03-01 12:00:00z",
    "2025-03-01T12:00:60Z",
    "2025-13-01T12:00:00Z",
    "2025-03-01T12:00:00",
    "2025-03-01T12:00:00Z ",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.none(), ts_like), max_size=12))
@example(TS_EDGES)
def test_vectorised_ts_parse_matches_the_reference_parser(texts: list[str | None]) -> None:
    padded = pa.array(["2025-03-01T12:00:00Z", *texts], pa.string())
    ms, ok = ts_text_ms(pa.chunked_array([padded.slice(1)], pa.string()))
    for text, got_ms, got_ok in zip(texts, ms.tolist(), ok.tolist(), strict=True):
        expected = None if text is None else parse_ts(text)
        assert got_ok == (expected is not None), text
        if got_ok:
            assert got_ms == expected, text


# --- the JSON Schema --------------------------------------------------------------------------

VALID = [
    event(0),
    event(1, ts=TS_MS, status=500.0, tokens_in=3, latency_ms=-1.5, ground_truth=2.5),
    event(2, input={"vector": [], "prompt": "p", "messages": [{"role": "u", "content": "c"}]}),
    event(3, output={"label": -4, "scores": {"a": -30, "b": None}, "value": 1e300, "text": "t"}),
    event(4, attributes={"a": "b", "c": None}, tenant=None, input=None, output=None),
    event(5, ts="2100-12-31T23:59:59.999999Z", schema_version=1.0, input={"features": {}}),
]
INVALID = [
    {"schema_version": 1},
    event(0, schema_version=2),
    event(0, event_id=""),
    event(0, api_key_id=None),
    event(0, ts="2025-03-01T12:00:00"),
    event(0, ts="2025-13-01T12:00:00Z"),
    event(0, ts=1),
    event(0, ts=1.5),
    event(0, status=1000),
    event(0, status="200"),
    event(0, tokens_out=-2),
    event(0, input={"features": {"a": {"b": 1}}}),
    event(0, input={"vector": [True]}),
    event(0, input={"vector": [0.0] * 4097}),
    event(0, input={"messages": [{"role": "u"}]}),
    event(0, input={"messages": [{"role": "u", "content": "c", "name": "n"}]}),
    event(0, output={"label": True}),
    event(0, output={"label": 2**53 + 1}),
    event(0, output={"label": 0.5}),
    event(0, output={"scores": {"a": "high"}}),
    event(0, ground_truth={"a": 1}),
    event(0, attributes={"a": 1}),
    event(0, extra=1),
]


@pytest.mark.parametrize("ev", VALID + INVALID)
def test_decode_agrees_with_the_json_schema(ev: dict[str, Any]) -> None:
    schema_ok = Draft202012Validator(load_schema()).is_valid(ev)
    decoder_ok = decode([enc(ev)]).batch.n == 1
    assert schema_ok == decoder_ok == (ev in VALID)


@settings(max_examples=100, deadline=None)
@given(events)
def test_generated_valid_events_pass_the_json_schema_and_the_decoder(ev: dict[str, Any]) -> None:
    Draft202012Validator(load_schema()).validate(ev)
    assert decode([enc(ev)]).batch.n == 1


def test_json_schema_is_valid_draft_2020_12() -> None:
    Draft202012Validator.check_schema(load_schema())
