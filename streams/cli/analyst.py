"""``inferwatch silence|allow|incidents``: the analyst's workflow (streams/alerting/analyst.py).

When a worker owns the embedded store the change travels through its local API and is applied at
its next checkpoint (the command waits for that, up to ``--wait`` seconds); otherwise it is
written to the store directly and the next worker start loads it. The author is
``INFERWATCH_OPERATOR``, else the OS user.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any

import typer

from streams.api.queries import duration_s, iso_ms
from streams.cli.common import StoreOpt, fail, open_store, query, worker_api
from streams.cli.output import Format, emit, text
from streams.worker.environment import Environment

silence_app = typer.Typer(
    help="Silences: matching alerts are recorded as silenced and not notified.",
    no_args_is_help=True,
)
allow_app = typer.Typer(
    help="Allow-list: an entity's alerts are expected (pen tests, known jobs); findings are kept.",
    no_args_is_help=True,
)
incidents_app = typer.Typer(
    help="Incidents: groups of alerts; acknowledge, assign, close with a verdict.",
    no_args_is_help=True,
)
ForOpt = Annotated[str, typer.Option("--for", help="How long: 30m, 2h, 7d.")]
UntilOpt = Annotated[str | None, typer.Option(help="Until this RFC 3339 time (instead of --for).")]
WaitOpt = Annotated[float, typer.Option(help="Seconds to wait for a running worker to apply it.")]


def _operator() -> str:
    """Who runs this command (``INFERWATCH_OPERATOR`` as the command started, else the OS user)."""
    from streams.alerting import analyst  # lazily, as every command here: --help stays fast

    return analyst.operator(Environment.read().values)


def _end_ms(for_: str, until: str | None) -> int:
    from streams.worker.settings import _time_ms

    if until:
        try:
            return _time_ms(until)
        except ValueError as exc:
            fail(f"--until {exc}")
    seconds = duration_s(for_)
    if seconds:
        return int(time.time() * 1000) + seconds * 1000
    fail(f"--for {for_!r}: expected a duration like 30m, 2h, 7d")


def _apply(store: str | None, command: str, args: dict[str, Any], wait: float, direct: Any) -> None:
    """Through the owning worker's API when there is one, else ``direct(store)``."""
    from streams.api.client import ApiError

    client = worker_api(store)
    if client is None:
        st = open_store(store)
        try:
            direct(st)
        except ValueError as exc:
            fail(str(exc))
        finally:
            st.close()
        return
    try:
        state = client.command(command, **args)
        deadline = time.monotonic() + wait
        while state["state"] == "pending" and time.monotonic() < deadline:
            time.sleep(0.2)
            state = client.command_state(state["id"])
    except ApiError as exc:
        fail(str(exc))
    if state["state"] == "pending":
        fail(f"the worker has not applied it yet (command {state['id']}); it will at its next "
             "checkpoint", code=1)  # fmt: skip
    if state["state"] == "rejected":  # refused when applied: the store changed meanwhile
        fail(str(state.get("error")))
    if state["state"] != "applied":
        fail(f"the worker could not apply it: {state.get('error', state)}", code=1)


# --- silences -------------------------------------------------------------------------------


@silence_app.command("add")
def silence_add(
    matcher: Annotated[
        list[str],
        typer.Option("--matcher", "-m", help="LABEL=VALUE, !=, =~ or !~ (repeat: all must match)."),
    ],
    for_: ForOpt = "2h",
    until: UntilOpt = None,
    comment: Annotated[str, typer.Option(help="Why (shown in silence list).")] = "",
    store: StoreOpt = None,
    wait: WaitOpt = 30.0,
) -> None:
    """Silence alerts whose labels match every --matcher (detector, model_id, entity_type,
    entity, tenant, severity)."""
    from streams.alerting import analyst

    args: dict[str, Any] = {
        "matchers": matcher, "ends_ms": _end_ms(for_, until), "author": _operator(),
        "comment": comment, "silence_id": secrets.token_hex(6),
    }  # fmt: skip
    try:
        silence = analyst.new_silence(**args)
    except ValueError as exc:
        fail(str(exc))
    _apply(store, "silence_add", args, wait, lambda st: analyst.add_silence(st, silence))
    typer.echo(
        f"silence {silence.silence_id} until {iso_ms(silence.ends_ms)} by {text(silence.author)}"
    )


@silence_app.command("list")
def silence_list(
    all_: Annotated[bool, typer.Option("--all", help="Include expired ones.")] = False,
    fmt: Annotated[Format, typer.Option("--format")] = Format.table,
    store: StoreOpt = None,
) -> None:
    """Active silences (with --all, expired ones too)."""

    rows = query(store, "silences", scope="all" if all_ else "active")
    emit(rows, fmt, ["silence_id", "matchers", "starts", "ends", "author", "comment"])


@silence_app.command("expire")
def silence_expire(
    silence_id: Annotated[str, typer.Argument(help="From `inferwatch silence list`.")],
    store: StoreOpt = None,
    wait: WaitOpt = 30.0,
) -> None:
    """End a silence now."""
    from streams.alerting import analyst

    _apply(store, "silence_expire", {"silence_id": silence_id}, wait,
           lambda st: analyst.expire_silence(st, silence_id))  # fmt: skip
    typer.echo(f"silence {text(silence_id)} expired")


# --- allow-list -----------------------------------------------------------------------------


