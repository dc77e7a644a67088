"""Timestamps of wire schema v1: RFC 3339 date-times to epoch milliseconds, and back
(:func:`format_ms`, the one format of every time that leaves the process).

:func:`parse_ts` reads one string, for the reference check; :func:`ts_text_ms` reads the bytes of a
whole pyarrow string column at once, for the fast decoder. Both implement :data:`TS_PATTERN`.

>>> parse_ts("2025-01-01T02:00:00.5+02:00")
1735689600500
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba
import numpy as np
import numpy.typing as npt
import pyarrow as pa

from schemas.batch import I64

Bool = npt.NDArray[np.bool_]
_F = TypeVar("_F", bound=Callable[..., Any])
# compiled on first call and cached on disk beside the module (once per machine)
_njit = cast(Callable[[_F], _F], numba.njit(cache=True, nogil=True))

# 2000-01-01T00:00:00Z <= ts < 2101-01-01T00:00:00Z
TS_MIN_MS = 946_684_800_000
TS_END_MS = 4_133_980_800_000
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# RFC 3339 date-time, the grammar ts_text_ms implements on the bytes of a whole column.
TS_PATTERN = (
    r"^(?P<y>[0-9]{4})-(?P<mo>[0-9]{2})-(?P<d>[0-9]{2})[Tt ]"
    r"(?P<h>[0-9]{2}):(?P<mi>[0-9]{2}):(?P<s>[0-9]{2})(?P<f>\.[0-9]+)?"
    r"(?P<tz>[Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
_TS_RE = re.compile(TS_PATTERN)


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _days_in_month(y: int, m: int) -> int:
    if m == 2:
        return 29 if (y % 4 == 0 and y % 100 != 0) or y % 400 == 0 else 28
    return 30 if m in (4, 6, 9, 11) else 31


def parse_ts(text: str) -> int | None:
    """Epoch milliseconds of an RFC 3339 date-time (fraction truncated), None if invalid."""
    m = _TS_RE.fullmatch(text)
    if m is None:
        return None
    y, mo, d = int(m["y"]), int(m["mo"]), int(m["d"])
    h, mi, s = int(m["h"]), int(m["mi"]), int(m["s"])
    tz = m["tz"]
    off_h, off_m = (0, 0) if tz in ("Z", "z") else (int(tz[1:3]), int(tz[4:6]))
    if not (1 <= mo <= 12 and 1 <= d <= _days_in_month(y, mo) and h < 24 and mi < 60 and s < 60):
        return None
    if off_h > 23 or off_m > 59:
        return None
    frac_ms = int(((m["f"] or ".")[1:4]).ljust(3, "0"))
    offset_min = (off_h * 60 + off_m) * (-1 if tz[0] == "-" else 1)
    secs = _days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s - offset_min * 60
    return secs * 1000 + frac_ms


@_njit
def _digit(data: Any, at: int) -> int:
    """The value of the digit at ``at``, or -1."""
    c = data[at] - 48
    return c if 0 <= c <= 9 else -1


@_njit
def _two(data: Any, at: int) -> int:
    """The value of two digits at ``at``, or -1."""
    a, b = _digit(data, at), _digit(data, at + 1)
    return a * 10 + b if a >= 0 and b >= 0 else -1


@_njit
def _ts_ms(data: Any, offsets: Any, valid: Any, ms: Any, ok: Any) -> None:
    """:func:`parse_ts` of every string of a column, from its bytes and offsets."""
    for i in range(valid.size):
        start, length = offsets[i], offsets[i + 1] - offsets[i]
        if not valid[i] or length < 20:
            continue
        end = start + length
        ya, yb = _two(data, start), _two(data, start + 2)
        mo, d = _two(data, start + 5), _two(data, start + 8)
        h, mi, s = _two(data, start + 11), _two(data, start + 14), _two(data, start + 17)
        sep = data[start + 10]
        if min(ya, yb, mo, d, h, mi, s) < 0 or not (sep == 84 or sep == 116 or sep == 32):
            continue  # "T", "t" or " " between date and time
        if data[start + 4] != 45 or data[start + 7] != 45:  # "-"
            continue
        if data[start + 13] != 58 or data[start + 16] != 58:  # ":"
            continue
        last, off_min = data[end - 1], 0
        if last == 90 or last == 122:  # "Z" or "z"
            frac_end = end - 1
        else:
            sign = data[end - 6]
            off_h, off_m = _two(data, end - 5), _two(data, end - 2)
            if length < 25 or not (sign == 43 or sign == 45) or data[end - 3] != 58:
                continue
            if off_h < 0 or off_m < 0 or off_h > 23 or off_m > 59:
                continue
            off_min = (off_h * 60 + off_m) * (-1 if sign == 45 else 1)
            frac_end = end - 6
        frac_ms, at = 0, start + 19
        if frac_end > at:  # "." and at least one digit
            if data[at] != 46 or frac_end - at < 2:
                continue
            good = True
            for k in range(at + 1, frac_end):
                digit = _digit(data, k)
                if digit < 0:
                    good = False
                    break
                if k - at <= 3:
                    frac_ms += digit * (100, 10, 1)[k - at - 1]
            if not good:
                continue
        y = ya * 100 + yb
        if mo < 1 or mo > 12 or h > 23 or mi > 59 or s > 59:
            continue
        leap = (y % 4 == 0 and y % 100 != 0) or y % 400 == 0
        if d < 1 or d > _DAYS_IN_MONTH[mo - 1] + (1 if leap and mo == 2 else 0):
            continue
        yy = y - (1 if mo <= 2 else 0)
        era = yy // 400
        yoe = yy - era * 400
        doy = (153 * (mo + (-3 if mo > 2 else 9)) + 2) // 5 + d - 1
        days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
        secs = days * 86400 + h * 3600 + mi * 60 + s - off_min * 60
        ms[i] = secs * 1000 + frac_ms
        ok[i] = True


_DAYS_IN_MONTH = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])


def ts_text_ms(ts: pa.ChunkedArray) -> tuple[I64, Bool]:
    """Epoch ms of RFC 3339 strings (fraction truncated) and whether each one is valid: the
    grammar of :data:`TS_PATTERN`, on the bytes of the whole column in one compiled loop."""
    arr = ts.combine_chunks() if isinstance(ts, pa.ChunkedArray) else ts
    n = len(arr)
    ms, ok = np.zeros(n, np.int64), np.zeros(n, np.bool_)
    if n == 0 or arr.null_count == n:
        return ms, ok
    _, offsets, values = arr.buffers()
    ends = np.frombuffer(offsets, np.int32, n + 1, arr.offset * 4)
    data = np.frombuffer(values, np.uint8, int(ends[-1])) if ends[-1] else np.zeros(0, np.uint8)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    _ts_ms(data, ends, valid, ms, ok)
    return ms, ok


def format_ms(value: int | dt.datetime) -> str:
    """The one format of a time leaving the process (webhook bodies, JSON lines, CSV): RFC 3339,
    UTC, ``Z``, milliseconds. ``value`` is epoch milliseconds, or a datetime (naive ones are UTC,
    as the store's columns are).

    >>> format_ms(1796679000123), format_ms(dt.datetime(2026, 12, 7, 21, 30, 0, 123456))
    ('2026-12-07T21:30:00.123Z', '2026-12-07T21:30:00.123Z')
    """
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        delta = aware - EPOCH
        value = (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
    seconds, ms = divmod(int(value), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"
