"""The configuration file (issue 5, item 2): TOML checked against its JSON Schema, INFERWATCH_*
overrides, the model inventory reaching the worker, and a clear error for every way it can be
wrong, before anything is consumed."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from detectors.registry import create_all
from streams.sim.simulate import write as simulate_write
from streams.store.store import Store
from streams.worker.loop import WorkerSettings
from streams.worker.settings import SCHEMA_PATH, ConfigError, load
from tests.support.cli import run_cli

FULL = """
[store]
dsn = "chdb:/tmp/elsewhere"

[worker]
batch_size = 2000
checkpoint_s = 2.5
lateness_s = 30

[routes.webhook]
url = "https://soc.example.bank/hooks/inferwatch"

[detectors."abuse.rate_spike"]
k_sigma = 8
min_count = 20

[detectors."extraction.query_pattern"]
enabled = false

[models.fraud]
owner = "fraud-ml@bank"
criticality = "critical"
score_type = "logit"
countries = ["GB", "FR"]
canaries = ["CANARY-7f3a9c"]
expected_callers = ["svc-payments"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inferwatch.toml"
    path.write_text(text)
    return path


def test_schema_is_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA_PATH.read_text()))


def test_no_file_gives_the_shipped_defaults() -> None:
    cfg = load(None, {})
    assert cfg.path is None and cfg.store_dsn == "chdb:./inferwatch-data"
    assert cfg.worker_settings() == WorkerSettings()
    assert cfg.webhook is None and cfg.detectors == {} and cfg.models == {}


def test_a_full_file_reaches_worker_detectors_and_inventory(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, FULL), {})
    settings = cfg.worker_settings()
    assert (settings.batch_max, settings.checkpoint_s, settings.lateness_s) == (2000, 2.5, 30)
    assert settings.score_types == {"fraud": "logit"}
    assert settings.criticality == {"fraud": "critical"}
    assert cfg.store_dsn == "chdb:/tmp/elsewhere"
    assert cfg.webhook == {"url": "https://soc.example.bank/hooks/inferwatch"}
    assert cfg.models["fraud"]["criticality"] == "critical"
    rate = next(d for d in create_all(cfg.detectors) if d.name == "abuse.rate_spike")
    assert (rate.k_sigma, rate.min_count) == (8, 20)  # type: ignore[attr-defined]
    assert "extraction.query_pattern" not in {d.name for d in create_all(cfg.detectors)}


