"""``inferwatch reference list|show|set``: each model version's reference, and replacing one.

    inferwatch reference list [--format table|jsonl|csv] [--store ...]
    inferwatch reference show --model M [--version V] [--format ...] [--store ...]
    inferwatch reference set --model M [--version V] --from FILE.csv|FILE.parquet [--store ...]
    inferwatch reference set --model M [--version V] --range FROM..TO [--store ...]

``list`` gives every (model, version) its state: ``building`` (events of the target, callers,
the callers over their share and why it has not frozen, as of the worker's last checkpoint) or
``frozen`` with its source (``auto``, or ``operator`` for a file or range). ``show`` gives one
model's versions with every field. Both go through the running worker's API when a worker owns
the store, else open it.

``--range`` takes the version's successful events stored between two RFC 3339 times (``TO``
excluded), in (``ts``, ``event_id``) order, at most 200,000 of them.

Columns of FILE, one row per event the model version was validated on:

- ``score:<label>`` — the score of class ``<label>`` (probabilities or logits, as the model
  emits them); ``label`` — the predicted label; ``value`` — a regression output;
- ``event_id``, ``ts``, ``api_key_id``, ``model_id``, ``model_version`` — ignored;
- every other column is an input feature: numeric columns numeric, text and boolean columns
  categorical.

Each row becomes an inference event v1 and goes through the decoder and the model's feature
index (the one the worker saved, so feature columns and category codes line up with live
traffic) into a reference builder without the per-caller cap: the reference is exactly the
file (or the range). It is written to ``model_references`` (source ``file`` or ``range``) with
a sequence number above every earlier one, so the next worker start uses it for that (model,
version) and ``drift.*`` rebuild their bins from it. An embedded store is refused while a
worker holds it (stop the worker and set it, the worker loads it on start).

Nothing is written unless the whole file (or range) becomes the reference: a row the decoder
rejects, a model the store has never seen (a typo would otherwise create a reference nobody
reads; ``--new-model`` allows one before its first event) or an unreadable file fails with the
reason, and the reference stored before stays in force.
"""

from __future__ import annotations

import math
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from streams.cli.output import text

app = typer.Typer(help="Reference profiles per model version.", no_args_is_help=True)

DEFAULT_STORE = "chdb:./inferwatch-data"
MAX_ROWS = 200_000
IGNORED = {"event_id", "ts", "api_key_id", "model_id", "model_version"}
T0_MS = 946_684_800_000  # 2000-01-01: before any live event, so live traffic always counts


@app.callback()
def reference() -> None:
    """Reference profiles per (model, model version), which drift detectors compare against."""


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV or Parquet file as dicts (pyarrow types: numbers, text, booleans)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    elif suffix == ".csv":
        import pyarrow.csv as pcsv

        table = pcsv.read_csv(path)
    else:
        raise ValueError(f"--from {path}: expected a .csv or .parquet file, found {suffix!r}")
    if table.num_rows == 0:
        raise ValueError(f"--from {path}: no rows")
    if table.num_rows > MAX_ROWS:
        raise ValueError(f"--from {path}: {table.num_rows} rows, at most {MAX_ROWS} are used")
    for name in table.column_names:  # a text value makes a CSV column text: name the culprit
        if (name.startswith("score:") or name == "value") and not _numeric(table[name].type):
            values = table[name].to_pylist()
            row = next((i for i, v in enumerate(values) if v is not None and not _parses(v)), 0)
            raise ValueError(
                f"--from {path}: row {row + 1}, column {name!r}: expected a number, found "
                f"{values[row]!r}"
            )
    rows: list[dict[str, Any]] = table.to_pylist()
    return rows


def _numeric(kind: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind))


def _parses(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def events_of(rows: list[dict[str, Any]], model: str, version: str) -> list[bytes]:
    """One inference event v1 (JSON) per row (module doc for the columns)."""
    import orjson

    out = []
    for i, row in enumerate(rows):
        features: dict[str, Any] = {}
        scores: dict[str, float] = {}
        output: dict[str, Any] = {}
        for key, value in row.items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            if key.startswith("score:"):
                scores[key[len("score:") :]] = _number(value, i, key)
            elif key == "label":
                output["label"] = str(value)
            elif key == "value":
                output["value"] = _number(value, i, key)
            elif key not in IGNORED:
                features[key] = str(value) if isinstance(value, bool) else value
        if scores:
            output["scores"] = scores
        event: dict[str, Any] = {
            "schema_version": 1,
            "event_id": f"reference-{i}",
            "ts": T0_MS + i,
            "model_id": model,
            "api_key_id": "reference-file",
            "input": {"features": features},
        }
        if version:
            event["model_version"] = version
        if output:
            event["output"] = output
        out.append(orjson.dumps(event))
    return out


def _number(value: Any, row: int, column: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"row {row + 1}, column {column!r}: expected a number, found {value!r}")
    return float(value)


def parse_range(text: str) -> tuple[Any, Any]:
    """``FROM..TO``, two RFC 3339 times, as UTC datetimes.

    >>> [t.isoformat() for t in parse_range("2026-01-01T00:00:00Z..2026-01-02T00:00:00+00:00")]
    ['2026-01-01T00:00:00+00:00', '2026-01-02T00:00:00+00:00']
    """
    import datetime as dt

    parts = text.split("..")
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = (dt.datetime.fromisoformat(p.replace("Z", "+00:00")) for p in parts)
        if lo.tzinfo is None or hi.tzinfo is None or not lo < hi:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"--range {text!r}: expected FROM..TO, two RFC 3339 times with an offset, FROM < TO"
        ) from None
    return lo.astimezone(dt.UTC), hi.astimezone(dt.UTC)


