"""Keyed 64-bit fingerprints of messages and event ids: SipHash-2-4, compiled, a batch at a time.

Every stored event carries the fingerprint of the exact bytes it arrived as (``events.
fingerprint``), and every dead letter the fingerprint of its message, so a reused ``event_id``
can be told from a byte-identical replay (``streams/worker/event_ids.py``) and a dead letter can be
matched with the message on the DLQ topic or in the file. The fingerprint is keyed with a key
derived from the store's HMAC key (``streams.worker.buffers.hmac_key``): without it nobody can craft
a
different message with a stored message's fingerprint, which is what would let a reused id pass
as a replay.

Why SipHash (1-3) and not HMAC-SHA256 like the text columns: this runs on every event. Measured here
(2 cores, 568-byte events), ``hmac.digest`` costs 3.1 us per message and keyed BLAKE2b 1.3-1.4
us, almost all of it the Python call per message; the spine has about 19 us per event in all.
SipHash is a keyed pseudo-random function made for exactly this (short inputs, secret key,
attacker-chosen data), and compiled over the batch joined into one buffer it costs no Python
call per message: about 0.3 us per 568-byte event with SipHash-1-3. The kernel is the standard
algorithm with its rounds as parameters, so the tests check SipHash-2-4 against ClickHouse's
``sipHash64Keyed`` and SipHash-1-3 against CPython's ``hash`` of bytes.

>>> key = fingerprint_key(b"secret")
>>> a, b = of_messages([b'{"event_id":"e1"}', b'{"event_id":"e1"} '], key)
>>> bool(a != b), hex16(np.array([a, b], np.uint64)).to_pylist()[0] == format(a, "016x")
(True, True)
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import numba
import numpy as np
import numpy.typing as npt
import pyarrow as pa

U64 = npt.NDArray[np.uint64]
Key = tuple[int, int]

_F = TypeVar("_F", bound=Callable[..., Any])
# compiled on first call and cached on disk beside the module (once per machine)
_njit = cast(Callable[[_F], _F], numba.njit(cache=True, nogil=True))

_C0 = np.uint64(0x736F6D6570736575)
_C1 = np.uint64(0x646F72616E646F6D)
_C2 = np.uint64(0x6C7967656E657261)
_C3 = np.uint64(0x7465646279746573)
_FF = np.uint64(0xFF)
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
# SipHash-1-3 (Python's own str/bytes hash, and Rust's HashMap's): half the rounds of the
# paper's SipHash-2-4 and no known attack; 0.25 us per 568-byte message here instead of 0.49
ROUNDS = (1, 3)


@_njit
def _rotl(x: Any, b: int) -> Any:
    return (x << np.uint64(b)) | (x >> np.uint64(64 - b))


@_njit
def _round(v0: Any, v1: Any, v2: Any, v3: Any) -> Any:
    v0 += v1
    v1 = _rotl(v1, 13)
    v1 ^= v0
    v0 = _rotl(v0, 32)
    v2 += v3
    v3 = _rotl(v3, 16)
    v3 ^= v2
    v0 += v3
    v3 = _rotl(v3, 21)
    v3 ^= v0
    v2 += v1
    v1 = _rotl(v1, 17)
    v1 ^= v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


@_njit
def _word(words: Any, at: int) -> Any:
    """The little-endian 64-bit word at byte ``at`` of the buffer ``words`` views: two aligned
    loads and shifts (a byte at a time costs twice as much)."""
    q, r = at >> 3, at & 7
    if r == 0:
        return words[q]
    sh = np.uint64(8 * r)
    return (words[q] >> sh) | (words[q + 1] << (np.uint64(64) - sh))


@_njit
def _last(words: Any, start: int, at: int, end: int) -> Any:
    """The final block: the bytes after the last whole word, and the length's low byte."""
    b = (np.uint64(end - start) & _FF) << np.uint64(56)
    if end > at:
        b |= _word(words, at) & ((np.uint64(1) << np.uint64(8 * (end - at))) - np.uint64(1))
    return b


@_njit
def siphash13(words: Any, offsets: Any, k0: Any, k1: Any, out: Any) -> None:
    """``out[i]`` = SipHash-1-3 with key (k0, k1) of bytes ``offsets[i]:offsets[i + 1]`` of the
    buffer ``words`` views (padded with 8 bytes past the last message)."""
    for i in range(out.size):
        start, end = offsets[i], offsets[i + 1]
        v0, v1, v2, v3 = k0 ^ _C0, k1 ^ _C1, k0 ^ _C2, k1 ^ _C3
        at = start
        while at + 8 <= end:
            m = _word(words, at)
            v3 ^= m
            v0, v1, v2, v3 = _round(v0, v1, v2, v3)
            v0 ^= m
            at += 8
        b = _last(words, start, at, end)
        v3 ^= b
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
        v0 ^= b
        v2 ^= _FF
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
        out[i] = v0 ^ v1 ^ v2 ^ v3