def test_flags_beat_environment_beats_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    env = {
        "INFERWATCH_WORKER_BATCH_SIZE": "500",
        "INFERWATCH_WORKER_CHECKPOINT_S": "1.5",
        "INFERWATCH_STORE": "chdb:/tmp/from-env",
        "INFERWATCH_CONFIG": "/nonexistent.toml",  # an explicit path wins over the variable
    }
    cfg = load(path, env)
    assert cfg.worker_settings().batch_max == 500
    assert cfg.worker_settings(batch_max=7, checkpoint_s=None).batch_max == 7
    assert cfg.worker_settings(checkpoint_s=None).checkpoint_s == 1.5
    assert cfg.worker_settings().lateness_s == 30  # from the file
    assert cfg.store_dsn == "chdb:/tmp/from-env"
    assert cfg.overrides["worker.batch_size"] == "INFERWATCH_WORKER_BATCH_SIZE"
    assert load(None, {"INFERWATCH_CONFIG": str(path)}).path == path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[worker\nbatch_size = 1", "not valid TOML"),
        ("[worker]\nbatch_size = 1\nbatch_size = 2", "not valid TOML"),
        ("colour = 1", "(top level): unknown key 'colour'"),
        ("[worker]\nbatch_sise = 3", "unknown key 'batch_sise' (did you mean 'batch_size'?)"),
        ('[worker]\nbatch_size = "big"', "worker.batch_size: 'big' is not of type 'integer'"),
        ("[worker]\nbatch_size = 0", "worker.batch_size: 0 is less than the minimum of 1"),
        ('[worker]\nstore_text = "plain"', "worker.store_text: 'plain' is not one of 'redacted'"),
        ('[routes.webhook]\nurl = "ftp://x"', "routes.webhook.url: 'ftp://x' does not match"),
        ('[routes.webhook]\nca_file = "ca.pem"', "routes.webhook: needs url or url_file"),
        ('[models.fraud]\ncriticality = "huge"', "models.fraud.criticality: 'huge' is not one"),
        ('[models.fraud]\ncountries = ["gb"]', "models.fraud.countries.0: 'gb' does not match"),
        ('[models.fraud]\nscore_type = "prob"', "models.fraud.score_type: 'prob' is not one"),
        ('[detectors."abuse.rate_spyke"]\nk_sigma = 1', "no such detector (did you mean"),
        ('[detectors."abuse.rate_spike"]\nk_sigmaa = 1', "k_sigmaa: no such parameter"),
        ('[detectors."abuse.rate_spike"]\nk_sigma = "high"', "k_sigma: expected a number"),
        ('[detectors."abuse.rate_spike"]\nmin_count = 2.5', "min_count: expected an integer"),
        ('[detectors."abuse.rate_spike"]\nratio = 0.5', "abuse.rate_spike: "),
        ('[detectors."abuse.rate_spike"]\nenabled = "no"', "enabled: expected true or false"),
        ('[detectors."extraction.query_pattern"]\nlattice = 0', "expected 1 <= lattice <= 8000"),
        ('[lifecycle]\ngroup_by = ["colour"]', "lifecycle.group_by.0: 'colour' is not one"),
        ("[lifecycle]\ngroup_wait_s = -1", "lifecycle.group_wait_s: -1 is less than"),
        ('[[silences]]\nmatchers = ["detector=x"]', "silences.0: 'ends' is a required"),
        ('[[silences]]\nmatchers = []\nends = "2030-01-01T00:00:00Z"', "should be non-empty"),
        (
            '[[silences]]\nmatchers = ["colour=red"]\nends = "2030-01-01T00:00:00Z"',
            "unknown label 'colour'",
        ),
        ('[[silences]]\nmatchers = ["detector=x"]\nends = "tomorrow"', "not an RFC 3339 time"),
        ('[[silences]]\nmatchers = ["detector=x"]\nends = "2030-01-01T00:00:00"', "no time zone"),
        ('[routes.webhook]\nurl = "http://x"\nnotify = "pager"', "'pager' is not one of"),
    ],
)
def test_every_way_the_file_can_be_wrong_is_named(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(path, {})
    assert f"config {path}" in str(err.value) and expected in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"INFERWATCH_WORKER_BATCH_SIZE": "many"}, "INFERWATCH_WORKER_BATCH_SIZE='many': expected"),
        ({"INFERWATCH_WORKER_LATENESS_S": "-1"}, "INFERWATCH_WORKER_LATENESS_S: worker.lateness_s"),
        ({"INFERWATCH_WORKER_BATCHSIZE": "5"}, "INFERWATCH_WORKER_BATCHSIZE: no such worker"),
        ({"INFERWATCH_WEBHOOK_URL": "localhost:8080"}, "INFERWATCH_WEBHOOK_URL: routes.webhook"),
        ({"INFERWATCH_CONFIG": "/nonexistent/x.toml"}, "config /nonexistent/x.toml: no such"),
    ],
)
def test_every_way_a_variable_can_be_wrong_is_named(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(None, env)
    assert expected in str(err.value), str(err.value)


def test_a_directory_or_binary_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load(tmp_path, {})
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe[worker]")
    with pytest.raises(ConfigError, match="cannot read it"):
        load(tmp_path / "bin.toml", {})


def test_cli_check_and_run_refuse_a_bad_file_before_consuming_anything(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    simulate_write("quiet", 3_000, 5, events)
    store_dir = tmp_path / "store"
    bad = write(tmp_path, '[worker]\nbatch_size = "x"')
    check = run_cli("config", "check", "--config", str(bad))
    assert check.returncode == 2 and "worker.batch_size: 'x' is not of type" in check.stderr
    refused = run_cli("run", "--source", f"file:{events}", "--store", f"chdb:{store_dir}",
                      "--config", str(bad), "-q")  # fmt: skip
    assert refused.returncode == 2 and "worker.batch_size" in refused.stderr
    assert not store_dir.exists()  # nothing opened, nothing consumed
    good = tmp_path / "good.toml"
    good.write_text(f'[store]\ndsn = "chdb:{store_dir}"\n[worker]\nbatch_size = 700\n')
    check = run_cli("config", "check", env={"INFERWATCH_CONFIG": str(good)})
    assert check.returncode == 0 and f"ok: {good}" in check.stdout, check.stderr
    assert "batch_size=700" in check.stdout and f"chdb:{store_dir}" in check.stdout
    ran = run_cli("run", "--source", f"file:{events}", "-q", env={"INFERWATCH_CONFIG": str(good)})
    assert ran.returncode == 0, ran.stderr
    with Store(f"chdb:{store_dir}") as store:  # the file's store, every event once
        assert store.query("SELECT count() FROM events FINAL").result_rows[0][0] == 3_000


def test_the_readme_example_is_a_valid_configuration(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    cfg = load(write(tmp_path, example), {})
    assert cfg.models["fraud"]["score_type"] == "probability"