def stored_rows(st: Any, model: str, version: str, lo: Any, hi: Any) -> list[dict[str, Any]]:
    """The version's successful stored events in [lo, hi) as rows of the file convention."""
    result = st.query(
        "SELECT features, categories, scores, output_label, output_value, vector "
        "FROM events FINAL WHERE model_id = {m:String} AND model_version = {v:String} "
        "AND status < 400 AND ts >= {lo:DateTime64(3)} AND ts < {hi:DateTime64(3)} "
        f"ORDER BY ts, event_id LIMIT {MAX_ROWS + 1}",
        {"m": model, "v": version, "lo": lo.replace(tzinfo=None), "hi": hi.replace(tzinfo=None)},
    ).result_rows
    if len(result) > MAX_ROWS:
        raise ValueError(f"more than {MAX_ROWS} events in the range; narrow it")
    rows = []
    for features, categories, scores, label, value, vector in result:
        row: dict[str, Any] = {**dict(features), **dict(categories)}
        row.update({f"v{i}": float(x) for i, x in enumerate(vector)})
        row.update({f"score:{k}": v for k, v in dict(scores).items()})
        if label:
            row["label"] = label
        if value == value:  # not NaN
            row["value"] = value
        rows.append(row)
    if not rows:
        raise ValueError(f"no successful events of {model} version {version!r} in the range")
    return rows


def build_reference(rows: list[dict[str, Any]], model: str, version: str, index: Any = None) -> Any:
    """The :class:`~detectors.models.reference.Reference` of ``rows`` (the whole file, no caller
    cap)."""
    from detectors.models.reference_store import ReferenceStore
    from detectors.models.routing import FeatureIndex, route
    from schemas.decode import decode

    decoded = decode(events_of(rows, model, version))
    if decoded.rejects:
        first = decoded.rejects[0]
        raise ValueError(f"{len(decoded.rejects)} rows rejected, first: {first}")
    index = index if index is not None else FeatureIndex()
    store = ReferenceStore(n_events=len(rows), max_caller_share=1.0)
    frozen = store.update(decoded.batch, route(decoded.batch, index))
    if len(frozen) != 1:
        raise ValueError(f"expected one reference from {len(rows)} rows, built {len(frozen)}")
    return frozen[0]


def _saved_index(st: Any) -> Any:
    from detectors.models.routing import FeatureIndex
    from streams.worker.checkpoint import ROUTING

    index = FeatureIndex()
    rows = st.query(
        "SELECT argMax(data, seq) FROM detector_state WHERE detector = '_pipeline' AND key = "
        "{k:String} GROUP BY key",
        {"k": ROUTING},
        binary=True,
    ).result_rows
    if rows:
        index.restore(bytes(rows[0][0]))
    return index


def known_models(st: Any) -> list[str]:
    """Models the store has seen: in stored events or with a stored reference."""
    rows = st.query(
        "SELECT model_id FROM (SELECT DISTINCT model_id FROM events UNION DISTINCT "
        "SELECT DISTINCT model_id FROM model_references) ORDER BY model_id"
    ).result_rows
    return [str(r[0]) for r in rows]


def write_reference(st: Any, reference: Any, source: str) -> int:
    """Insert ``reference`` above every earlier row of ``model_references``; its ``seq``."""
    import pyarrow as pa

    from streams.worker.checkpoint import committed_seq

    top = st.query("SELECT max(seq) FROM model_references").result_rows[0][0] or 0
    seq = max(int(top), committed_seq(st)) + 1
    st.insert_arrow(
        "model_references",
        pa.table(
            {
                "model_id": [reference.model_id],
                "model_version": [reference.model_version],
                "n_events": pa.array([reference.n_events], pa.uint64()),
                "source": [source],
                "data": pa.array([reference.to_bytes()], pa.binary()),
                "created_at": pa.array([int(time.time() * 1000)], pa.timestamp("ms")),
                "seq": pa.array([seq], pa.uint64()),
            }
        ),
    )
    return seq


class ListFormat(StrEnum):
    table = "table"
    jsonl = "jsonl"
    csv = "csv"


StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar="INFERWATCH_STORE",
        help=f"chdb:DIR or http(s)://...; default store.dsn of the config, else {DEFAULT_STORE}.",
    ),
]
LIST_COLUMNS = ["model_id", "model_version", "state", "source", "events", "callers"]


