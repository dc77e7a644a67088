"""Which reference a worker uses for a model version: an operator's (``reference set``) beats
the worker's automatic one whatever their sequence numbers, on a fresh store too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pcsv
from typer.testing import CliRunner

from detectors.registry import create_all
from streams.cli.reference import app, build_reference, write_reference
from streams.sources.base import FileSource
from streams.store.store import Store
from streams.worker import checkpoint
from streams.worker.checkpoint import load_references
from streams.worker.loop import Worker, WorkerSettings

T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
SETTINGS = WorkerSettings(batch_max=500, checkpoint_events=1_000, checkpoint_s=3600)


def reference_rows(n: int, mean: float, seed: int) -> list[dict[str, Any]]:
    """Rows of a reference file: one feature ``x`` ~ N(mean, 1) and two-class scores."""
    rng = np.random.default_rng(seed)
    p = rng.beta(2, 5, n)
    x = rng.normal(mean, 1.0, n)
    return [{"x": float(x[i]), "score:no": 1 - p[i], "score:yes": p[i]} for i in range(n)]


def live_events(path: Path, n: int, mean: float, seed: int) -> None:
    """``n`` live events of model ``m`` version ``1``, from 100 callers, ``x`` ~ N(mean, 1)."""
    rng = np.random.default_rng(seed)
    lines = []
    for i, row in enumerate(reference_rows(n, mean, seed)):
        event = {
            "schema_version": 1,
            "event_id": f"e{seed}-{i}",
            "ts": T0_MS + i * 500,
            "model_id": "m",
            "model_version": "1",
            "api_key_id": f"k{int(rng.integers(100))}",
            "input": {"features": {"x": row["x"]}},
            "output": {"scores": {"no": float(row["score:no"]), "yes": float(row["score:yes"])}},
        }
        lines.append(orjson.dumps(event))
    path.write_bytes(b"\n".join(lines) + b"\n")


def run(store: Store, path: Path, progress: Any = None) -> Worker:
    source = FileSource(path)
    try:
        worker = Worker(store, source, create_all(), SETTINGS)
        worker.run(progress)
    finally:
        source.close()
    return worker


def drift_alerts(store: Store) -> list[tuple[str, str]]:
    return [
        (str(d), str(m))
        for d, m in store.query(
            "SELECT detector, model_id FROM alerts FINAL WHERE startsWith(detector, 'drift.')"
        ).result_rows
    ]


def test_reference_set_on_a_fresh_store_is_the_one_the_first_run_uses(tmp_path: Path) -> None:
    """``reference set --new-model`` before any run, reference N(100, 1), live traffic N(0, 1):
    the first run compares against the operator's reference and raises drift."""
    csv = tmp_path / "ref.csv"
    pcsv.write_csv(pa.Table.from_pylist(reference_rows(2_000, 100.0, 1)), csv)
    store = f"chdb:{tmp_path / 'store'}"
    args = ["set", "--model", "m", "--version", "1", "--from", str(csv), "--new-model"]
    res = CliRunner().invoke(app, [*args, "--store", store])
    assert res.exit_code == 0, res.output
    events = tmp_path / "live.jsonl"
    live_events(events, 3_000, 0.0, 2)
    with Store(store) as st:
        (operator_seq,) = [r[0] for r in st.query("SELECT seq FROM model_references").result_rows]
        run(st, events)
        assert checkpoint.committed_seq(st) > operator_seq, "the run's seqs come after it"
        assert st.query("SELECT count() FROM model_references").result_rows[0][0] == 1
        (ref,) = load_references(st)
        alerts = drift_alerts(st)
    assert ref.n_events == 2_000 and ref.sample_features.mean() > 90
    assert ("drift.features", "m") in alerts, alerts


def test_an_operators_reference_beats_a_later_automatic_one_and_survives_merges(
    tmp_path: Path,
) -> None:
    """The operator sets a reference while a worker runs (a store shared over the network): the
    worker, which has not loaded it, freezes its own later, under a larger seq. The next start
    uses the operator's, also after the table merged its rows."""
    events = tmp_path / "live.jsonl"
    live_events(events, 3_000, 0.0, 3)
    operator = build_reference(reference_rows(1_000, 100.0, 4), "m", "1")
    set_at: list[int] = []

    def set_reference_meanwhile(worker: Worker) -> None:
        if not set_at:
            set_at.append(write_reference(worker.store, operator, "file"))

    with Store(f"chdb:{tmp_path / 'store'}") as st:
        run(st, events, set_reference_meanwhile)
        rows = st.query("SELECT automatic, seq FROM model_references ORDER BY seq").result_rows
        assert [a for a, _ in rows] == [0, 1] and rows[1][1] > set_at[0], rows
        st.command("OPTIMIZE TABLE model_references FINAL")
        (ref,) = load_references(st)
    assert ref.to_bytes() == operator.to_bytes()


def test_a_checkpoint_that_never_completed_leaves_no_automatic_reference(tmp_path: Path) -> None:
    """Rows above the committed checkpoint are dropped at start: an automatic reference of a
    checkpoint that died before its positions were saved goes (the replay builds it again), an
    operator's set meanwhile stays, and the next seq comes after both."""
    auto = build_reference(reference_rows(500, 0.0, 5), "m", "1")
    operator = build_reference(reference_rows(500, 100.0, 6), "m", "2")
    with Store(f"chdb:{tmp_path / 'store'}") as st:
        table = {
            "model_id": ["m"],
            "model_version": ["1"],
            "n_events": pa.array([500], pa.uint64()),
            "source": ["auto"],
            "data": pa.array([auto.to_bytes()], pa.binary()),
            "created_at": pa.array([T0_MS], pa.timestamp("ms")),
            "seq": pa.array([4], pa.uint64()),
            "automatic": pa.array([1], pa.uint8()),
        }
        st.insert_arrow("model_references", pa.table(table))
        operator_seq = write_reference(st, operator, "file")
    with Store(f"chdb:{tmp_path / 'store'}") as st:
        checkpoint.begin(st)
        refs = [(r.model_version, r.n_events) for r in load_references(st)]
        assert refs == [("2", 500)]
        assert st.next_seq == operator_seq + 1