@_njit
def siphash24(words: Any, offsets: Any, k0: Any, k1: Any, out: Any) -> None:
    """``out[i]`` = SipHash-2-4 (the paper's; ClickHouse's ``sipHash64Keyed``) of the same."""
    for i in range(out.size):
        start, end = offsets[i], offsets[i + 1]
        v0, v1, v2, v3 = k0 ^ _C0, k1 ^ _C1, k0 ^ _C2, k1 ^ _C3
        at = start
        while at + 8 <= end:
            m = _word(words, at)
            v3 ^= m
            v0, v1, v2, v3 = _round(v0, v1, v2, v3)
            v0, v1, v2, v3 = _round(v0, v1, v2, v3)
            v0 ^= m
            at += 8
        b = _last(words, start, at, end)
        v3 ^= b
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
        v0 ^= b
        v2 ^= _FF
        for _ in range(4):
            v0, v1, v2, v3 = _round(v0, v1, v2, v3)
        out[i] = v0 ^ v1 ^ v2 ^ v3


def derive_key(secret: bytes, purpose: bytes) -> Key:
    """A SipHash key (two 64-bit halves) for one ``purpose``, from the store's HMAC key."""
    digest = hmac.digest(secret, b"inferwatch siphash v1 " + purpose, hashlib.sha256)
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:16], "little")


def fingerprint_key(secret: bytes) -> Key:
    """The key of message fingerprints (``events.fingerprint``, ``dead_letters.fingerprint``)."""
    return derive_key(secret, b"message fingerprint")


def _words(buffer: bytes | memoryview) -> npt.NDArray[np.uint64]:
    """``buffer`` (already followed by 8 to 15 zero bytes, its length a multiple of 8) as
    64-bit words, without a copy."""
    return np.frombuffer(buffer, np.uint64)


def _padding(n: int) -> bytes:
    """Zeros that make ``n`` bytes a whole number of words with a spare word after them."""
    return bytes(16 - n % 8)


def _hash(
    words: npt.NDArray[np.uint64], offsets: npt.NDArray[np.int64], key: Key, rounds: tuple[int, int]
) -> U64:
    out = np.empty(len(offsets) - 1, np.uint64)
    if out.size:
        kernel = {(1, 3): siphash13, (2, 4): siphash24}[rounds]
        kernel(words, offsets, np.uint64(key[0]), np.uint64(key[1]), out)
    return out


def of_messages(messages: Sequence[bytes], key: Key, rounds: tuple[int, int] = ROUNDS) -> U64:
    """The fingerprint of each message's exact bytes."""
    offsets = np.zeros(len(messages) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, messages), np.int64, len(messages)), out=offsets[1:])
    joined = b"".join([*messages, _padding(int(offsets[-1]))])
    return _hash(_words(joined), offsets, key, rounds)


def of_strings(strings: pa.Array, key: Key, rounds: tuple[int, int] = ROUNDS) -> U64:
    """The keyed hash of each string's UTF-8 bytes, read from the Arrow buffers (no Python
    string per value). Nulls hash as empty strings."""
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    if len(strings) == 0:
        return np.zeros(0, np.uint64)
    if not pa.types.is_large_binary(strings.type):
        strings = strings.cast(pa.large_binary())
    _, offs, data = strings.buffers()
    offsets = np.frombuffer(offs, np.int64, len(strings) + 1, strings.offset * 8)
    base = int(offsets[0])
    used = b"" if data is None else memoryview(data)[base : int(offsets[-1])]
    return _hash(_words(bytes(used) + _padding(len(used))), offsets - base, key, rounds)


def hex16(values: U64) -> pa.Array:
    """Each value as 16 lower-case hex digits (big-endian, as ClickHouse's ``hex`` prints it),
    built without a Python string per value."""
    n = len(values)
    nibbles = values.astype(">u8").view(np.uint8).reshape(n, 8)
    text = np.empty((n, 16), np.uint8)
    text[:, 0::2] = _HEX[nibbles >> 4]
    text[:, 1::2] = _HEX[nibbles & 15]
    offsets = np.arange(0, 16 * n + 1, 16, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text.tobytes()))


def hex_of(value: int) -> str:
    return format(int(value), "016x")
