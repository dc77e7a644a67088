"""``inferwatch outbox list|retry``: alert deliveries that wait, were refused, or went out.

A refused delivery (the receiver answered 4xx, or never answered in time) stays in the outbox
until the receiver is fixed and someone retries it. When a worker owns the embedded store,
``retry`` goes through its local API: the worker makes the rows pending at its next checkpoint
and sends them right after, in order (a firing before its resolution). Otherwise ``retry``
opens the store, makes them pending and, given the route (``--webhook``, the configuration or
``INFERWATCH_WEBHOOK_URL``), sends them itself, with every other delivery still pending;
without a route the next ``inferwatch run`` that has it sends them.
"""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from streams.cli.common import (
    ConfigOpt,
    StoreOpt,
    configured_routes,
    fail,
    load_config,
    open_store,
    query,
    worker_api,
)
from streams.cli.output import Format, emit

outbox_app = typer.Typer(
    help="The alert outbox: deliveries pending, refused by a receiver, or delivered.",
    no_args_is_help=True,
)
LIST_COLUMNS = ["id", "route", "state", "detector", "entity", "attempts", "response", "note"]
ALL = 1_000_000  # rows read to select and to report a retry


class State(StrEnum):
    pending = "pending"
    refused = "refused"
    delivered = "delivered"


@outbox_app.command("list")
def outbox_list(
    status: Annotated[State | None, typer.Option(help="Only deliveries in this state.")] = None,
    route: Annotated[str | None, typer.Option(help="Only this route (e.g. webhook).")] = None,
    fmt: Annotated[Format, typer.Option("--format")] = Format.table,
    limit: Annotated[int, typer.Option(min=1)] = 1000,
    store: StoreOpt = None,
) -> None:
    """Deliveries in delivery order: id (the receiver's Idempotency-Key), state, attempts, the
    receiver's last answer, and what a pending one waits for."""
    params: dict[str, Any] = {"limit": limit, "route": route}
    if status is not None:
        params["status"] = status.value
    emit(query(store, "outbox", **params), fmt, LIST_COLUMNS)


@outbox_app.command("retry")
def outbox_retry(
    delivery_id: Annotated[
        str | None, typer.Argument(help="A delivery id from `inferwatch outbox list`.")
    ] = None,
    route: Annotated[
        str | None, typer.Option(help="Every refused delivery of this route (or narrow ID).")
    ] = None,
    all_refused: Annotated[
        bool, typer.Option("--all-refused", help="Every refused delivery.")
    ] = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
    webhook: Annotated[
        str | None,
        typer.Option(
            envvar="INFERWATCH_WEBHOOK_URL",
            help="With no worker running: send through this webhook now (default: the "
            "configuration's routes.webhook).",
        ),
    ] = None,
    webhook_ca_file: Annotated[
        Path | None,
        typer.Option(envvar="INFERWATCH_WEBHOOK_CA_FILE", help="CA bundle for an https --webhook."),
    ] = None,
    wait: Annotated[
        float, typer.Option(min=0, help="Seconds to wait for the deliveries to go out.")
    ] = 30.0,
) -> None:
    """Send refused deliveries again, once the receiver is fixed: one ID (with the refused
    delivery it waits behind), --route R, or --all-refused. Exit 1 if some did not go out."""
    if not (delivery_id or route or all_refused):
        fail("give a delivery ID, --route R or --all-refused (see `inferwatch outbox list`)")
    chosen = _selection(store, delivery_id, route)
    if not chosen:
        typer.echo(
            "nothing to retry: no refused deliveries" + (f" on route {route}" if route else "")
        )
        return
    tracked = chosen | _waiting_behind(store, chosen)
    ids = [delivery_id] if delivery_id else []
    client = worker_api(store)
    if client is not None:
        _through_worker(client, ids, route, all_refused, wait, tracked)
    else:
        routes = configured_routes(load_config(config), webhook, webhook_ca_file)
        missing = sorted({t.split("/", 1)[0] for t in chosen} - {r.name for r in routes})
        if missing:
            fail(
                f"no worker owns the store and route {', '.join(missing)} is not given: pass "
                "--webhook URL (or set routes.webhook in the configuration) to send them now"
            )
        _directly(store, routes, ids, route, all_refused, wait)
    _report(_tracked_rows(store, tracked))


