"""The summary ``inferwatch demo`` prints: what ran, what was caught against the simulator's
truth, where the files are, and what to try next."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from streams.cli.output import text
from streams.sim.scoring import Evaluation
from streams.store.store import parse_dsn

if TYPE_CHECKING:
    from streams.cli.demo import DemoResult

SEVERITY_RANK = {"critical": 4, "high": 3, "medium": 2, "low": 1, "info": 0}
TOP_ALERTS = 10


def print_summary(console: Console, r: DemoResult) -> None:
    """What ran, what was caught against the truth, where the files are, what to try next."""
    ev, c = r.evaluation, r.counters
    rejected = sum(c.rejects_total.values())
    of = f" of {r.truth.events:,}" if r.produced < r.truth.events else ""
    console.print(
        f"\n[bold]inferwatch demo[/]: {r.produced:,}{of} simulated events "
        f"({r.truth.scenario} scenario, seed {r.truth.seed}) via an embedded Kafka broker, "
        f"{r.elapsed_s:.1f} s",
        highlight=False,
    )
    if r.interrupted:
        console.print("[yellow]interrupted: the scores below cover what the worker read[/]")
    if r.prior_events:
        console.print(
            f"[yellow]--keep: the store already held {r.prior_events:,} events; detector state "
            "carried over, so the scores below mix runs (--fresh scores this run alone)[/]"
        )
    console.print(
        f"pipeline: produced {r.produced:,}, consumed {c.events_total + rejected:,}, rejected "
        f"{rejected:,}, lost to retention {c.lost_events_total:,}\n"
        f"store:    {r.stored_events:,} events ({r.distinct_events:,} distinct ids), "
        f"{c.findings_total:,} findings, {len(ev.alerts)} alerts",
        highlight=False,
    )
    _print_scores(console, ev)
    if ev.alerts:
        console.print(_alerts_table(ev))
    _print_next(console, r)


def _print_scores(console: Console, ev: Evaluation) -> None:
    console.print(f"\n[bold]Incidents detected: {ev.detected}/{len(ev.incidents)}[/]")
    for res in ev.incidents:
        inc = res.incident
        what = f"{inc.incident_id} {inc.kind}: {inc.entity_type} {inc.entity} ({inc.detector})"
        if res.delay_ms is not None:
            extra = f", {len(res.alerts)} alerts" if len(res.alerts) > 1 else ""
            line = f"  [green]detected[/]      {what} after {_duration(res.delay_ms)}{extra}"
        else:
            line = f"  [red]not detected[/]  {what}"
        console.print(line, highlight=False)
        desc = _indented(inc.description, 16, console.width)
        console.print(desc, style="dim", highlight=False, markup=False)
    shown = ", ".join(ev.benign_alerted[:5]) + (" ..." if len(ev.benign_alerted) > 5 else "")
    console.print(
        f"[bold]Benign callers alerted: {len(ev.benign_alerted)}/{ev.benign_callers}[/]"
        + (f" ({shown})" if shown else ""),
        highlight=False,
    )
    false = ev.false_alarms
    console.print(f"[bold]False alarms: {len(false)}[/] (alerts on entities no incident involves)")
    for a in false[:TOP_ALERTS]:
        line = text(f"{a.detector} {a.entity_type} {a.entity} at {_clock(a.ts_ms)}: {a.title}")
        console.print(_indented(line, 2, console.width), highlight=False, markup=False)
    if len(false) > TOP_ALERTS:
        console.print(f"  ... and {len(false) - TOP_ALERTS} more (inferwatch alerts)")
    console.print(
        f"[bold]Related: {len(ev.related)}[/] (alerts on incident entities or attacker traffic "
        "outside the detection rule)",
        highlight=False,
    )


def _alerts_table(ev: Evaluation) -> Any:
    from rich import box

    top = sorted(
        ev.alerts, key=lambda a: (-SEVERITY_RANK.get(a.severity, 0), -a.event_count, a.ts_ms)
    )[:TOP_ALERTS]
    table = Table(
        title=f"Top alerts ({len(top)} of {len(ev.alerts)}; ts is event time, UTC)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for col in ("verdict", "ts", "severity", "detector", "entity", "model", "events", "status"):
        short = col in ("verdict", "ts", "severity", "events", "status")
        table.add_column(col, justify="right" if col == "events" else "left", no_wrap=short)
    for a in top:  # values from events are literal text, never markup (streams/cli/output.py)
        table.add_row(*(Text(text(v)) for v in (
            ev.verdicts[a.alert_id], _clock(a.ts_ms), a.severity, a.detector,
            f"{a.entity_type} {a.entity}", a.model_id, f"{a.event_count:,}", a.status,
        )))  # fmt: skip
    return table


def _print_next(console: Console, r: DemoResult) -> None:
    default = parse_dsn("chdb:./inferwatch-data").path
    store_opt = "" if r.store_dir == default else f" --store chdb:{_show(r.store_dir)}"
    hours = int((time.time() * 1000 - r.truth.start_ts_ms) // 3_600_000) + 1
    console.print(
        f"\n[bold]Data[/]\n  store   chdb:{_show(r.store_dir)} (events, findings, alerts, "
        f"... tables)\n  events  {_show(r.events_path)} (the "
        f"simulated traffic, one event per line)\n  truth   {_show(r.truth_path)} (what was "
        "injected: the incidents scored above)",
        highlight=False,
    )
    console.print(
        f"\n[bold]Next[/]\n  inferwatch alerts --since {hours}h{store_opt}\n"
        f"  inferwatch findings --detector abuse.rate_spike{store_opt}\n"
        f"  inferwatch incidents list{store_opt}\n"
        "  # the same traffic from the file instead of Kafka, into a second store:\n"
        f"  inferwatch run --source file:{_show(r.events_path)} --store chdb:./inferwatch-replay",
        highlight=False,
    )


def _show(path: Path) -> str:
    try:
        return f"./{path.relative_to(Path.cwd())}"
    except ValueError:
        return str(path)


def _indented(text: str, indent: int, width: int) -> str:
    pad = " " * indent
    return textwrap.fill(text, max(40, width), initial_indent=pad, subsequent_indent=pad)


def _clock(ts_ms: int) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ts_ms / 1000))


def _duration(ms: int) -> str:
    """
    >>> _duration(160_000), _duration(45_000), _duration(3_780_000)
    ('2m40s', '45s', '1h03m')
    """
    s = round(ms / 1000)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
