"""Timestamps of wire schema v1: RFC 3339 date-times to epoch milliseconds.

:func:`parse_ts` reads one string, for the reference check; :func:`ts_text_ms` reads the bytes of a
whole pyarrow string column at once, for the fast decoder. Both implement :data:`TS_PATTERN`.

>>> parse_ts("2025-01-01T02:00:00.5+02:00")
1735689600500
"""

from __future__ import annotations

import re

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from schemas.batch import I64

Bool = npt.NDArray[np.bool_]

# 2000-01-01T00:00:00Z <= ts < 2101-01-01T00:00:00Z
TS_MIN_MS = 946_684_800_000
TS_END_MS = 4_133_980_800_000
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


def _days_from_civil_array(y: I64, m: I64, d: I64) -> I64:
    """:func:`_days_from_civil` of whole columns."""
    y = y - (m <= 2)
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + np.where(m > 2, -3, 9)) + 2) // 5 + d - 1
    out: I64 = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
    return out


_DAYS_IN_MONTH = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])


def ts_text_ms(ts: pa.ChunkedArray) -> tuple[I64, Bool]:
    """Epoch ms of RFC 3339 strings (fraction truncated) and whether each one is valid: the
    grammar of :data:`TS_PATTERN`, on the bytes of the whole column."""
    arr = ts.combine_chunks() if isinstance(ts, pa.ChunkedArray) else ts
    n = len(arr)
    ok: Bool = arr.is_valid().to_numpy(zero_copy_only=False)  # is_valid() has no nulls
    if n == 0 or not ok.any():
        return np.zeros(n, np.int64), ok
    _, offsets, values = arr.buffers()
    ends = np.frombuffer(offsets, np.int32, n + 1, arr.offset * 4).astype(np.int64)
    start, length = ends[:-1], np.diff(ends)
    # padded so that fixed positions of short or null strings index something
    data = np.zeros(int(ends[-1]) + 32, np.int64)
    if ends[-1]:
        data[: ends[-1]] = np.frombuffer(values, np.uint8, int(ends[-1]))
    head = data[start[:, None] + np.arange(19)] - ord("0")  # "YYYY-MM-DDTHH:MM:SS"
    ok &= length >= 20
    ok &= ((head[:, _HEAD_DIGITS] >= 0) & (head[:, _HEAD_DIGITS] <= 9)).all(axis=1)
    ok &= (head[:, _HEAD_PUNCT] == _HEAD_PUNCT_CHARS).all(axis=1)
    ok &= np.isin(head[:, 10] + ord("0"), (ord("T"), ord("t"), ord(" ")))
    last = data[start + length - 1]
    zulu = (last == ord("Z")) | (last == ord("z"))
    tz = data[np.maximum(start + length - 6, 0)[:, None] + np.arange(6)] - ord("0")
    tz_digits = ((tz[:, [1, 2, 4, 5]] >= 0) & (tz[:, [1, 2, 4, 5]] <= 9)).all(axis=1)
    signed = np.isin(tz[:, 0] + ord("0"), (ord("+"), ord("-"))) & (tz[:, 3] == ord(":") - 48)
    ok &= zulu | (tz_digits & signed & (length >= 25))
    # between the seconds and the offset: nothing, or "." and at least one digit
    frac_at, frac_end = start + 19, start + length - np.where(zulu, 1, 6)
    non_digit = np.concatenate(([0], np.cumsum((data < ord("0")) | (data > ord("9")))))
    digits = frac_end - frac_at - 1
    has_frac = frac_end > frac_at
    frac_ok = (data[frac_at] == ord(".")) & (digits >= 1)
    frac_ok &= non_digit[np.maximum(frac_end, frac_at + 1)] == non_digit[frac_at + 1]
    ok &= ~has_frac | frac_ok
    frac_ms = np.zeros(n, np.int64)
    for k, scale in ((1, 100), (2, 10), (3, 1)):
        frac_ms += np.where(has_frac & (digits >= k), data[frac_at + k] - ord("0"), 0) * scale
    y = head[:, 0] * 1000 + head[:, 1] * 100 + head[:, 2] * 10 + head[:, 3]
    mo, d = head[:, 5] * 10 + head[:, 6], head[:, 8] * 10 + head[:, 9]
    h, mi, s = (
        head[:, 11] * 10 + head[:, 12],
        head[:, 14] * 10 + head[:, 15],
        head[:, 17] * 10 + head[:, 18],
    )
    off_h = np.where(zulu, 0, tz[:, 1] * 10 + tz[:, 2])
    off_m = np.where(zulu, 0, tz[:, 4] * 10 + tz[:, 5])
    sign = np.where(tz[:, 0] == ord("-") - 48, -1, 1)
    month = np.clip(mo, 1, 12)
    leap = (y % 4 == 0) & ((y % 100 != 0) | (y % 400 == 0)) & (month == 2)
    ok &= (mo >= 1) & (mo <= 12) & (d >= 1) & (d <= _DAYS_IN_MONTH[month - 1] + leap)
    ok &= (h < 24) & (mi < 60) & (s < 60) & (off_h < 24) & (off_m < 60)
    secs = _days_from_civil_array(y, month, d) * 86400 + h * 3600 + mi * 60 + s
    secs -= sign * (off_h * 60 + off_m) * 60
    return np.where(ok, secs * 1000 + frac_ms, 0), ok


_HEAD_DIGITS = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18]
_HEAD_PUNCT = [4, 7, 13, 16]
_HEAD_PUNCT_CHARS = np.array([ord(c) - ord("0") for c in "--::"])