def _shown(rows: list[dict[str, Any]], fmt: ListFormat) -> list[dict[str, Any]]:
    """Rows as printed: the table gets "n of N" and the capped callers as text."""
    if fmt is not ListFormat.table:
        return rows
    return [
        {
            **r,
            "model_version": r["model_version"] or "-",
            "source": r["source"] or "-",
            "events": f"{r['events']:,} of {r['target']:,}",
            "callers": f"{r['callers']}"
            + (f" (capped: {', '.join(r['capped_callers'])})" if r["capped_callers"] else ""),
        }
        for r in rows
    ]


@app.command("list")
def list_references(
    store: StoreOption = None,
    fmt: Annotated[ListFormat, typer.Option("--format")] = ListFormat.table,
) -> None:
    """Every (model, version): building (events of the target, callers, capped callers) or
    frozen, and its source (auto or operator)."""
    from streams.cli.common import query
    from streams.cli.output import Format, emit

    rows = query(store, "references")
    emit(_shown(rows, fmt), Format(fmt.value), [*LIST_COLUMNS, "detail"])


@app.command("show")
def show_reference(
    model: Annotated[str, typer.Option(help="model_id.")],
    version: Annotated[str | None, typer.Option(help="model_version (default: all).")] = None,
    store: StoreOption = None,
    fmt: Annotated[ListFormat, typer.Option("--format")] = ListFormat.table,
) -> None:
    """One model's reference per version, every field."""
    from streams.cli.common import query
    from streams.cli.output import Format, emit, text

    rows = query(store, "references", model=model, version=version)
    if not rows:
        known = sorted({r["model_id"] for r in query(store, "references")})
        _fail(
            f"no reference or reference build for model {model!r}"
            + (f" version {version!r}" if version is not None else "")
            + f"; known: {', '.join(known) or '(none)'}"
        )
    if fmt is not ListFormat.table:
        emit(rows, Format(fmt.value), list(rows[0]))
        return
    for row in rows:
        width = max(len(k) for k in row)
        for key, value in row.items():
            typer.echo(f"{key:<{width}}  {text(value)}")
        typer.echo("")


@app.command("set")
def set_reference(
    model: Annotated[str, typer.Option(help="model_id whose reference to replace.")],
    from_file: Annotated[
        Path | None,
        typer.Option("--from", help="CSV or Parquet file, one row per reference event."),
    ] = None,
    time_range: Annotated[
        str | None,
        typer.Option("--range", help="FROM..TO: the version's stored events in that time range."),
    ] = None,
    version: Annotated[str, typer.Option(help="model_version (empty: unversioned).")] = "",
    new_model: Annotated[
        bool,
        typer.Option(
            "--new-model", help="Allow a model with no stored events or reference yet (--from)."
        ),
    ] = False,
    store: Annotated[
        str, typer.Option("--store", envvar="INFERWATCH_STORE", help="chdb:DIR or http(s)://...")
    ] = DEFAULT_STORE,
) -> None:
    """Replace the reference of (MODEL, VERSION) with the rows of a CSV or Parquet file
    (--from), or with the version's stored events in a time range (--range FROM..TO, RFC 3339,
    TO excluded). File columns: score:LABEL are class scores, label the predicted label, value
    a regression output, every other column an input feature. Nothing is written if any row is
    refused. Stop the worker first; it loads the new reference when it starts."""
    from streams.store.store import Store, StoreError, StoreInUseError, TransientStoreError

    if (from_file is None) == (time_range is None):
        _fail("give exactly one of --from FILE and --range FROM..TO")
    rows: list[dict[str, Any]] = []
    span: tuple[Any, Any] | None = None
    try:
        if from_file is not None:
            if not from_file.is_file():
                raise ValueError(f"--from {from_file}: no such file")
            rows = read_rows(from_file)
        else:
            span = parse_range(str(time_range))
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    from streams.cli.common import load_config

    password = load_config(None).store_password  # INFERWATCH_STORE_PASSWORD[_FILE]
    try:
        st = Store(store, password=password)
    except StoreInUseError as exc:
        _fail(f"{exc}; stop that worker, set the reference, start it again (it loads it)")
    except (StoreError, TransientStoreError) as exc:
        _fail(str(exc))
    try:
        try:
            known = known_models(st)
            if model not in known and not (new_model and span is None):
                hint = "" if span is not None else "; --new-model sets one before its first event"
                raise ValueError(
                    f"unknown model {model!r}: the store has no events or reference of it; "
                    f"known models: {', '.join(map(text, known)) or '(none)'}{hint}"
                )
            if span is not None:
                rows = stored_rows(st, model, version, *span)
            reference = build_reference(rows, model, version, _saved_index(st))
        except ValueError as exc:
            _fail(str(exc))
        seq = write_reference(st, reference, "file" if span is None else "range")
    finally:
        st.close()
    typer.echo(
        f"reference of {text(model)} version {text(version) or '(none)'}: "
        f"{reference.n_events:,} events, {len(reference.feature_names)} features, score type "
        f"{reference.score_type}, channels {', '.join(map(text, reference.channels)) or '-'}; "
        f"stored (seq {seq}) in {store}"
    )
