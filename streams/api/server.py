"""The worker's local API: named read-only queries, commands, and Prometheus metrics.

While a worker owns an embedded store it serves HTTP on 127.0.0.1 (a free port) and writes
``DIR/api.json`` (pid, port, token; mode 0600) so the CLI can reach it; the file goes away on a
clean stop. ``/v1/*`` needs ``Authorization: Bearer <token>``; ``/metrics`` does not.

- ``GET /v1/query/<name>?param=value`` runs ``streams.api.queries.QUERIES[name]``: names and
  keyword parameters, never SQL, so the API is read-only by construction.
- ``POST /v1/commands`` ``{"command": name, "args": {...}}`` queues a state change that the
  worker applies on its own thread at its next checkpoint (202 and an id);
  ``GET /v1/commands/<id>`` tells whether it was applied.
- ``GET /metrics``: Prometheus text format 0.0.4 from the worker's counters.
"""

from __future__ import annotations

import datetime as dt
import hmac
import inspect
import os
import secrets
import sys
import threading
import traceback
import typing
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from streams.alerting.outbox_commands import check_retry, retry_command
from streams.api.client import API_FILE, HOST, ApiError, ApiInfo, read_api_file, write_api_file
from streams.api.queries import QUERIES
from streams.sources.base import Source
from streams.store.credentials import redact
from streams.store.store import Store, TransientStoreError

if TYPE_CHECKING:
    from streams.worker.loop import Counters

MAX_BODY_BYTES = 64 << 10
KEPT_COMMANDS = 1000  # command states remembered for GET /v1/commands/<id>
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LOOPBACK_HOSTS = {HOST, "localhost", "[::1]"}


class ServedWorker(Protocol):
    """What the API needs of a worker (the real one, or a stand-in in tests)."""

    @property
    def counters(self) -> Counters: ...
    @property
    def commands(self) -> list[Callable[[Any], None]]: ...
    @property
    def store(self) -> Store: ...
    @property
    def source(self) -> Source: ...
    def request_checkpoint(self) -> None: ...


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """A state change the worker applies on its own thread at its next checkpoint.

    ``check(worker, args)`` validates the arguments and the ids they name against the store
    when the request arrives (ValueError -> 400 with the reason), so an analyst's typo is
    refused at once. ``apply`` checks again, since the store may have changed in between (a
    silence id taken meanwhile); a command that fails then is marked ``rejected`` (ValueError)
    or ``failed`` (anything else, the store down included) with its error, and the worker goes
    on: an analyst's command never stops ingestion."""

    apply: Callable[[Any, dict[str, Any]], None]
    args: tuple[str, ...] = ()
    check: Callable[[Any, dict[str, Any]], object] | None = None
    checkpoint_soon: bool = False


def _nothing(worker: Any, args: dict[str, Any]) -> None:
    """The checkpoint that applies the command is the whole effect."""


def _need(args: dict[str, Any], *names: str) -> None:
    missing = [n for n in names if n not in args]
    if missing:
        raise ValueError(f"missing args {missing}")


def _check_silence(worker: Any, args: dict[str, Any]) -> Any:
    from streams.alerting import analyst

    return analyst.check_new_silence(worker.store, _silence(args))


def _check_allow(worker: Any, args: dict[str, Any]) -> Any:
    from streams.alerting import analyst

    return analyst.check_new_allow(worker.store, _allow(args))


def _check_silence_expire(worker: Any, args: dict[str, Any]) -> Any:
    from streams.alerting import analyst

    _need(args, "silence_id")
    return analyst.find_silence(worker.store, args["silence_id"])


def _check_allow_expire(worker: Any, args: dict[str, Any]) -> Any:
    from streams.alerting import analyst

    _need(args, "allow_id")
    return analyst.find_allow(worker.store, args["allow_id"])


def _silence(args: dict[str, Any]) -> Any:
    from streams.alerting import analyst

    _need(args, "matchers", "ends_ms", "author", "silence_id")
    return analyst.new_silence(
        args["matchers"], args["ends_ms"], args["author"], args.get("comment", ""),
        args.get("starts_ms"), args["silence_id"],
    )  # fmt: skip


def _allow(args: dict[str, Any]) -> Any:
    from streams.alerting import analyst

    _need(args, "entity_type", "entity", "ends_ms", "author", "allow_id")
    return analyst.new_allow(
        args["entity_type"], args["entity"], args.get("model_id", ""), args["ends_ms"],
        args["author"], args.get("reason", ""), args["allow_id"],
    )  # fmt: skip


def _add_silence(worker: Any, args: dict[str, Any]) -> None:
    from streams.alerting import analyst

    worker.lifecycle.silences.append(analyst.add_silence(worker.store, _silence(args)))


