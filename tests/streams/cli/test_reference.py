"""``inferwatch reference set``: a file becomes the reference the worker loads for a version."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from streams.cli.main import app as main_app
from streams.cli.reference import app, build_reference
from streams.store.store import Store
from streams.worker.checkpoint import load_references


def table(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    p = rng.beta(2, 5, n)
    return pa.table(
        {
            "event_id": [f"x{i}" for i in range(n)],
            "income": rng.normal(50, 10, n),
            "country": rng.choice(["de", "fr", "uk"], n).tolist(),
            "score:no": 1 - p,
            "score:yes": p,
        }
    )


def test_reference_set_stores_a_file_reference_that_replaces_the_version(tmp_path: Path) -> None:
    csv, parquet = tmp_path / "ref.csv", tmp_path / "ref.parquet"
    pcsv.write_csv(table(500, 1), csv)
    pq.write_table(table(800, 2), parquet)
    store = f"chdb:{tmp_path / 'store'}"
    runner = CliRunner()
    for path, version in ((csv, "1"), (parquet, "1"), (parquet, "2")):
        res = runner.invoke(
            app,
            ["set", "--model", "m", "--version", version, "--from", str(path), "--store", store]
            + (["--new-model"] if path == csv else []),  # no events of "m" yet
        )
        assert res.exit_code == 0, res.output
    assert "800 events" in res.output and "score type probability" in res.output
    with Store(store) as st:
        refs = {(r.model_id, r.model_version): r for r in load_references(st)}
    assert sorted(refs) == [("m", "1"), ("m", "2")]
    ref = refs[("m", "1")]  # the later file wins
    assert ref.n_events == 800 and ref.feature_names == ("income", "country")
    assert ref.categorical == (False, True) and ref.channels == ("score",)
    assert ref.complete and ref.callers == 1


def stored(store: str) -> list[tuple[str, str, int, int]]:
    with Store(store) as st:
        rows = st.query(
            "SELECT model_id, model_version, n_events, seq FROM model_references ORDER BY seq"
        ).result_rows
    return [(str(m), str(v), int(n), int(q)) for m, v, n, q in rows]


def test_reference_set_refuses_bad_arguments_and_keeps_the_stored_reference(
    tmp_path: Path,
) -> None:
    store = f"chdb:{tmp_path / 'store'}"
    good = tmp_path / "ref.parquet"
    pq.write_table(table(300, 4), good)
    runner = CliRunner()
    base = ["reference", "set", "--model", "m", "--version", "1", "--store", store]
    res = runner.invoke(main_app, [*base, "--from", str(good), "--new-model"])  # via inferwatch
    assert res.exit_code == 0, res.output
    before = stored(store)
    assert [r[:3] for r in before] == [("m", "1", 300)]
    json_file, empty, typo = tmp_path / "ref.json", tmp_path / "empty.csv", tmp_path / "typo.csv"
    json_file.write_text("{}")
    empty.write_text("income,score:yes\n")
    bad = table(40, 5).to_pylist()
    bad[17]["score:yes"] = "high"  # one bad row among good ones: the whole file is refused
    pcsv.write_csv(pa.Table.from_pylist([{k: str(v) for k, v in r.items()} for r in bad]), typo)
    cases = [
        (["--from", str(tmp_path / "missing.csv")], "no such file"),
        (["--from", str(json_file)], "expected a .csv or .parquet"),
        (["--from", str(empty)], "no rows"),
        (["--from", str(typo)], "row 18, column 'score:yes': expected a number, found 'high'"),
        (["--range", "yesterday"], "expected FROM..TO"),
        (["--range", "2026-01-02T00:00:00Z..2026-01-01T00:00:00Z"], "FROM < TO"),
        (["--range", "2026-01-01T00:00:00..2026-01-02T00:00:00"], "with an offset"),
        ([], "give exactly one of --from FILE and --range"),
        (["--from", str(good), "--range", "2026-01-01T00:00:00Z..2026-01-02T00:00:00Z"], "one of"),
    ]
    for args, message in cases:
        res = runner.invoke(main_app, [*base, *args])
        assert res.exit_code == 2 and message in res.output, (args, res.output)
    other = ["reference", "set", "--model", "mm", "--store", store, "--from", str(good)]
    res = runner.invoke(main_app, other)  # a typo of the model: not created
    assert res.exit_code == 2 and "unknown model 'mm'" in res.output, res.output
    assert "known models: m;" in res.output and "--new-model" in res.output
    span = ["--range", "2026-01-01T00:00:00Z..2026-01-02T00:00:00Z"]
    res = runner.invoke(main_app, [*other[:-2], *span, "--new-model"])
    assert res.exit_code == 2 and "unknown model 'mm'" in res.output, res.output
    assert stored(store) == before  # nothing written by any refused command
    ref = build_reference(table(50, 3).to_pylist(), "m", "")
    assert ref.n_events == 50 and ref.model_version == ""


def test_reference_command_is_listed_with_its_help() -> None:
    res = CliRunner().invoke(main_app, ["reference", "set", "--help"])
    assert res.exit_code == 0
    for option in ("--model", "--version", "--from", "--range", "--new-model", "--store"):
        assert option in res.output


def test_reference_set_from_a_range_of_stored_events(tmp_path: Path) -> None:
    import orjson

    from streams.sources.base import FileSource
    from streams.worker.loop import Worker

    rng = np.random.default_rng(5)
    t0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
    path = tmp_path / "events.jsonl"
    lines = []
    for i in range(3_000):
        p = float(rng.beta(2, 5))
        event = {
            "schema_version": 1,
            "event_id": f"e{i}",
            "ts": t0 + i * 1_000,
            "model_id": "m",
            "model_version": "2",
            "api_key_id": f"k{i % 50}",
            "input": {"features": {"x": float(rng.normal()), "c": ["a", "b"][i % 2]}},
            "output": {"scores": {"no": 1 - p, "yes": p}},
        }
        lines.append(orjson.dumps(event))
    path.write_bytes(b"\n".join(lines) + b"\n")
    store = f"chdb:{tmp_path / 'store'}"
    with Store(store) as st:
        source = FileSource(path)
        Worker(st, source, []).run()
        source.close()
    args = ["set", "--model", "m", "--version", "2", "--store", store]
    span = "2026-01-01T00:10:00Z..2026-01-01T00:30:00Z"  # events 600 .. 1,799
    res = CliRunner().invoke(app, [*args, "--range", span])
    assert res.exit_code == 0, res.output
    with Store(store) as st:
        (ref,) = [r for r in load_references(st) if r.model_version == "2"]
    assert ref.n_events == 1_200 and set(ref.feature_names) == {"x", "c"}
    assert ref.channels == ("score",) and ref.first_ts_ms < ref.last_ts_ms
    res = CliRunner().invoke(app, [*args, "--range", "2027-01-01T00:00:00Z..2027-01-02T00:00:00Z"])
    assert res.exit_code == 2 and "no successful events" in res.output
    res = CliRunner().invoke(app, [*args, "--range", "yesterday"])
    assert res.exit_code == 2 and "expected FROM..TO" in res.output


@pytest.mark.slow  # a worker over 6,000 events and five commands on chdb: about 7 s
def test_reference_list_and_show_give_each_version_its_state(tmp_path: Path) -> None:
    """A one-caller model has a reference (auto); a flooded one is building with its capped
    caller; an operator's file reference says so; the worker raised the blind spot."""
    import orjson

    from detectors.drift.psi.detector import PSI
    from detectors.pipeline.detection_blind import DetectionBlind
    from streams.sources.base import FileSource
    from streams.worker.loop import Worker

    t0 = 1_767_225_600_000
    lines = []
    for i in range(3_000):
        for model, key in (
            ("solo", "svc-batch"),
            ("flooded", "key_app" if i % 50 == 0 else "key_flood"),
        ):
            event = {
                "schema_version": 1, "event_id": f"{model}-{i}", "ts": t0 + i * 1_000,
                "model_id": model, "api_key_id": key, "input": {"features": {"x": i % 7}},
                "output": {"scores": {"no": 0.7, "yes": 0.3}},
            }  # fmt: skip
            lines.append(orjson.dumps(event))
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    store = f"chdb:{tmp_path / 'store'}"
    with Store(store) as st:
        source = FileSource(path)
        Worker(st, source, [DetectionBlind(after_events=2_500), PSI()]).run()
        source.close()
        blind = st.query(
            "SELECT entity, status FROM alerts FINAL WHERE detector = 'pipeline.detection_blind'"
        ).result_rows
    assert blind == [("flooded", "firing")]
    runner = CliRunner()
    pq.write_table(table(300, 4), tmp_path / "ref.parquet")
    res = runner.invoke(
        app, ["set", "--model", "other", "--from", str(tmp_path / "ref.parquet"), "--store",
              store, "--new-model"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    res = runner.invoke(main_app, ["reference", "list", "--format", "jsonl", "--store", store])
    assert res.exit_code == 0, res.output
    rows = {r["model_id"]: r for r in map(orjson.loads, res.output.splitlines())}
    assert {m: (r["state"], r["source"]) for m, r in rows.items()} == {
        "flooded": ("building", ""),
        "other": ("frozen", "operator (file)"),
        "solo": ("frozen", "auto"),
    }
    assert (rows["solo"]["events"], rows["solo"]["events_seen"], rows["solo"]["callers"]) == (
        2_000, 2_000, 1,
    )  # fmt: skip
    building = rows["flooded"]
    assert (building["events"], building["target"], building["callers"]) == (1_060, 2_000, 2)
    assert building["capped_callers"] == ["key_flood"] and building["events_seen"] == 3_000
    assert "waiting for the other callers' events" in building["detail"]
    table_out = runner.invoke(main_app, ["reference", "list", "--store", store]).output
    assert "1,060 of 2,000" in table_out and "capped: key_flood" in table_out
    shown = runner.invoke(app, ["show", "--model", "flooded", "--store", store])
    assert shown.exit_code == 0 and "state" in shown.output and "building" in shown.output
    missing = runner.invoke(app, ["show", "--model", "nope", "--store", store])
    assert missing.exit_code == 2 and "known: flooded, other, solo" in missing.output