@allow_app.command("add")
def allow_add(
    entity: Annotated[str, typer.Option(help="The api key, client IP, session, tenant or model.")],
    entity_type: Annotated[str, typer.Option(help="api_key, client_ip, session, tenant, model.")],
    model: Annotated[str, typer.Option(help="Only alerts on this model_id (default: all).")] = "",
    for_: ForOpt = "7d",
    until: UntilOpt = None,
    reason: Annotated[str, typer.Option(help="Why (a ticket, a pen-test window).")] = "",
    store: StoreOpt = None,
    wait: WaitOpt = 30.0,
) -> None:
    """Expect an entity's alerts until the entry expires: they are recorded as silenced and not
    notified; its findings are recorded as always."""
    from streams.alerting import analyst

    args: dict[str, Any] = {
        "entity_type": entity_type, "entity": entity, "model_id": model,
        "ends_ms": _end_ms(for_, until), "author": _operator(), "reason": reason,
        "allow_id": secrets.token_hex(6),
    }  # fmt: skip
    try:
        entry = analyst.new_allow(**args)
    except ValueError as exc:
        fail(str(exc))
    _apply(store, "allow_add", args, wait, lambda st: analyst.add_allow(st, entry))
    typer.echo(
        f"allow {entry.allow_id}: {entity_type} {text(entity)} until {iso_ms(entry.ends_ms)}"
    )


@allow_app.command("list")
def allow_list(
    all_: Annotated[bool, typer.Option("--all", help="Include expired ones.")] = False,
    fmt: Annotated[Format, typer.Option("--format")] = Format.table,
    store: StoreOpt = None,
) -> None:
    """Active allow-list entries (with --all, expired ones too)."""

    rows = query(store, "allow_list", scope="all" if all_ else "active")
    emit(rows, fmt, ["allow_id", "entity_type", "entity", "model_id", "ends", "author", "reason"])


@allow_app.command("expire")
def allow_expire(
    allow_id: Annotated[str, typer.Argument(help="From `inferwatch allow list`.")],
    store: StoreOpt = None,
    wait: WaitOpt = 30.0,
) -> None:
    """End an allow-list entry now."""
    from streams.alerting import analyst

    _apply(store, "allow_expire", {"allow_id": allow_id}, wait,
           lambda st: analyst.expire_allow(st, allow_id))  # fmt: skip
    typer.echo(f"allow {text(allow_id)} expired")


# --- incidents ------------------------------------------------------------------------------

LIST_COLUMNS = ["incident_id", "severity", "status", "title", "alerts", "last_seen", "assignee",
                "verdict"]  # fmt: skip


@incidents_app.command("list")
def incidents_list(
    status: Annotated[
        str | None, typer.Option(help="open, acknowledged, resolved or closed.")
    ] = None,
    fmt: Annotated[Format, typer.Option("--format")] = Format.table,
    store: StoreOpt = None,
) -> None:
    """Incidents, most recent first."""

    rows = query(store, "incidents", **({"status": status} if status else {}))
    for r in rows:
        r["alerts"] = len(r["alert_ids"])
    emit(rows if fmt is not Format.table else [{c: r[c] for c in LIST_COLUMNS} for r in rows],
          fmt, LIST_COLUMNS)  # fmt: skip


@incidents_app.command("show")
def incidents_show(
    incident_id: Annotated[str, typer.Argument(help="From `inferwatch incidents list`.")],
    store: StoreOpt = None,
) -> None:
    """One incident: its fields, verdict and notes, and its alerts."""
    from streams.alerting import analyst

    (inc,) = query(store, "incidents", incident_id=incident_id)
    for key in analyst.INCIDENT_COLUMNS:
        if key not in ("alert_ids", "notes"):
            typer.echo(f"{key:12} {text(inc[key]) or '-'}")
    # notes are stored one per line; each is shown escaped on its own line
    notes = [text(note) for note in (inc["notes"] or "-").split("\n")]
    typer.echo("notes        " + "\n             ".join(notes))
    typer.echo(f"alerts       {len(inc['alert_ids'])}")
    for row in inc["alerts"]:
        typer.echo("  " + "  ".join(text(v) for v in row.values()))


def _change(action: str, incident_id: str, value: str, note: str, store: str | None,
            wait: float) -> None:  # fmt: skip
    """Check the values of ``action`` (one-line error and exit 2), then apply it."""
    from streams.alerting import analyst

    try:
        change = analyst.incident_change(action, _operator(), value, note)
    except ValueError as exc:
        fail(str(exc))
    _apply(store, "incident_change", {"incident_id": incident_id, "change": change}, wait,
           lambda st: analyst.update_incident(st, incident_id, change))  # fmt: skip


NoteOpt = Annotated[str, typer.Option(help="A note appended to the incident (one line).")]


@incidents_app.command("ack")
def incidents_ack(
    incident_id: str, note: NoteOpt = "", store: StoreOpt = None, wait: WaitOpt = 30.0
) -> None:
    """Acknowledge: someone is on it."""

    _change("ack", incident_id, "", note, store, wait)
    typer.echo(f"incident {text(incident_id)} acknowledged by {text(_operator())}")


@incidents_app.command("assign")
def incidents_assign(
    incident_id: str,
    to: Annotated[str, typer.Option("--to", help="Who takes it.")],
    note: NoteOpt = "",
    store: StoreOpt = None,
    wait: WaitOpt = 30.0,
) -> None:
    """Assign to an analyst."""
    _change("assign", incident_id, to, note, store, wait)
    typer.echo(f"incident {text(incident_id)} assigned to {text(to)}")


@incidents_app.command("close")
def incidents_close(
    incident_id: str,
    verdict: Annotated[str, typer.Option(help="true_positive, false_positive or benign_expected.")],
    note: NoteOpt = "",
    store: StoreOpt = None,
    wait: WaitOpt = 30.0,
) -> None:
    """Close with a verdict (recorded with who and when)."""
    _change("close", incident_id, verdict, note, store, wait)
    typer.echo(f"incident {text(incident_id)} closed: {verdict}")
