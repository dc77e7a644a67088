"""``inferwatch`` command line. Heavy modules are imported inside commands so ``--help`` is fast."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from streams.api.server import serve_api
from streams.cli.common import (
    DEFAULT_STORE,
    ConfigOpt,
    StoreOpt,
    configured_routes,
    fail,
    load_config,
    open_store,
    query,
)
from streams.cli.output import Format, emit
from streams.cli.reference import app as reference_app

app = typer.Typer(
    name="inferwatch",
    help="Runtime monitor for attacks on, and misbehaviour of, deployed ML models and LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.add_typer(reference_app, name="reference")


@app.command()
def run(
    source: Annotated[
        str, typer.Option(help="file:PATH (JSONL, one event per line) or kafka://HOST:PORT/TOPIC.")
    ],
    config: ConfigOpt = None,
    store: Annotated[
        str | None,
        typer.Option(
            envvar="INFERWATCH_STORE",
            help=f"chdb:DIR (embedded ClickHouse) or http(s)://HOST:PORT\\[/DB]; default "
            f"store.dsn of the config, else {DEFAULT_STORE}.",
        ),
    ] = None,
    from_start: Annotated[
        bool, typer.Option("--from-start", help="Ignore the saved position and state; replay.")
    ] = False,
    batch_size: Annotated[
        int | None, typer.Option(min=1, max=1_000_000, help="Default 10,000.")
    ] = None,
    checkpoint_events: Annotated[
        int | None, typer.Option(min=1, help="Checkpoint after this many events (50,000)...")
    ] = None,
    checkpoint_s: Annotated[
        float | None, typer.Option(min=0.1, help="...or this many seconds (5).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    webhook: Annotated[
        str | None,
        typer.Option(
            envvar="INFERWATCH_WEBHOOK_URL",
            help="POST every alert (alert v1 JSON) to this http(s) URL, after its checkpoint.",
        ),
    ] = None,
    webhook_ca_file: Annotated[
        Path | None,
        typer.Option(
            envvar="INFERWATCH_WEBHOOK_CA_FILE",
            help="CA bundle (PEM) to verify an https --webhook.",
        ),
    ] = None,
) -> None:
    """Consume inference events, run every registered detector, write to the store."""
    from detectors.registry import create_all
    from streams.sources.base import SourceError, open_source
    from streams.store.credentials import install_redaction, mask, redact
    from streams.worker.environment import Environment
    from streams.worker.faults import Faults, FaultSpecError
    from streams.worker.loop import Worker

    install_redaction()
    cfg = load_config(config)
    env = Environment.read()
    try:
        Faults.from_env(env)
    except FaultSpecError as exc:
        fail(str(exc))
    store = store or cfg.store_dsn
    if webhook:
        mask(webhook)
    routes = configured_routes(cfg, webhook, webhook_ca_file)
    try:
        if source.startswith("kafka://"):
            from streams.sources.kafka import open_kafka
            from streams.sources.kafka_config import config_from_env

            if from_start:
                fail("--from-start replays a file; for kafka:// use a new ?group= and --store")
            src: Any = open_kafka(source, config_from_env(env.values))
        else:
            src = open_source(source)
    except SourceError as exc:
        fail(str(exc))
    try:
        st = open_store(store, cfg)
    except BaseException:
        src.close()
        raise
    try:
        settings = cfg.worker_settings(
            batch_max=batch_size, checkpoint_events=checkpoint_events, checkpoint_s=checkpoint_s
        )
        worker = Worker(st, src, create_all(cfg.detectors), settings, from_start, routes, env)
        worker.install_signal_handlers()
        api = serve_api(worker) if st.dsn.embedded else None
        try:
            counters = _run_with_progress(worker, src, quiet)
        finally:
            if api is not None:
                api.stop()
    finally:
        try:
            src.close()  # a Kafka member leaves its group; it commits nothing here
        finally:
            st.close()
    rejected = sum(counters.rejects_total.values())
    typer.echo(
        f"events {counters.events_total:,}  rejected {rejected:,}  findings "
        f"{counters.findings_total:,}  alerts {counters.alerts_total:,}  -> {redact(store)}"
    )
    if rejected:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(counters.rejects_total.items()))
        typer.echo(f"rejected by reason: {reasons} (see table dead_letters)")
    _report_refusals(worker)


def _report_refusals(worker: Any) -> None:
    """A refused delivery is never a success: say so and exit 1 (the rows are kept)."""
    refused = {r: n for r, n in worker.counters.deliveries_refused_total.items() if n}
    if not refused:
        return
    last = worker.outbox.last_refusal
    routes = "; ".join(
        f"{r} {n:,}" + (f", last: {last[r].last_error}" if r in last else "")
        for r, n in sorted(refused.items())
    )
    fail(
        f"alert deliveries refused: {routes}. They are kept in the outbox: see `inferwatch "
        "outbox list --status refused`; once the receiver is fixed, `inferwatch outbox retry "
        "--all-refused` sends them.",
        code=1,
    )


def _run_with_progress(worker: Any, src: Any, quiet: bool) -> Any:
    total = src.size_bytes
    if quiet or total is None or not sys.stderr.isatty():
        return worker.run()
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("[bold]inferwatch run"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%  {task.fields[events]:,} events"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("run", total=total, events=0)
        return worker.run(
            lambda w: bar.update(task, completed=src.position, events=w.counters.events_total)
        )


@app.command()
def alerts(
    store: StoreOpt = None,
    since: Annotated[str | None, typer.Option(help="30m, 2h, 7d or an RFC 3339 time.")] = None,
    detector: Annotated[str | None, typer.Option(help="e.g. abuse.rate_spike")] = None,
    status: Annotated[str | None, typer.Option(help="firing, resolved or silenced")] = None,
    fmt: Annotated[Format, typer.Option("--format")] = Format.table,
    limit: Annotated[int, typer.Option(min=1)] = 1000,
) -> None:
    """Alerts (alert v1), newest first."""
    rows = query(store, "alerts", since=since, detector=detector, status=status, limit=limit)
    cols = ["ts", "severity", "status", "detector", "model_id", "entity_type", "entity"]
    emit(rows, fmt, [*cols, "event_count", "score"])


@app.command()
def findings(
    store: StoreOpt = None,
    since: Annotated[str | None, typer.Option(help="30m, 2h, 7d or an RFC 3339 time.")] = None,
    detector: Annotated[str | None, typer.Option(help="e.g. abuse.rate_spike")] = None,
    fmt: Annotated[Format, typer.Option("--format")] = Format.table,
    limit: Annotated[int, typer.Option(min=1)] = 1000,
) -> None:
    """Findings (finding v1): one detector's verdict on one event, newest first."""
    rows = query(store, "findings", since=since, detector=detector, limit=limit)
    cols = ["ts", "detector", "label", "score", "model_id", "api_key_id", "event_id"]
    emit(rows, fmt, cols)


