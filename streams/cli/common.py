"""What the ``inferwatch`` command groups share: the --store and --config options, one-line
errors, the store or the running worker's API, the configuration and its routes. Every command
module imports these from here, and ``main`` assembles the groups, so no command module imports
``main`` (no cycle)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

DEFAULT_STORE = "chdb:./inferwatch-data"


StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar="INFERWATCH_STORE",
        help="chdb:DIR (embedded ClickHouse) or http(s)://HOST:PORT\\[/DB]; default store.dsn "
        f"of the config (INFERWATCH_CONFIG), else {DEFAULT_STORE}.",
    ),
]


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr, credentials redacted, and exit ``code``."""
    from streams.store.credentials import redact

    line = " ".join(redact(message).splitlines())
    typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def open_store(dsn: str | None, cfg: Any = None) -> Any:
    """The store of ``dsn``, else of the configuration's store.dsn, or a clear exit; its
    password from the configuration (INFERWATCH_STORE_PASSWORD[_FILE], store.password_file)."""
    from streams.store.store import Store, StoreError, StoreInUseError, TransientStoreError

    cfg = cfg or load_config(None)
    try:
        return Store(dsn or cfg.store_dsn, password=cfg.store_password)
    except StoreInUseError as exc:
        fail(f"{exc}; stop that worker or use another --store")
    except (StoreError, TransientStoreError) as exc:
        fail(str(exc))


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar="INFERWATCH_CONFIG",
        help="TOML configuration (schemas/config.schema.json); none: shipped defaults.",
    ),
]


def load_config(path: Path | None) -> Any:
    """The checked configuration (the environment's overrides included), or a clear exit."""
    from streams.worker.environment import Environment
    from streams.worker.settings import ConfigError, load

    try:
        return load(path, Environment.read().values)
    except ConfigError as exc:
        fail(str(exc))


def configured_routes(cfg: Any, webhook: str | None, ca_file: Path | None) -> list[Any]:
    """The routes of the options, else of the configuration's ``[routes.webhook]``."""
    hook = cfg.webhook or {}
    webhook = webhook or hook.get("url")
    if ca_file is None and hook.get("ca_file"):
        ca_file = Path(hook["ca_file"])
    return make_routes(webhook, ca_file, hook)


def make_routes(webhook: str | None, ca_file: Path | None, hook: dict[str, Any]) -> list[Any]:
    """The delivery routes, checked before anything is opened."""
    import ssl

    from streams.alerting.webhook import RouteConfigError, WebhookRoute, WebhookSettings

    if not webhook:
        if ca_file is not None:
            fail("--webhook-ca-file needs --webhook (or INFERWATCH_WEBHOOK_URL)")
        return []
    if ca_file is not None and not ca_file.is_file():
        fail(f"--webhook-ca-file {ca_file}: expected a PEM file, found none")
    tuning = {k: hook[k] for k in ("notify", "timeout_s", "max_timeouts") if k in hook}
    try:
        return [WebhookRoute(WebhookSettings(webhook, ca_file, **tuning))]
    except RouteConfigError as exc:
        fail(f"{exc} (--webhook or INFERWATCH_WEBHOOK_URL)")
    except ssl.SSLError as exc:
        fail(f"--webhook-ca-file {ca_file}: not a usable CA bundle ({exc})")


def query(store: str | None, name: str, **params: Any) -> list[dict[str, Any]]:
    """A named query: through the running worker's API if one owns the store, else directly.
    Datetimes come back UTC-aware either way, so both paths print the same RFC 3339 text."""
    import datetime as dt

    from streams.api import queries
    from streams.api.client import ApiError

    client = worker_api(store)
    if client is not None:
        try:
            result: list[dict[str, Any]] = client.query(name, **params)
        except ApiError as exc:
            fail(str(exc))
    else:
        st = open_store(store)
        try:
            result = queries.QUERIES[name](st, **params)  # type: ignore[operator]
        except ValueError as exc:
            fail(str(exc))
        finally:
            st.close()
    for row in result:
        for key, value in row.items():
            if isinstance(value, dt.datetime) and value.tzinfo is None:
                row[key] = value.replace(tzinfo=dt.UTC)  # the store's columns are UTC
    return result


def worker_api(store: str | None) -> Any:
    """The API client of the live process that owns an embedded store, or None if no process
    does (then the caller opens the store itself)."""
    from streams.api.client import ApiError, connect_api
    from streams.store.store import StoreError, StoreLock, parse_dsn

    try:
        dsn = parse_dsn(store or load_config(None).store_dsn)
    except StoreError as exc:
        fail(str(exc))
    if dsn.path is None or not StoreLock(dsn.path).held_elsewhere():
        return None
    pid = StoreLock(dsn.path).owner()
    unreachable = f"store {dsn.path} is in use by pid {pid} and its API is not reachable"
    try:
        client = connect_api(dsn.path, pid)
    except ApiError as exc:
        fail(f"{unreachable}: {exc}")
    if client is None:
        fail(f"{unreachable} (no {dsn.path / 'api.json'}: a worker without the API, or starting)")
    return client