def _selection(store: str | None, delivery_id: str | None, route: str | None) -> set[str]:
    """The refused deliveries a retry makes pending, as ``route/id``; a one-line error (exit 2)
    for an id or route the outbox does not know, or an id with nothing to retry."""
    if delivery_id:
        rows = query(store, "outbox", delivery_id=delivery_id, route=route)
        where = f" on route {route!r}" if route else ""
        if not rows:
            fail(f"no delivery {delivery_id!r}{where}; see `inferwatch outbox list`")
        if all(r["state"] == "delivered" for r in rows):
            at = rows[0]["delivered_at"]
            fail(f"delivery {delivery_id} was delivered{f' at {at:%Y-%m-%dT%H:%M:%SZ}' * bool(at)};"
                 " nothing to retry")  # fmt: skip
        head, _, status = delivery_id.rpartition(":")
        before = f"{head}:firing" if status == "resolved" else None
        chosen = {f"{r['route']}/{r['id']}" for r in rows if r["state"] == "refused"}
        for r in rows:
            if r["state"] == "pending" and before and f"{before} (refused)" in r["note"]:
                chosen.add(f"{r['route']}/{before}")  # it waits behind its refused firing
        if not chosen:
            fail(f"delivery {delivery_id} is pending: the worker sends it when its route takes it")
        return chosen
    if route and not query(store, "outbox", route=route, limit=1):
        fail(f"no deliveries on route {route!r}; see `inferwatch outbox list`")
    rows = query(store, "outbox", status="refused", route=route, limit=ALL)
    return {f"{r['route']}/{r['id']}" for r in rows}


def _waiting_behind(store: str | None, chosen: set[str]) -> set[str]:
    """Pending deliveries that wait behind a chosen refused one (a resolution behind its
    firing): they go out with it."""
    out = set()
    for r in query(store, "outbox", status="pending", limit=ALL):
        before = r["note"].removeprefix("waits for ").removesuffix(" (refused)")
        if r["note"] and f"{r['route']}/{before}" in chosen:
            out.add(f"{r['route']}/{r['id']}")
    return out


def _tracked_rows(store: str | None, tracked: set[str]) -> list[dict[str, Any]]:
    return [r for r in query(store, "outbox", limit=ALL) if f"{r['route']}/{r['id']}" in tracked]


def _through_worker(
    client: Any, ids: list[str], route: str | None, every: bool, wait: float, tracked: set[str]
) -> None:
    from streams.api.client import ApiError

    deadline = time.monotonic() + wait
    try:
        state = client.command("outbox_retry", ids=ids, route=route, all_refused=every)
        while state["state"] == "pending" and time.monotonic() < deadline:
            time.sleep(0.2)
            state = client.command_state(state["id"])
    except ApiError as exc:
        fail(str(exc))
    if state["state"] == "pending":
        fail(f"the worker has not applied it yet (command {state['id']}); it will at its next "
             "checkpoint", code=1)  # fmt: skip
    if state["state"] != "applied":
        fail(f"the worker could not apply it: {state}", code=1)
    # the worker delivers right after the checkpoint that applied it; wait for that
    while time.monotonic() < deadline:
        rows = client.query("outbox", status="pending", limit=ALL)
        if not any(f"{r['route']}/{r['id']}" in tracked for r in rows):
            break
        time.sleep(0.2)


def _directly(
    store: str | None,
    routes: list[Any],
    ids: list[str],
    route: str | None,
    every: bool,
    wait: float,
) -> None:
    from streams.alerting.outbox import Outbox
    from streams.store.store import TransientStoreError
    from streams.worker.checkpoint import committed_seq

    st = open_store(store)
    try:
        outbox = Outbox(st, routes, committed_seq=committed_seq(st))
        outbox.requeue(ids, route, every)
        deadline = time.monotonic() + wait
        while outbox.pending and time.monotonic() < deadline:
            before = {k: r.version for k, r in outbox.pending.items()}
            outbox.deliver()
            if {k: r.version for k, r in outbox.pending.items()} == before:
                break  # nothing could go (the receiver is down): the next run tries again
    except TransientStoreError as exc:
        fail(str(exc), code=1)
    finally:
        st.close()


def _report(rows: list[dict[str, Any]]) -> None:
    """What became of the retried deliveries; exit 1 unless all of them went out."""
    by_state = {s.value: [r for r in rows if r["state"] == s.value] for s in State}
    typer.echo(
        f"retried {len(rows)}: delivered {len(by_state['delivered'])}, "
        f"refused again {len(by_state['refused'])}, pending {len(by_state['pending'])}"
    )
    for r in by_state["refused"]:
        typer.echo(f"  refused {r['id']} ({r['route']}): {r['response']}")
    if by_state["pending"]:
        typer.echo("  the pending ones are sent by the worker (or the next `inferwatch run`)")
    if len(by_state["delivered"]) != len(rows):
        raise typer.Exit(1)