@app.command()
def migrate(store: StoreOpt = None) -> None:
    """Create or upgrade the store's tables (also done at every start)."""
    st = open_store(store)
    try:
        applied = st.applied
    finally:
        st.close()
    typer.echo(f"applied: {', '.join(applied)}" if applied else "store is up to date")


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="JSONL file to write.")],
    scenario: Annotated[str, typer.Option(help="default, bench or quiet.")] = "default",
    events: Annotated[int, typer.Option(min=1)] = 100_000,
    seed: Annotated[int, typer.Option()] = 7,
) -> None:
    """Write simulated traffic and a truth file (OUT with .truth.json)."""
    from streams.sim import simulate as sim

    if scenario not in sim.SCENARIOS:
        fail(f"unknown scenario {scenario!r}; known: {', '.join(sorted(sim.SCENARIOS))}")
    truth = sim.write(scenario, events, seed, out)
    typer.echo(
        f"wrote {events:,} events to {out} ({len(truth.incidents)} incidents, "
        f"{len(truth.benign_callers)} benign callers); truth in {out.with_suffix('.truth.json')}"
    )


@app.command()
def demo(
    events: Annotated[int, typer.Option(min=1, help="Simulated events to stream.")] = 100_000,
    seed: Annotated[int, typer.Option(help="Simulator seed.")] = 7,
    store: Annotated[
        str,
        typer.Option(
            "--store",
            help="chdb:DIR (not read from INFERWATCH_STORE: --fresh clears it). The simulated "
            "traffic and its truth go to DIR/demo/.",
        ),
    ] = DEFAULT_STORE,
    fresh: Annotated[
        bool,
        typer.Option(
            "--fresh/--keep",
            help="Clear the store directory first (only if empty or an inferwatch store), or "
            "keep what it holds.",
        ),
    ] = True,
) -> None:
    """Stream simulated attacks through an embedded Kafka broker into a worker, then score its
    alerts against the simulator's truth."""
    from rich.console import Console

    from streams.cli import demo as demo_run

    console = Console(width=None if sys.stdout.isatty() else 120)
    try:
        result = demo_run.run(events, seed, store, fresh, console)
    except demo_run.DemoError as exc:
        fail(str(exc))
    demo_run.print_summary(console, result)
    if result.interrupted:
        raise typer.Exit(130)


