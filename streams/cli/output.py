"""What the CLI prints of stored values: one place, so a hostile value is shown the same
harmless way by every command.

Values in the store came from events (api keys, client IPs, model ids, event ids) or from
analysts, and anyone who can send an event chooses them. So every value is shown as literal
text in every format:

- ``text(value)``: one value as one line of printable text. Characters that are not printable
  (control characters such as ESC, CR and LF, C1 controls, bidirectional overrides,
  zero-width and other format characters, unusual spaces) are written as escapes like Python's
  (``\\x1b``, ``\\r``, ``\\n``, ``\\u202e``), and a backslash as ``\\\\``, so an escape is never
  ambiguous. Rich markup (``[bold]``, ``[link=...]``) is never interpreted: tables are built
  from ``rich.text.Text``, not from markup strings. Datetimes print as ``YYYY-MM-DD
  HH:MM:SS`` in a table (RFC 3339 UTC with milliseconds in JSON lines and CSV); lists and objects as
  JSON (kept valid JSON); None as an empty string.
- ``csv_cell(value)``: ``text``, and a text cell that starts with ``=``, ``+``, ``-``, ``@``,
  a tab or a CR (a spreadsheet formula) gets a leading ``'``; numbers, and text that is a plain
  number such as ``-2.5``, stay numbers.
- ``emit(rows, fmt, columns)``: rows to stdout as a table (``columns``, in that order), JSON
  lines (every key, sorted; strings escaped by JSON, which is already literal, and the
  characters JSON leaves raw escaped as ``\\uXXXX``, so a line stays valid JSON) or CSV (every
  key of the first row, cells through ``csv_cell``).

>>> text("key\\x1b[2J\\r\\n[/bold]")
'key\\\\x1b[2J\\\\r\\\\n[/bold]'
>>> [csv_cell(v) for v in ("=1+1", "-2+3", "-2.5", -2.5, "\\tx", "ok")]
["'=1+1", "'-2+3", '-2.5', -2.5, "'\\\\tx", 'ok']
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import sys
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import orjson

from schemas.timestamps import format_ms

# a text cell a spreadsheet would run as a formula (OWASP's list)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


class Format(StrEnum):
    table = "table"
    jsonl = "jsonl"
    csv = "csv"


def text(value: Any) -> str:
    """``value`` as one line of literal, printable text (see the module docstring).

    >>> text(None), text(3), text(dt.datetime(2026, 1, 2, 3, 4, 5)), text({"a": "\\u202e"})
    ('', '3', '2026-01-02 03:04:05', '{"a":"\\\\u202e"}')
    """
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, dict | list | tuple):
        return json_text(orjson.dumps(value, default=str).decode())
    s = str(value)
    if s.isprintable() and "\\" not in s:
        return s
    return "".join(_escape(c) for c in s)


def _escape(c: str) -> str:
    if c in _NAMED:
        return _NAMED[c]
    if c.isprintable():
        return c
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def json_text(encoded: str) -> str:
    """JSON text with the characters JSON allows raw but a terminal may act on (DEL, C1
    controls, format characters, line separators) escaped as ``\\uXXXX``: still valid JSON,
    decoding to the same value."""
    if encoded.isprintable():
        return encoded
    out = []
    for c in encoded:
        if c.isprintable():
            out.append(c)
            continue
        o = ord(c)
        if o > 0xFFFF:  # a UTF-16 surrogate pair, as JSON spells it
            o -= 0x10000
            out.append(f"\\u{0xD800 + (o >> 10):04x}\\u{0xDC00 + (o & 0x3FF):04x}")
        else:
            out.append(f"\\u{o:04x}")
    return "".join(out)


def csv_cell(value: Any) -> Any:
    """A CSV cell: numbers as they are; text through :func:`text`, a formula neutralised."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    shown = text(value)
    raw = str(value) if isinstance(value, str) else shown
    if raw.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(raw):
        return "'" + shown
    return shown


def emit(rows: Sequence[dict[str, Any]], fmt: Format, columns: Sequence[str]) -> None:
    """Print ``rows`` to stdout as a table of ``columns``, JSON lines or CSV; in JSON lines and
    CSV every datetime is RFC 3339 UTC with ``Z`` and milliseconds, as routes send it."""
    if fmt is not Format.table:
        rows = [{k: format_ms(v) if isinstance(v, dt.datetime) else v for k, v in row.items()}
                for row in rows]  # fmt: skip
    if fmt is Format.jsonl:
        out = sys.stdout.buffer
        for row in rows:
            line = orjson.dumps(row, default=str, option=orjson.OPT_SORT_KEYS).decode()
            out.write(json_text(line).encode() + b"\n")
        out.flush()
        return
    if fmt is Format.csv:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: csv_cell(v) for k, v in row.items()})
        sys.stdout.write(buf.getvalue())
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(show_lines=False, box=None, header_style="bold")
    for col in columns:
        table.add_column(Text(col), overflow="fold")
    for row in rows:
        table.add_row(*(Text(text(row[c])) for c in columns))
    # markup, emoji codes and highlighting off: nothing in a value is interpreted
    console = Console(
        width=None if sys.stdout.isatty() else 200, markup=False, emoji=False, highlight=False
    )
    console.print(table)
    if not rows:
        sys.stdout.write("(none)\n")
