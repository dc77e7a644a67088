"""A seeded mutation fuzzer for wire schema v1 messages, shared by tests/streams/worker/test_fuzz.py
and
load-tests/fuzz.py.

:class:`Fuzzer` makes valid events of several model kinds (probabilities, logits, regression,
label-only, chat) with odd but legal values mixed in, and derives hostile messages from them:
byte flips, truncation, duplicated keys at any depth, deep nesting, huge numbers, invalid UTF-8,
control characters, enormous arrays, NaN literals, lone surrogates, wrong types, missing fields
and splices. Every message carries the name of what made it and, where that is known by
construction, whether it is valid (``None`` when only a full check can tell). The same seed gives
the same messages, so a failure replays from the seed printed beside it.

>>> a = [m for m, _, _ in Fuzzer(3).messages(5)]
>>> a == [m for m, _, _ in Fuzzer(3).messages(5)] and len(a) == 5
True
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

BASE_TS_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MODELS = ("fraud", "risk", "ranker", "price", "tagger", "chat")
Message = tuple[bytes, str, bool | None]  # raw bytes, what made it, valid by construction

HUGE_NUMBERS = (
    "1e309", "-1e309", "1" + "0" * 400, "-" + "9" * 330 + ".5", "1e-400", "-0", "-0.0", "1E+2",
    "9223372036854775807", "9223372036854775808", "-9223372036854775809", "18446744073709551616",
    "9007199254740993", "1.7976931348623157e308", "4.9e-324", "0.1e1", "12345678901234567890e-10",
)  # fmt: skip
BAD_UTF8 = (b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\xf4\x90\x80\x80", b"\x80")
INTERESTING = b'\x00\x01\x1f"\\{}[],:-.0eE\n\r\t\x7f\xff'
_RAW = re.compile(rb'"@@RAW(\d+)@@"')
_DUP = "@@DUP@@"


class Fuzzer:
    """Messages from one seed; ``valid`` and ``mutated`` each give one message."""

    def __init__(self, seed: int, big_odds: float = 0.03) -> None:
        self.rng = random.Random(seed)
        self.big_odds = big_odds  # how often a size is one of the expensive ones
        self.count = 0
        self.recent: list[bytes] = []

    # --- valid events ---------------------------------------------------------------------

    def ts(self) -> Any:
        r, ms = self.rng, BASE_TS_MS + self.count * 40 + self.rng.randrange(-5_000, 500)
        kind = r.random()
        if kind < 0.3:
            return ms
        moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
        if kind < 0.8:
            return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
        offset = timedelta(minutes=r.randrange(-23 * 60 - 59, 23 * 60 + 60))
        local = moment.astimezone(UTC).replace(tzinfo=None) + offset
        sign, off = ("-", -offset) if offset < timedelta(0) else ("+", offset)
        hh, mm = divmod(int(off.total_seconds()) // 60, 60)
        frac = r.choice(["", ".5", f".{ms % 1000:03d}", ".123456789"])
        sep, zone = r.choice("Tt "), f"{sign}{hh:02d}:{mm:02d}"
        return local.strftime(f"%Y-%m-%d{sep}%H:%M:%S") + frac + zone

    def valid(self) -> dict[str, Any]:
        """One valid event; about one in eight has odd but legal values."""
        r = self.rng
        self.count += 1
        model = r.choice(MODELS)
        key = f"k{min(int(r.paretovariate(1.2)), 400)}"
        ev: dict[str, Any] = {
            "schema_version": 1,
            "event_id": f"e{self.count}-{r.getrandbits(32):08x}",
            "ts": self.ts(),
            "model_id": model,
            "api_key_id": key,
        }
        if r.random() < 0.7:
            ev["client_ip"] = f"10.0.{r.randrange(4)}.{r.randrange(256)}"
        if r.random() < 0.3:
            ev["model_version"] = r.choice(["1", "2"])
        if r.random() < 0.5:
            ev["latency_ms"] = round(r.lognormvariate(3, 1), 3)
        if r.random() < 0.2:
            ev["status"] = r.choice([200, 200, 429, 500])
        ev["input"] = {"features": {"amount": round(r.expovariate(0.01), 2), "n": r.randrange(9)}}
        ev["input"]["features"]["country"] = r.choice(["FR", "DE", "US", None])
        ev["output"] = self.output(model)
        if r.random() < 0.125:
            self.oddify(ev)
        return ev

    def output(self, model: str) -> dict[str, Any]:
        r = self.rng
        if model == "fraud":
            p = r.betavariate(1, 6)
            return {"label": "fraud" if p > 0.5 else "ok", "scores": {"fraud": p, "ok": 1 - p}}
        if model == "risk":
            w = [r.random() for _ in range(3)]
            scores = {c: x / sum(w) for c, x in zip(("low", "mid", "high"), w, strict=True)}
            return {"label": max(scores, key=scores.__getitem__), "scores": scores}
        if model == "ranker":
            return {"scores": {"a": r.gauss(0, 3), "b": r.gauss(1, 3)}}
        if model == "price":
            return {"value": r.gauss(100, 20)}
        if model == "tagger":
            return {"label": r.choice(["x", "y", "z", 3])}
        text = "".join(r.choice('abc é\n"\\') for _ in range(r.randrange(30)))
        return {"text": text, "finish_reason": "stop"}

    def oddify(self, ev: dict[str, Any]) -> None:
        """Legal values a careless reader gets wrong."""
        r, inp, out = self.rng, ev["input"], ev["output"]
        odd: list[Callable[[], None]] = [
            lambda: ev.update(status=200.0, schema_version=1.0, tokens_in=2**63 - 1),
            lambda: ev.update(ts=float(BASE_TS_MS + self.count * 40)),
            lambda: ev.update(ts=r.choice(["2000-01-01T00:00:00Z", "2000-01-01T00:00:00.001Z"])),
            lambda: ev.update(latency_ms=r.choice([1e308, -1e308, 5e-324, -0.0, 0])),
            lambda: ev.update(tenant="", user_agent="\u0000\u001f\u2028", session_id="s"),
            lambda: ev.update(ground_truth=r.choice([0, -1.5, "é", 2**60])),
            lambda: ev.update(attributes={"": "", "k\u00e9": 'v\n"', "n": None}),
            lambda: inp.update(vector=[r.choice([1e308, -1e308, 0.0, 5e-324])] * r.randrange(40)),
            lambda: inp.update(vector=[0.5] * 4096),
            lambda: inp["features"].update({"": 1e308, "a.b": True, "\u00e9\U0001f600": "x"}),
            lambda: inp["features"].update({f"f{i}": i for i in range(r.randrange(100))}),
            lambda: inp.update(prompt="", messages=[{"role": "user", "content": "\U0001f600"}]),
            lambda: inp.update(messages=[{"role": "", "content": ""}] * r.randrange(50)),
            lambda: out.update(label=r.choice([2**53, -(2**53), 0, "", "\u0000"])),
            lambda: out.update(scores={f"c{i}": r.random() for i in range(r.randrange(1, 100))}),
            lambda: out.update(scores={"a": 1e308, "b": -1e308, "c": None}),
            lambda: out.update(scores={}, value=r.choice([1e308, -1e308, 5e-324])),
            lambda: ev.update(model_id="m\u00e9\U0001f600" * r.randrange(1, 50), input=None),
            lambda: ev.update(api_key_id="k" * 5000, client_ip="", output=None),
        ]
        r.choice(odd)()

    # --- encodings and structural mutations ---------------------------------------------------

    def encode(self, ev: Any, raw: dict[str, bytes] | None = None) -> bytes:
        """JSON of ``ev`` in one of several spellings; ``"@@RAWi@@"`` strings become raw[i]."""
        r = self.rng
        seps = r.choice([(",", ":"), (", ", ": "), (",", ": ")])
        text = json.dumps(ev, ensure_ascii=r.random() < 0.5, separators=seps, allow_nan=False)
        if r.random() < 0.05:
            text = json.dumps(ev, indent=r.choice([0, 2]), ensure_ascii=False)
        data = text.encode("utf-8", "surrogatepass")
        if raw:
            data = _RAW.sub(lambda m: raw[m.group(1).decode()], data)
        return data

    def objects(self, ev: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Paths of every object and array in ``ev`` (the root included)."""
        out = [path] if isinstance(ev, dict | list) else []
        items = (
            ev.items() if isinstance(ev, dict) else enumerate(ev) if isinstance(ev, list) else ()
        )
        for k, v in items:
            out.extend(self.objects(v, (*path, k)))
        return out

    def place(self, ev: dict[str, Any], value: Any, containers: bool = True) -> None:
        """Put ``value`` somewhere in ``ev``: at a new or existing key of a random object, or
        into a random array."""
        r = self.rng
        paths = self.objects(ev) if containers else [()]
        node: Any = ev
        for step in r.choice(paths):
            node = node[step]
        if isinstance(node, list):
            node.insert(r.randrange(len(node) + 1), value)
        elif node and r.random() < 0.6:
            node[r.choice(list(node))] = value
        else:
            node[r.choice(["x", "amount", "status", "ts", "label", "vector", ""])] = value

    def structural(self, ev: dict[str, Any]) -> tuple[bytes, str, bool | None]:
        r = self.rng
        raw: dict[str, bytes] = {}

        def token(text: bytes) -> str:
            raw[str(len(raw))] = text
            return f"@@RAW{len(raw) - 1}@@"

        kind = r.choices(STRUCTURAL, [w for _, w in STRUCTURAL_WEIGHTS])[0]
        if kind == "duplicate_key":
            paths = [p for p in self.objects(ev) if isinstance(self.at(ev, p), dict)]
            node = self.at(ev, r.choice(paths))
            if not node:
                node["x"] = 1
            name = r.choice(list(node))
            spelled = json.dumps(name) if r.random() < 0.7 else _escaped(name)
            items = list(node.items())
            items.insert(r.randrange(len(items) + 1), (_DUP, token(self.encode(r.choice(VALUES)))))
            node.clear()
            node.update(items)
            return (
                self.encode(ev, raw).replace(b'"' + _DUP.encode() + b'"', spelled.encode()),
                kind,
                False,
            )
        if kind == "deep_nesting":
            depth = self.rare([2, 30, 500, 999, 1001, 3000], [20_000, 100_000])
            opener, closer = r.choice([(b"[", b"]"), (b'{"a":', b"}"), (b'{"a":[', b"]}")])
            inner = b"1" if opener != b"[" else b""
            self.place(ev, token(opener * depth + inner + closer * depth))
            return self.encode(ev, raw), f"{kind}:{depth}", None
        if kind == "huge_number":
            self.place(ev, token(r.choice(HUGE_NUMBERS).encode()))
            return self.encode(ev, raw), kind, None
        if kind == "non_finite":
            self.place(ev, token(r.choice([b"NaN", b"Infinity", b"-Infinity"])))
            return self.encode(ev, raw), kind, False
        if kind == "enormous_array":
            size = self.rare([3, 100, 4096, 4097], [20_000, 150_000, 400_000])
            item = r.choice([b"0.5", b"1", b"null", b'"x"', b"[]", b"{}"])
            target = r.random()
            if target < 0.5:
                _child(ev, "input")["vector"] = token(b"[" + b",".join([item] * size) + b"]")
            else:
                self.place(ev, token(b"[" + b",".join([item] * size) + b"]"))
            return self.encode(ev, raw), f"{kind}:{size}", None
        if kind == "many_keys":
            size = self.rare([5, 50], [1000, 3000, 30_000])
            body = b",".join(b'"k%d":%d' % (i, i) for i in range(size))
            where = r.choice([("input", "features"), ("output", "scores"), ("attributes",)])
            node = _child(ev, where[0]) if len(where) > 1 else ev
            node[where[-1]] = token(b"{" + body + b"}")
            return self.encode(ev, raw), f"{kind}:{size}", None
        if kind == "long_text":
            size = self.rare([1000, 5000], [256 << 10, (256 << 10) + 1, 600_000, 1 << 20])
            text = ("é" * (size // 2) + "x" * (size % 2)) if r.random() < 0.5 else "x" * size
            field = r.choice(["prompt", "text", "event_id", "user_agent"])
            if field == "prompt":
                _child(ev, "input")["prompt"] = text
            elif field == "text":
                _child(ev, "output")["text"] = text
            else:
                ev[field] = text
            return self.encode(ev), f"{kind}:{field}", None
        if kind == "lone_surrogate":
            self.place(ev, token(r.choice([b'"\\ud800"', b'"a\\udfffb"', b'"\\ud83d"'])))
            return self.encode(ev, raw), kind, None
        if kind == "wrong_type":
            self.place(ev, r.choice(VALUES))
            return self.encode(ev, raw), kind, None
        if kind == "missing_field":
            del ev[r.choice(["schema_version", "event_id", "ts", "model_id", "api_key_id"])]
            return self.encode(ev), kind, False
        ev[r.choice(["unknown", "schema_version"])] = r.choice([2, "1", 1.5, True, None])
        return self.encode(ev), "unknown_field_or_version", None

    def rare(self, common: list[int], big: list[int]) -> int:
        """A size: one of ``big`` (they cost up to seconds each) in ``big_odds`` of draws."""
        r = self.rng
        return r.choice(big) if r.random() < self.big_odds else r.choice(common)

    @staticmethod
    def at(ev: Any, path: tuple[Any, ...]) -> Any:
        for step in path:
            ev = ev[step]
        return ev

    # --- byte mutations -----------------------------------------------------------------------

    def bytewise(self, data: bytes) -> tuple[bytes, str, bool | None]:
        r = self.rng
        b = bytearray(data)
        kind = r.choice(BYTEWISE)
        if kind == "byte_flip":
            for _ in range(r.randrange(1, 5)):
                i = r.randrange(len(b))
                b[i] ^= 1 << r.randrange(8)
            return bytes(b), kind, None
        if kind == "byte_set":
            for _ in range(r.randrange(1, 4)):
                b[r.randrange(len(b))] = r.choice(INTERESTING)
            return bytes(b), kind, None
        if kind == "truncate":
            return bytes(b[: r.randrange(len(b))]), kind, False
        if kind == "insert":
            i = r.randrange(len(b) + 1)
            piece = r.choice([r.randbytes(r.randrange(1, 9)), bytes([r.choice(INTERESTING)])])
            return bytes(b[:i] + piece + b[i:]), kind, None
        if kind == "invalid_utf8":
            quotes = [m.end() for m in re.finditer(rb'"', data)] or [len(b)]
            i = r.choice(quotes)
            return bytes(b[:i] + r.choice(BAD_UTF8) + b[i:]), kind, False
        if kind == "control_char":
            quotes = [m.end() for m in re.finditer(rb'"[a-z]', data)] or [len(b)]
            i = r.choice(quotes)
            c = bytes([r.choice([*range(0, 32), 127])])
            return bytes(b[:i] + c + b[i:]), kind, None if c == b"\x7f" else False
        if kind == "whitespace":
            spots = _between_tokens(data) or [0]
            for i in sorted(r.sample(spots, min(3, len(spots))), reverse=True):
                b[i:i] = r.choice([b" ", b"\t", b"\r\n", b"\n", b"  \n\t"])
            return bytes(b), kind, True
        if kind == "around":
            pre = r.choice([b"", b" ", b"\xef\xbb\xbf", b"\n", b"\x00", b"x"])
            post = r.choice([b"", b" ", b"\t", b"}", b"x", b"\x00", b" {}", data])
            valid = not pre.strip() and not post.strip() if pre or post else True
            return pre + data + post, kind, valid
        # splice: the head of this message, the tail of a recent one
        other = r.choice(self.recent) if self.recent else data
        cut = r.randrange(len(data) + 1)
        return data[:cut] + other[r.randrange(len(other) + 1) :], kind, None

    # --- streams --------------------------------------------------------------------------

    def message(self) -> Message:
        r = self.rng
        ev = self.valid()
        roll = r.random()
        if roll < 0.35:
            out: Message = (self.encode(ev), "valid", True)
        elif roll < 0.4:
            out = r.choice([b"", b" ", b"{}", b"null", b"[]", b'"x"', b"1", b"\n"]), "tiny", False
        elif roll < 0.7:
            out = self.bytewise(self.encode(ev))
        else:
            out = self.structural(ev)
        if len(out[0]) > 4096:
            pass  # splices of megabyte messages would make every tenth message huge
        elif len(self.recent) < 64:
            self.recent.append(out[0])
        else:
            self.recent[r.randrange(64)] = out[0]
        return out

    def messages(self, n: int) -> Iterator[Message]:
        for _ in range(n):
            yield self.message()


def _child(ev: dict[str, Any], name: str) -> dict[str, Any]:
    if not isinstance(ev.get(name), dict):
        ev[name] = {}
    child: dict[str, Any] = ev[name]
    return child


def _escaped(name: str) -> str:
    """``name`` as a JSON string whose first character is a \\u escape (same key when parsed)."""
    if not name or ord(name[0]) >= 0x10000:
        return json.dumps(name)
    return f'"\\u{ord(name[0]):04x}' + json.dumps(name[1:], ensure_ascii=False)[1:]


def _between_tokens(data: bytes) -> list[int]:
    """Positions outside strings after , : [ { and before } ], where JSON allows whitespace."""
    out, in_string, escaped = [], False, False
    for i, c in enumerate(data):
        if in_string:
            escaped, in_string = (not escaped and c == 92), in_string and (escaped or c != 34)
        elif c == 34:
            in_string = True
        elif c in b",:[{":
            out.append(i + 1)
        elif c in b"}]":
            out.append(i)
    return out


VALUES = (None, True, 0, -1, 1.5, "", "x", "200", [], [1, "a"], {}, {"a": None}, 2**64)
STRUCTURAL_WEIGHTS = (
    ("duplicate_key", 3), ("deep_nesting", 1), ("huge_number", 3), ("non_finite", 1),
    ("enormous_array", 1), ("many_keys", 1), ("long_text", 1), ("lone_surrogate", 1),
    ("wrong_type", 3), ("missing_field", 1), ("unknown_field_or_version", 1),
)  # fmt: skip
STRUCTURAL = tuple(k for k, _ in STRUCTURAL_WEIGHTS)
BYTEWISE = (
    "byte_flip", "byte_flip", "byte_set", "truncate", "insert", "invalid_utf8", "control_char",
    "whitespace", "around", "splice",
)  # fmt: skip