@app.command()
def detectors() -> None:
    """List the registered detectors."""
    from detectors.registry import create, names

    for name in names():
        det = create(name)
        typer.echo(f"{name:24} v{det.version}  {', '.join(det.atlas) or '-'}  {det!r}")


config_app = typer.Typer(
    help="Check the configuration file (TOML; schemas/config.schema.json).", no_args_is_help=True
)
app.add_typer(config_app, name="config")


@config_app.command("check")
def config_check(config: ConfigOpt = None) -> None:
    """Check the file and the INFERWATCH_* overrides; print what the worker would use."""
    import dataclasses

    from streams.store.credentials import redact

    cfg = load_config(config)
    settings = cfg.worker_settings()
    typer.echo(f"ok: {cfg.path or 'no file (shipped defaults)'}")
    for var_key, var in sorted(cfg.overrides.items()):
        typer.echo(f"  {var_key} from {var}")
    password = " (password given)" if cfg.store_password else ""
    typer.echo(f"store      {redact(cfg.store_dsn)}{password}")
    typer.echo(f"webhook    {redact((cfg.webhook or {}).get('url', '-'))}")
    shown = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    shown["batch_size"] = shown.pop("batch_max")
    shown.pop("limits")
    typer.echo(
        "worker     " + ", ".join(f"{k}={v}" for k, v in shown.items() if k != "score_types")
    )
    typer.echo(f"detectors  overridden: {', '.join(sorted(cfg.detectors)) or '-'}")
    typer.echo(f"models     {', '.join(sorted(cfg.models)) or '-'} (inventory)")


@config_app.command("schema")
def config_schema() -> None:
    """Print the configuration's JSON Schema (for editors and reviews)."""
    from streams.worker.settings import SCHEMA_PATH

    typer.echo(SCHEMA_PATH.read_text(), nl=False)


def full_app() -> typer.Typer:
    """The whole command tree (idempotent): the analyst's groups are added here rather than at
    import, so ``--help`` stays fast."""
    from streams.cli.analyst import allow_app, incidents_app, silence_app
    from streams.cli.dead_letters import dead_letters
    from streams.cli.outbox import outbox_app

    if not any(c.name == "dead-letters" for c in app.registered_commands):
        app.command("dead-letters")(dead_letters)
    present = {group.name for group in app.registered_groups}
    for name, group in (
        ("outbox", outbox_app),
        ("silence", silence_app),
        ("allow", allow_app),
        ("incidents", incidents_app),
    ):
        if name not in present:
            app.add_typer(group, name=name)
    return app


def main() -> None:
    from streams.store.credentials import install_redaction

    install_redaction()  # log records and an uncaught traceback never show a secret
    full_app()()


if __name__ == "__main__":
    main()