def _expire_silence(worker: Any, args: dict[str, Any]) -> None:
    from streams.alerting import analyst

    expired = analyst.expire_silence(worker.store, args["silence_id"])
    lc = worker.lifecycle
    lc.silences = [s for s in lc.silences if s.silence_id != expired.silence_id] + [expired]


def _add_allow(worker: Any, args: dict[str, Any]) -> None:
    from streams.alerting import analyst

    worker.lifecycle.allow.append(analyst.add_allow(worker.store, _allow(args)))


def _expire_allow(worker: Any, args: dict[str, Any]) -> None:
    from streams.alerting import analyst

    expired = analyst.expire_allow(worker.store, args["allow_id"])
    lc = worker.lifecycle
    lc.allow = [a for a in lc.allow if a.allow_id != expired.allow_id] + [expired]


def _change_incident(worker: Any, args: dict[str, Any]) -> None:
    from streams.alerting import analyst

    inc = analyst.update_incident(worker.store, args["incident_id"], args["change"])
    kept = ("status", "verdict", "verdict_by", "verdict_at", "assignee", "notes")
    worker.lifecycle.analyst(args["incident_id"], **{k: inc.get(k) for k in kept})


def _check_incident(worker: Any, args: dict[str, Any]) -> None:
    from streams.alerting import analyst

    _need(args, "incident_id", "change")
    analyst.check_change(args["change"])
    analyst.get_incident(worker.store, args["incident_id"])


COMMANDS: dict[str, CommandSpec] = {
    "checkpoint_now": CommandSpec(_nothing, checkpoint_soon=True),
    "silence_add": CommandSpec(
        _add_silence,
        ("matchers", "ends_ms", "author", "comment", "starts_ms", "silence_id"),
        _check_silence,
        checkpoint_soon=True,
    ),
    "silence_expire": CommandSpec(
        _expire_silence, ("silence_id",), _check_silence_expire, checkpoint_soon=True
    ),
    "allow_add": CommandSpec(
        _add_allow,
        ("entity_type", "entity", "model_id", "ends_ms", "author", "reason", "allow_id"),
        _check_allow,
        checkpoint_soon=True,
    ),
    "allow_expire": CommandSpec(
        _expire_allow, ("allow_id",), _check_allow_expire, checkpoint_soon=True
    ),
    "incident_change": CommandSpec(
        _change_incident, ("incident_id", "change"), _check_incident, checkpoint_soon=True
    ),
    "outbox_retry": CommandSpec(
        retry_command, ("ids", "route", "all_refused"), check_retry, checkpoint_soon=True
    ),
}


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def query_function(name: str) -> Callable[..., Any]:
    if name not in QUERIES:
        raise HttpError(400, f"unknown query {name!r}; known: {', '.join(sorted(QUERIES))}")
    return typing.cast("Callable[..., Any]", QUERIES[name])


def query_parameters(name: str, raw: Mapping[str, list[str]]) -> dict[str, Any]:
    """Validate query-string parameters against the query function's keyword arguments."""
    fn = query_function(name)
    hints = typing.get_type_hints(fn)
    accepted = list(inspect.signature(fn).parameters)[1:]  # the first is the store
    unknown = sorted(set(raw) - set(accepted))
    if unknown:
        raise HttpError(
            400,
            f"query {name!r}: unknown parameter {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted) or '(none)'}",
        )
    out: dict[str, Any] = {}
    for key, values in raw.items():
        if len(values) != 1:
            raise HttpError(400, f"query {name!r}: parameter {key!r} given {len(values)} times")
        hint = hints.get(key)
        if hint is int or int in typing.get_args(hint):
            text = values[0]
            if not (text.isascii() and text.isdigit() and int(text) < 2**32):
                raise HttpError(
                    400, f"query {name!r}: {key} expects a whole number >= 0, got {text!r}"
                )
            out[key] = int(text)
        else:
            out[key] = values[0]
    return out


def encode_result(name: str, result: Any) -> dict[str, Any]:
    """A query's rows (or object); datetimes are sent as RFC 3339 text (naive ones are UTC, as
    the store's columns are) and named in ``datetime_fields`` so a client can restore them."""
    rows = [r for r in result if isinstance(r, dict)] if isinstance(result, list) else []
    fields = sorted({k for row in rows for k, v in row.items() if isinstance(v, dt.datetime)})
    return {"query": name, "result": result, "datetime_fields": fields}


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=str, option=orjson.OPT_NAIVE_UTC)


def _labels(**labels: object) -> str:
    def esc(v: object) -> str:
        return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items()) + "}"


