"""Hostile text on the analyst's screen (issue 14, item 9): every value that came from an event
is shown as literal text by every listing command in every format.

Hostile api keys, client IPs, model ids and event ids go through a real worker on a file source
into a real store (rate spikes, so they reach alerts, findings and incidents); silences,
allow-list entries and notes quote them as an analyst would. Then a real worker owns the store
and serves its API, and each command runs in-process through typer's CliRunner, through that
API (the direct-store path is checked to print the same), and each hostile string is looked
for, exactly as it must be shown."""

from __future__ import annotations

import csv
import io
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from detectors.abuse.rate_spike.detector import RateSpike
from streams.alerting import analyst
from streams.alerting.lifecycle import AllowEntry, Matcher, Silence
from streams.api.server import serve_api
from streams.cli.main import full_app
from streams.sources.base import FileSource
from streams.store.store import Store
from streams.worker.loop import Worker, WorkerSettings
from tests.support.api_worker_process import SETTINGS, IdleSource

app = full_app()

T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
FAR = 4_102_444_800_000  # 2100-01-01

# (as it arrives in an event, as the analyst must see it)
HOSTILE = [
    ("[/]", "[/]"),
    ("[/bold]", "[/bold]"),
    ("[bold red]ALERT[/bold red]", "[bold red]ALERT[/bold red]"),
    ("[link=https://evil.example/]x[/link]", "[link=https://evil.example/]x[/link]"),
    ("\x1b[2J\x1b[Hall clear", "\\x1b[2J\\x1b[Hall clear"),
    ("k1\rresolved, all clear", "k1\\rresolved, all clear"),
    ("k2\nforged row", "k2\\nforged row"),
    ("\x9b31mred", "\\x9b31mred"),  # C1 CSI
    ("\u202egnp.exe", "\\u202egnp.exe"),  # right-to-left override
    ('=HYPERLINK("http://evil.example","x")', '=HYPERLINK("http://evil.example","x")'),
    ("+cmd|' /C calc'!A0", "+cmd|' /C calc'!A0"),
    ("-2+3+cmd|' /C calc'!A0", "-2+3+cmd|' /C calc'!A0"),
    ("@SUM(1)", "@SUM(1)"),
    ("\tTAB", "\\tTAB"),
    ("-2.5", "-2.5"),  # a plain number stays one, in CSV too
    ("C:\\temp", "C:\\\\temp"),  # a backslash is doubled, so an escape is never ambiguous
    (":warning: emoji", ":warning: emoji"),
]
FORMULA = tuple("=+-@\t\r")


def csv_shown(raw: str, shown: str) -> str:
    """What a CSV cell must hold: a leading formula character neutralised by a quote."""
    number = re.fullmatch(r"[+-]?\d+(\.\d+)?", raw) is not None
    return "'" + shown if raw.startswith(FORMULA) and not number else shown


def write_events(path: Path) -> None:
    """Per hostile string, a warm key (10 calls a minute for 6 minutes) that then sends 50
    calls in 25 s: a rate spike on its api key and its client IP, on a model of that name."""
    events = []
    for raw, _ in HOSTILE:
        times = [T0_MS + i * 6_000 for i in range(60)]
        times += [T0_MS + 360_000 + i * 500 for i in range(50)]
        for n, ts in enumerate(times):
            event = {"schema_version": 1, "event_id": f"{raw}#{n}", "ts": ts, "model_id": raw}
            events.append(event | {"api_key_id": raw, "client_ip": raw})
    events.sort(key=lambda e: (e["ts"], e["event_id"]))
    path.write_text("".join(json.dumps(e) + "\n" for e in events))


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("hostile")
    write_events(base / "events.jsonl")
    settings = WorkerSettings(batch_max=2_000, checkpoint_events=4_000, checkpoint_s=3600)
    source = FileSource(base / "events.jsonl")
    try:
        with Store(f"chdb:{base / 'store'}") as store:
            Worker(store, source, [RateSpike()], settings).run()
            for i, (raw, _) in enumerate(HOSTILE):
                # built as stored rows: the commands refuse control characters in a comment
                # or reason today, but an entity holds whatever its events held
                matchers = (Matcher("entity", "=", raw),)
                analyst.add_silence(store, Silence(f"s{i}", matchers, 0, FAR, "ana", raw))
                analyst.add_allow(store, AllowEntry(f"a{i}", "api_key", raw, "", FAR, "ana", raw))
            # notes as stored before notes were checked (a note is one line of printable text
            # now); a newline separates two notes, so none holds one
            notes = [inc | {"notes": inc["title"]} for inc in analyst.list_incidents(store)]
            store.insert_arrow(
                "incidents", analyst.incidents_table([n for n in notes if "\n" not in n["notes"]])
            )
    finally:
        source.close()
    for fmt in ("table", "jsonl", "csv"):  # no worker owns the store: read directly
        DIRECT[fmt] = cli("alerts", "--format", fmt, "--store", f"chdb:{base / 'store'}")
    with Store(f"chdb:{base / 'store'}") as store:
        worker = Worker(store, IdleSource(), [], SETTINGS)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        api = serve_api(worker)
        try:
            yield base / "store"
        finally:
            api.stop()
            worker.stop_requested.set()
            thread.join(timeout=30)


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout_bytes.decode()  # as written: .stdout turns CRLF into LF


