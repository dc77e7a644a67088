"""An analyst's typo or bad value (issue 14, item 3): ``incidents``, ``silence`` and ``allow``
commands with an unknown id or a bad value get a one-line error and exit code 2, whether a
worker process owns the store (the command goes through its local API) or not (the store is
written directly); the worker never stops, and nothing that was there is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streams.alerting import analyst
from streams.api.client import API_FILE
from streams.cli.main import full_app
from streams.store.store import Store

REPO = Path(__file__).resolve().parents[3]
T0_MS = 1_767_226_860_123  # 2026-01-01T00:21:00.123Z
FAR_MS = 4_102_444_800_000  # 2100-01-01
app = full_app()

# (arguments, what the one-line error says)
BAD = [
    (["incidents", "ack", "nope"], "no incident 'nope'"),
    (["incidents", "ack", "inc-l"], "did you mean 'inc-1'?"),
    (["incidents", "close", "nope", "--verdict", "true_positive"], "no incident 'nope'"),
    (["incidents", "close", "inc-1", "--verdict", "maybe"], "expected one of true_positive"),
    (["incidents", "assign", "nope", "--to", "bo"], "no incident 'nope'"),
    (["incidents", "assign", "inc-1", "--to", ""], "assign needs an assignee"),
    (["incidents", "assign", "inc-1", "--to", "  "], "assign needs an assignee"),
    (["incidents", "assign", "inc-1", "--to", "bo\x1b[2J"], "one line of printable text"),
    (["incidents", "ack", "inc-1", "--note", "ok\nana: closed, benign"], "one line"),
    (["silence", "expire", "nope"], "no silence 'nope'"),
    (["silence", "expire", "config-0"], "configuration file"),
    (["allow", "expire", "nope"], "no allow-list entry 'nope'"),
    (["silence", "add", "-m", "entity=~(", "--for", "1h"], "bad regular expression"),
    (["silence", "add", "-m", "colour=red"], "unknown label 'colour'"),
    (["silence", "add", "-m", "detector=x", "--for", "99999999999d"], "2100-01-01"),
    (["silence", "add", "-m", "detector=x", "--until", "2020-01-01T00:00:00Z"], "future"),
    (["silence", "add", "-m", "detector=x", "--comment", "a\rb"], "one line"),
    (
        ["allow", "add", "--entity-type", "api_key", "--entity", "k", "--for", "99999999999d"],
        "2100-01-01",
    ),
    (["allow", "add", "--entity-type", "user", "--entity", "k"], "entity type 'user'"),
    (["allow", "add", "--entity-type", "api_key", "--entity", ""], "needs an entity"),
]


def seed(store: Store) -> None:
    store.insert_arrow(
        "incidents",
        analyst.incidents_table(
            [{"incident_id": "inc-1", "group_key": "{detector='abuse.rate_spike'}",
              "title": "abuse.rate_spike", "status": "open", "alert_ids": ["a1"],
              "entities": [["api_key", "k"]], "first_seen": T0_MS, "last_seen": T0_MS}]
        ),
    )  # fmt: skip
    analyst.add_silence(store, analyst.new_silence(["entity=k"], FAR_MS, "ana", "", None, "s1"))
    analyst.add_allow(store, analyst.new_allow("api_key", "k", "", FAR_MS, "ana", "", "a1"))


def cli(store_dir: Path, *args: str) -> tuple[int, str, str]:
    wait = [] if args[:2] == ("incidents", "show") else ["--wait", "20"]
    result = CliRunner().invoke(
        app, [*args, "--store", f"chdb:{store_dir}", *wait], catch_exceptions=False
    )
    return result.exit_code, result.stdout, result.stderr


def assert_refused(store_dir: Path) -> None:
    for args, message in BAD:
        code, _, err = cli(store_dir, *args)
        assert (code, message in err) == (2, True), (args, code, err)
        assert err.startswith("error: ") and err.count("\n") == 1, (args, err)


def assert_intact(store_dir: Path) -> None:
    """What was there is still there, unchanged; a good command still works."""
    code, out, err = cli(store_dir, "incidents", "show", "inc-1")
    assert code == 0 and "status       open" in out and "assignee     -" in out, err
    code, out, err = cli(store_dir, "incidents", "ack", "inc-1", "--note", "on it")
    assert code == 0, err
    code, out, err = cli(store_dir, "incidents", "show", "inc-1")
    assert code == 0 and "status       acknowledged" in out and ": on it" in out, out
    code, out, err = cli(store_dir, "silence", "expire", "s1")
    assert code == 0 and out == "silence s1 expired\n", err
    code, out, err = cli(store_dir, "allow", "expire", "a1")
    assert code == 0 and out == "allow a1 expired\n", err


@pytest.fixture
def store_dir(tmp_path: Path) -> Iterator[Path]:
    with Store(f"chdb:{tmp_path / 'store'}") as store:
        seed(store)
    yield tmp_path / "store"


def test_bad_analyst_commands_get_one_line_errors_without_a_worker(store_dir: Path) -> None:
    assert_refused(store_dir)
    assert_intact(store_dir)


@pytest.mark.slow
def test_bad_analyst_commands_get_one_line_errors_and_never_stop_the_worker_process(
    store_dir: Path, tmp_path: Path
) -> None:
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.support.api_worker_process", str(store_dir)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (store_dir / API_FILE).exists():
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline, "worker published no api.json within 30 s"
            time.sleep(0.05)
        assert_refused(store_dir)
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()
        assert_intact(store_dir)  # through the worker: it applies them at its checkpoints
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, (tmp_path / "worker.log").read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        log.close()
    assert "Traceback" not in (tmp_path / "worker.log").read_text()