# (name, type, help, Counters attribute) of the unlabelled metrics
SCALAR_METRICS = (
    ("inferwatch_events_total", "counter", "Events decoded and stored.", "events_total"),
    ("inferwatch_findings_total", "counter", "Findings written.", "findings_total"),
    ("inferwatch_alerts_total", "counter", "Alerts raised.", "alerts_total"),
    ("inferwatch_late_events_total", "counter", "Events later than allowed.", "late_events_total"),
    ("inferwatch_lost_events_total", "counter", "Events dropped unstored.", "lost_events_total"),
    ("inferwatch_checkpoints_total", "counter", "Checkpoints completed.", "checkpoints_total"),
    (
        "inferwatch_checkpoint_seconds",
        "gauge",
        "Duration of the last checkpoint.",
        "last_checkpoint_s",
    ),
    ("inferwatch_batch_seconds", "gauge", "Duration of the last batch.", "last_batch_s"),
    (
        "inferwatch_event_id_window_seconds",
        "gauge",
        "How far back in event time a reused event_id is caught.",
        "event_id_window_s",
    ),
    ("inferwatch_sink_paused", "gauge", "1 while the store is down (input paused).", "sink_paused"),
    (
        "inferwatch_sink_failures_total",
        "counter",
        "Checkpoint writes failed with a transient store error.",
        "sink_failures_total",
    ),
)