# (command, the columns that carry the hostile string as it arrived)
COMMANDS = {
    "alerts": (["alerts"], ["entity", "model_id"]),
    "findings": (["findings"], ["api_key_id", "model_id"]),
    "silence list": (["silence", "list"], ["comment"]),  # and matchers: entity=<it>
    "allow list": (["allow", "list"], ["entity", "reason"]),
    "incidents list": (["incidents", "list"], ["title"]),
}
DIRECT: dict[str, str] = {}
_cache: dict[tuple[str, str], str] = {}


def output(store_dir: Path, command: str, fmt: str) -> str:
    """The command's output (run once per format), checked to hold nothing but printable text
    and the line ends the format writes."""
    if (command, fmt) not in _cache:
        args, _ = COMMANDS[command]
        out = cli(*args, "--format", fmt, "--store", f"chdb:{store_dir}")
        assert_no_raw_controls(out, "\r\n" if fmt == "csv" else "\n")
        _cache[command, fmt] = out
    return _cache[command, fmt]


def assert_no_raw_controls(text: str, line_end: str = "\n") -> None:
    for line in text.split(line_end):
        bad = [c for c in line if not c.isprintable()]
        assert not bad, (line, bad)


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_listing_shows_hostile_text_literally_as_a_table(
    store_dir: Path, command: str
) -> None:
    out = output(store_dir, command, "table")
    for raw, shown in HOSTILE:
        assert shown in out, (raw, out)
    # one line per row: a newline in a value cannot forge a row
    rows = output(store_dir, command, "jsonl").splitlines()
    assert len(out.rstrip("\n").split("\n")) == 1 + len(rows), out


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_listing_keeps_hostile_text_exact_in_jsonl(store_dir: Path, command: str) -> None:
    _, columns = COMMANDS[command]
    rows = [json.loads(line) for line in output(store_dir, command, "jsonl").splitlines()]
    values = {str(r[c]) for r in rows for c in columns}
    for raw, _ in HOSTILE:
        assert raw in values or f"abuse.rate_spike {raw}" in values, (raw, sorted(values))


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_listing_neutralises_hostile_text_in_csv(store_dir: Path, command: str) -> None:
    out = output(store_dir, command, "csv")
    _, columns = COMMANDS[command]
    rows = list(csv.DictReader(io.StringIO(out, newline="")))
    cells = {r[c] for r in rows for c in columns}
    for raw, shown in HOSTILE:
        if command == "incidents list":  # the title is "<detector> <model>"
            assert f"abuse.rate_spike {shown}" in cells, (raw, sorted(cells))
        else:
            assert csv_shown(raw, shown) in cells, (raw, sorted(cells))
    for row in rows:
        for cell in row.values():
            assert not cell.startswith(FORMULA) or re.fullmatch(r"-\d+(\.\d+)?", cell), cell
    if command in ("alerts", "findings"):
        assert all(float(r["score"]) > 0 for r in rows)  # numbers stay numbers


@pytest.mark.slow
@pytest.mark.parametrize(("raw", "shown"), HOSTILE, ids=[repr(r) for r, _ in HOSTILE])
def test_incidents_show_prints_hostile_text_literally(
    store_dir: Path, raw: str, shown: str
) -> None:
    listed = [json.loads(x) for x in output(store_dir, "incidents list", "jsonl").splitlines()]
    (inc,) = [i for i in listed if i["title"] == f"abuse.rate_spike {raw}"]
    out = cli("incidents", "show", inc["incident_id"], "--store", f"chdb:{store_dir}")
    assert_no_raw_controls(out)
    lines = out.splitlines()
    assert f"title        abuse.rate_spike {shown}" in lines, out
    if "\n" not in raw:
        assert f"notes        abuse.rate_spike {shown}" in lines, out
    alert_lines = [ln for ln in lines if ln.startswith("  ")]
    assert len(alert_lines) == len(inc["alert_ids"]) == 2, out  # its api key and its client IP
    assert all(shown in ln for ln in alert_lines), out


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["table", "jsonl", "csv"])
def test_the_direct_store_path_prints_what_the_api_path_prints(store_dir: Path, fmt: str) -> None:
    assert DIRECT[fmt] == output(store_dir, "alerts", fmt)


@pytest.mark.slow
def test_styled_terminal_output_carries_only_our_own_styles(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With colours forced (a terminal), the only escape sequences are rich's own SGR styles."""
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    out = cli("alerts", "--store", f"chdb:{store_dir}")
    assert "\x1b[" in out  # styled: the header is bold
    assert_no_raw_controls(re.sub(r"\x1b\[[0-9;]*m", "", out))
    assert "\\x1b[2J" in out and "\x1b[2J" not in out