def metrics_text(c: Counters, lag: Mapping[Any, Any]) -> str:
    """Prometheus text format 0.0.4: HELP and TYPE, then one sample per line."""
    lines: list[str] = []

    def family(name: str, kind: str, text: str, samples: list[tuple[str, Any]]) -> None:
        lines.extend((f"# HELP {name} {text}", f"# TYPE {name} {kind}"))
        for labels, value in samples:
            value = int(value) if isinstance(value, bool) else value
            lines.append(f"{name}{labels} {value if type(value) is int else repr(float(value))}")

    for name, kind, text, attribute in SCALAR_METRICS:
        family(name, kind, text, [("", getattr(c, attribute))])
    # copies first: the worker thread mutates these dicts while we read them
    rejects, stages, lags = sorted(c.rejects_total.items()), sorted(c.stage_s.items()), dict(lag)
    family(
        "inferwatch_rejects_total",
        "counter",
        "Messages rejected to the dead-letter table, by reason.",
        [(_labels(reason=r), n) for r, n in rejects],
    )
    family(
        "inferwatch_deliveries_refused_total",
        "counter",
        "Alert deliveries a receiver refused, by route; kept in the outbox until "
        "`inferwatch outbox retry`.",
        [(_labels(route=r), n) for r, n in sorted(c.deliveries_refused_total.items())],
    )
    family(
        "inferwatch_consumer_lag_messages",
        "gauge",
        "Messages behind the end of each partition.",
        [(_labels(partition=p), n) for p, n in sorted(lags.items())],
    )
    family(
        "inferwatch_stage_seconds_total",
        "counter",
        "Time spent in each pipeline stage; detector:NAME and snapshot:NAME are each "
        "detector's part of the detectors and checkpoint_prepare stages.",
        [(_labels(stage=s), secs) for s, secs in stages],
    )
    return "\n".join(lines) + "\n"


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    api: ApiServer


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    server_version = "inferwatch"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the worker's terminal shows its progress bar, not an access log."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        api = self.server.api
        try:
            host = self.headers.get("Host", "").rsplit(":", 1)[0]
            if host not in LOOPBACK_HOSTS:  # a DNS-rebinding page names its own host
                raise HttpError(403, f"host {host!r} refused; use {HOST}")
            url = urllib.parse.urlsplit(self.path)
            if method == "GET" and url.path == "/metrics":
                self._send(200, api.metrics().encode(), METRICS_CONTENT_TYPE)
                return
            scheme, _, token = self.headers.get("Authorization", "").partition(" ")
            if scheme != "Bearer" or not hmac.compare_digest(token.encode(), api.token.encode()):
                raise HttpError(401, "missing or wrong token (see api.json beside the store)")
            query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
            body = self._body() if method == "POST" else None
            status, payload = api.route(method, url.path, query, body)
            self._send(status, _dumps(payload), "application/json")
        except HttpError as exc:
            self._send(exc.status, _dumps({"error": exc.message}), "application/json")
        except TransientStoreError as exc:
            self._send(503, _dumps({"error": redact(str(exc))}), "application/json")
        except Exception as exc:
            # This request fails loudly; ingestion, on its own thread, is not affected.
            sys.stderr.write(redact(traceback.format_exc()))
            error = {"error": redact(f"internal error: {type(exc).__name__}: {exc}")}
            self._send(500, _dumps(error), "application/json")

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise HttpError(411, "a JSON body with Content-Length is required")
        if int(length) > MAX_BODY_BYTES:
            raise HttpError(413, f"body over {MAX_BODY_BYTES} bytes")
        try:
            return orjson.loads(self.rfile.read(int(length)))
        except orjson.JSONDecodeError as exc:
            raise HttpError(400, f"body is not JSON: {exc}") from None

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class ApiServer:
    """The loopback HTTP server of one worker; ``start()`` then ``stop()`` (idempotent)."""

    def __init__(self, worker: ServedWorker, directory: Path | None, port: int = 0) -> None:
        self.worker = worker
        self.directory = directory
        self.token = secrets.token_urlsafe(32)
        self._http = _HttpServer((HOST, port), _Handler)
        self._http.api = self
        self.port: int = self._http.server_address[1]
        self._thread: threading.Thread | None = None
        self._states: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._states_lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._http.serve_forever, name="inferwatch-api", daemon=True
        )
        self._thread.start()
        if self.directory is not None:
            write_api_file(self.directory, ApiInfo(os.getpid(), self.port, self.token))

    def stop(self) -> None:
        if self.directory is not None:
            try:
                info = read_api_file(self.directory)
            except ApiError:
                info = None  # not ours to remove: we write it whole or not at all
            if info is not None and info.token == self.token:
                (self.directory / API_FILE).unlink(missing_ok=True)
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join()
            self._thread = None
        self._http.server_close()

    def metrics(self) -> str:
        lag: Mapping[Any, Any] = self.worker.source.lag()
        return metrics_text(self.worker.counters, lag)

    def route(
        self, method: str, path: str, query: Mapping[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        parts = [urllib.parse.unquote(part) for part in path.strip("/").split("/")]
        if method == "GET" and len(parts) == 3 and parts[:2] == ["v1", "query"]:
            params = query_parameters(parts[2], query)
            try:
                rows = query_function(parts[2])(self.worker.store, **params)
            except ValueError as exc:  # a bad parameter value, e.g. --since
                raise HttpError(400, str(exc)) from None
            return 200, encode_result(parts[2], rows)
        if method == "POST" and parts == ["v1", "commands"]:
            return 202, self.submit(body)
        if method == "GET" and len(parts) == 3 and parts[:2] == ["v1", "commands"]:
            with self._states_lock:
                state = self._states.get(parts[2])
                if state is None:
                    raise HttpError(404, f"no command {parts[2]!r} (only the last are kept)")
                return 200, dict(state)
        raise HttpError(
            404, f"no route {method} {path}; try GET /v1/query/<name>, POST /v1/commands, /metrics"
        )

    def submit(self, body: Any) -> dict[str, Any]:
        """Validate a command, queue it for the worker's next checkpoint, return its state."""
        if not isinstance(body, dict) or not isinstance(body.get("command"), str):
            raise HttpError(400, 'expected {"command": name, "args": {...}}')
        if set(body) - {"command", "args"}:
            raise HttpError(400, f"unexpected keys {sorted(set(body) - {'command', 'args'})}")
        name, args = body["command"], body.get("args", {})
        spec = COMMANDS.get(name)
        if spec is None:
            raise HttpError(400, f"unknown command {name!r}; known: {', '.join(sorted(COMMANDS))}")
        if not isinstance(args, dict) or set(args) - set(spec.args):
            raise HttpError(
                400, f"command {name!r} takes args {{{', '.join(spec.args)}}}, got {args!r}"
            )
        if spec.check is not None:
            try:
                spec.check(self.worker, args)
            except ValueError as exc:
                raise HttpError(400, f"command {name!r}: {exc}") from None
        state: dict[str, Any] = {"id": secrets.token_hex(8), "command": name, "state": "pending"}
        with self._states_lock:
            self._states[state["id"]] = state
            while len(self._states) > KEPT_COMMANDS:
                self._states.popitem(last=False)

        def run(worker: Any) -> None:
            # On the worker's thread, inside its checkpoint: whatever this command meets, it
            # is reported to whoever sent it, and the checkpoint goes on (CommandSpec).
            try:
                spec.apply(worker, args)
            except ValueError as exc:  # no longer valid: the store changed since the check
                state.update(state="rejected", error=f"command {name!r}: {exc}")
            except TransientStoreError as exc:
                state.update(state="failed", error=f"the store is unavailable ({exc}); retry")
            except Exception as exc:
                traceback.print_exc()
                state.update(state="failed", error=f"internal error: {type(exc).__name__}: {exc}")
            else:
                state["state"] = "applied"

        answer = dict(state)  # as submitted: the worker may apply it before we reply
        self.worker.commands.append(run)
        if spec.checkpoint_soon:
            self.worker.request_checkpoint()
        return answer


def serve_api(worker: ServedWorker) -> ApiServer:
    """Start ``worker``'s loopback API (queries, commands, metrics) in a daemon thread; the
    caller stops it (``.stop()``) before closing the store. Writes ``DIR/api.json`` for the
    CLI. The API depends on the worker, never the other way round."""
    server = ApiServer(worker, worker.store.directory)
    server.start()
    return server
