"""The worker's local API: token, named queries, commands applied at a checkpoint, metrics, and
the CLI going through a running worker's API instead of opening its store."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams.alerting import analyst
from streams.api.client import API_FILE, ApiClient, ApiError, ApiInfo, read_api_file
from streams.api.server import ApiServer, serve_api
from streams.cli.reference import build_reference, write_reference
from streams.store import rows as records
from streams.store.store import Store, StoreLock
from streams.worker.loop import Worker
from tests.support.api_worker_process import SETTINGS, IdleSource

REPO = Path(__file__).resolve().parents[2]
T0_MS = 1_767_226_860_123  # 2026-01-01T00:21:00.123Z
SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-z_]+="[^"]*",?)*\})? -?[0-9.e+-]+$')


def alert(alert_id: str, detector: str, ts_ms: int) -> dict[str, Any]:
    return {
        "alert_id": alert_id, "schema_version": 1, "ts": ts_ms, "emitted_at": ts_ms + 1_000,
        "detector": detector, "detector_version": "1", "severity": "high", "status": "firing",
        "resolved_at": None, "model_id": "fraud-scorer", "tenant": "fraud-ops",
        "entity_type": "api_key", "entity": f"key_{alert_id}",
        "linked_entities": [{"type": "api_key", "id": f"key_{alert_id}"}], "score": 9.5,
        "threshold": 3.0, "title": f"alert {alert_id}", "summary": "test", "atlas": ["AML.T0040"],
        "owasp": ["LLM10"], "evidence": {"count": 50}, "first_seen": ts_ms - 60_000,
        "last_seen": ts_ms, "event_count": 14, "sample_event_ids": ["e1", "e2"],
        "incident_id": "", "runbook": "https://inferwatch.invalid/runbooks/" + detector,
    }  # fmt: skip


def seed(store: Store) -> None:
    store.insert_arrow(
        "alerts",
        records.alerts_table(
            [alert("a1", "abuse.rate_spike", T0_MS), alert("a2", "drift.psi", T0_MS + 60_000)]
        ),
    )


class Served:
    """A real Worker (idle source, no detectors) running in a thread, with its API."""

    def __init__(self, directory: Path) -> None:
        self.store = Store(f"chdb:{directory}")
        seed(self.store)
        self.worker = Worker(self.store, IdleSource({0: 7, 1: 0}), [], SETTINGS)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.api = serve_api(self.worker)
        self.client = ApiClient(ApiInfo(os.getpid(), self.api.port, self.api.token))

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:
            self.error = exc

    def close(self) -> None:
        self.api.stop()
        self.worker.stop_requested.set()
        self.thread.join(timeout=30)
        self.store.close()
        assert self.error is None, self.error


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    # per test: chdb opens one store path per process at a time, and other tests open theirs
    s = Served(tmp_path / "store")
    try:
        yield s
    finally:
        s.close()


def http(url: str, token: str | None = None, body: Any = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None if body is None else orjson.dumps(body)
    request = urllib.request.Request(url, data, headers, method="POST" if data else "GET")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", *args],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=60,
    )  # fmt: skip


def test_api_query_returns_rows_with_rfc3339_times(served: Served) -> None:
    status, body = http(f"{served.api.url}/v1/query/alerts?limit=5", served.api.token)
    assert status == 200
    answer = orjson.loads(body)
    assert [r["alert_id"] for r in answer["result"]] == ["a2", "a1"]
    assert answer["result"][1]["ts"] == "2026-01-01T00:21:00.123000+00:00"
    assert {"ts", "first_seen", "last_seen", "emitted_at"} <= set(answer["datetime_fields"])
    rows = served.client.query("alerts", detector="drift.psi", since=None)
    assert [r["alert_id"] for r in rows] == ["a2"]
    assert rows[0]["evidence"] == {"count": 50} and rows[0]["ts"].tzinfo is not None
    assert served.client.query("counts")["alerts"] == 2


def test_api_refuses_requests_without_the_right_token(served: Served) -> None:
    url = f"{served.api.url}/v1/query/alerts"
    assert http(url)[0] == 401
    assert http(url, "not-the-token")[0] == 401
    assert http(f"{served.api.url}/v1/commands", None, {"command": "checkpoint_now"})[0] == 401
    with pytest.raises(ApiError, match="wrong token"):
        ApiClient(ApiInfo(os.getpid(), served.api.port, "nope")).query("alerts")


def test_api_rejects_unknown_queries_and_parameters_naming_what_exists(served: Served) -> None:
    token = served.api.token
    status, body = http(f"{served.api.url}/v1/query/DROP%20TABLE%20alerts", token)
    assert status == 400
    assert orjson.loads(body)["error"].startswith(
        "unknown query 'DROP TABLE alerts'; known: alerts, allow_list, counts, dead_letters, "
        "findings, incidents"
    )
    status, body = http(f"{served.api.url}/v1/query/alerts?sql=1", token)
    assert status == 400
    assert "accepted: since, detector, status, limit" in orjson.loads(body)["error"]
    assert http(f"{served.api.url}/v1/query/alerts?limit=-1", token)[0] == 400
    assert http(f"{served.api.url}/v1/query/alerts?limit=1&limit=2", token)[0] == 400
    with pytest.raises(ApiError, match="--since 'yesterday'") as exc:
        served.client.query("alerts", since="yesterday")
    assert exc.value.status == 400


def test_api_metrics_are_prometheus_text_without_a_token(served: Served) -> None:
    served.worker.counters.rejects_total["bad_json"] = 3
    status, body = http(f"{served.api.url}/metrics")
    assert status == 200
    lines = body.decode().splitlines()
    samples = [ln for ln in lines if not ln.startswith("#")]
    assert samples and all(SAMPLE.match(ln) for ln in samples), samples
    families = {ln.split()[2] for ln in lines if ln.startswith("# TYPE")}
    assert families == {
        f"inferwatch_{name}"
        for name in (
            "events_total", "rejects_total", "findings_total", "alerts_total",
            "late_events_total", "lost_events_total", "checkpoints_total", "checkpoint_seconds",
            "batch_seconds", "consumer_lag_messages", "stage_seconds_total", "sink_paused",
            "sink_failures_total", "deliveries_refused_total", "event_id_window_seconds",
        )
    }  # fmt: skip
    assert {ln.split()[2] for ln in lines if ln.startswith("# HELP")} == families
    assert 'inferwatch_rejects_total{reason="bad_json"} 3' in samples
    assert 'inferwatch_consumer_lag_messages{partition="0"} 7' in samples


def test_api_command_is_applied_at_the_next_checkpoint(served: Served) -> None:
    before = served.worker.counters.checkpoints_total
    submitted = served.client.command("checkpoint_now")
    assert submitted["state"] == "pending" and submitted["command"] == "checkpoint_now"
    deadline = time.monotonic() + 10
    # checkpoint_s is an hour: only the command can make this checkpoint happen
    while served.worker.counters.checkpoints_total == before:
        assert time.monotonic() < deadline, "no checkpoint within 10 s"
        time.sleep(0.05)
    assert served.client.command_state(submitted["id"])["state"] == "applied"
    for body, message in (
        ({"command": "rm -rf"}, "known: allow_add, allow_expire, checkpoint_now, incident_change"),
        ({"command": "checkpoint_now", "args": {"x": 1}}, "takes args"),
        ({"args": {}}, "expected"),
    ):
        status, answer = http(f"{served.api.url}/v1/commands", served.api.token, body)
        assert status == 400 and message in orjson.loads(answer)["error"]


def test_api_file_is_private_and_removed_on_stop(served: Served) -> None:
    directory = served.store.directory
    assert directory is not None
    path = directory / API_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_api_file(directory) == ApiInfo(os.getpid(), served.api.port, served.api.token)
    assert not list(directory.glob(f".{API_FILE}*"))  # no temp file left behind
    served.api.stop()
    assert not path.exists()
    with pytest.raises(ApiError, match=r"at http://127\.0\.0\.1"):
        served.client.query("alerts")


def test_cli_reads_through_the_api_while_a_worker_process_runs(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    with Store(f"chdb:{store_dir}") as store:
        seed(store)
        rows = [{"x": float(i % 9), "score:yes": i / 100} for i in range(100)]
        write_reference(store, build_reference(rows, "fraud-scorer", ""), "file")
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
        via_api = run_cli("alerts", "--format", "jsonl", "--store", f"chdb:{store_dir}")
        assert via_api.returncode == 0, via_api.stderr
        rows = [orjson.loads(line) for line in via_api.stdout.splitlines()]
        assert [r["alert_id"] for r in rows] == ["a2", "a1"]
        assert rows[1]["ts"] == "2026-01-01T00:21:00.123Z"  # one format: RFC 3339, Z, ms
        refs = run_cli("reference", "list", "--format", "jsonl", "--store", f"chdb:{store_dir}")
        assert refs.returncode == 0, refs.stderr
        (ref,) = [orjson.loads(line) for line in refs.stdout.splitlines()]
        assert (ref["model_id"], ref["state"], ref["source"]) == (
            "fraud-scorer", "frozen", "operator (file)",
        )  # fmt: skip
        bad = run_cli("findings", "--since", "yesterday", "--store", f"chdb:{store_dir}")
        assert bad.returncode == 2 and "--since 'yesterday'" in bad.stderr
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, (tmp_path / "worker.log").read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        log.close()
    assert not (store_dir / API_FILE).exists()
    direct = run_cli("alerts", "--format", "jsonl", "--store", f"chdb:{store_dir}")
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout == via_api.stdout
    direct = run_cli("reference", "list", "--format", "jsonl", "--store", f"chdb:{store_dir}")
    assert direct.returncode == 0 and direct.stdout == refs.stdout, direct.stderr


def test_cli_fails_clearly_when_the_owner_has_no_reachable_api(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store_dir.mkdir(mode=0o700)  # a store directory exists before its lock is taken
    lock = StoreLock(store_dir)
    lock.acquire()
    try:
        out = run_cli("alerts", "--store", f"chdb:{store_dir}")
        assert out.returncode == 2
        expected = f"store {store_dir} is in use by pid {os.getpid()} and its API is not reachable"
        assert expected in out.stderr.replace("\n", " ").replace("  ", " ")
        # a file left by a killed worker names another pid: not trusted
        (store_dir / API_FILE).write_text('{"pid": 1, "port": 9, "token": "stale"}')
        out = run_cli("findings", "--store", f"chdb:{store_dir}")
        assert out.returncode == 2 and "API is not reachable" in out.stderr
    finally:
        lock.release()


def test_analyst_commands_go_through_the_owning_worker_and_reach_its_lifecycle(
    served: Served,
) -> None:
    store = f"chdb:{served.store.directory}"
    env_cli = ["silence", "add", "-m", "detector=abuse.rate_spike", "--for", "1h", "--store", store]
    added = run_cli(*env_cli)
    assert added.returncode == 0, added.stderr
    silence_id = added.stdout.split()[1]
    assert [s.silence_id for s in served.worker.lifecycle.silences] == [silence_id]
    listed = run_cli("silence", "list", "--store", store, "--format", "jsonl")
    assert orjson.loads(listed.stdout)["silence_id"] == silence_id  # read through the API
    allowed = run_cli("allow", "add", "--entity-type", "api_key", "--entity", "k", "--store", store)
    assert allowed.returncode == 0 and len(served.worker.lifecycle.allow) == 1, allowed.stderr
    bad = run_cli("silence", "add", "-m", "colour=red", "--store", store)
    assert bad.returncode == 2 and "unknown label 'colour'" in bad.stderr
    missing = run_cli("incidents", "show", "nope", "--store", store)
    assert missing.returncode == 2 and "no incident 'nope'" in missing.stderr


FAR_MS = 4_102_444_800_000  # 2100-01-01


def seed_incident(store: Store, incident_id: str = "inc-1") -> None:
    store.insert_arrow(
        "incidents",
        analyst.incidents_table(
            [{"incident_id": incident_id, "group_key": "{detector='abuse.rate_spike'}",
              "title": "abuse.rate_spike", "status": "open", "alert_ids": ["a1"],
              "entities": [["api_key", "key_a1"]], "first_seen": T0_MS, "last_seen": T0_MS}]
        ),
    )  # fmt: skip


def silence_args(**over: Any) -> dict[str, Any]:
    return {"matchers": ["entity=k"], "ends_ms": FAR_MS, "author": "ana", "silence_id": "s1"} | over


def allow_args(**over: Any) -> dict[str, Any]:
    args = {"entity_type": "api_key", "entity": "k", "ends_ms": FAR_MS, "author": "ana"}
    return args | {"allow_id": "a1"} | over


def change(incident_id: Any = "inc-1", **fields: Any) -> dict[str, Any]:
    return {"command": "incident_change", "args": {"incident_id": incident_id, "change": fields}}


# (body, what the 400 says): unknown ids and bad values of every command the API accepts
BAD_COMMANDS = [
    (change("nope", status="acknowledged"), "no incident 'nope'"),
    (change("inc-l", status="acknowledged"), "did you mean 'inc-1'?"),
    (change(5, status="acknowledged"), "incident id: expected text"),
    (change(assignee=""), "assignee is empty"),
    (change(assignee="bo\r\nroot"), "expected one line of printable text"),
    (change(verdict="maybe"), "verdict 'maybe': expected one of true_positive"),
    (change(status="deleted"), "status 'deleted': expected one of open"),
    (change(verdict_at="yesterday"), "verdict_at: expected milliseconds"),
    (change(verdict_at=10**18), "expected a time between 1970 and 2100-01-01"),
    (change(colour="red"), "unknown field 'colour'"),
    (change(), "expected an object of fields"),
    ({"command": "incident_change", "args": {"incident_id": "inc-1"}}, "missing args"),
    ({"command": "silence_expire", "args": {"silence_id": "nope"}}, "no silence 'nope'"),
    ({"command": "silence_expire", "args": {"silence_id": "config-0"}}, "configuration file"),
    ({"command": "silence_expire", "args": {"silence_id": ["s"]}}, "silence id: expected text"),
    ({"command": "allow_expire", "args": {"allow_id": "nope"}}, "no allow-list entry 'nope'"),
    ({"command": "allow_expire", "args": {}}, "missing args"),
    ({"command": "silence_add", "args": silence_args(matchers=["entity=~("])}, "bad regular"),
    ({"command": "silence_add", "args": silence_args(matchers="entity=k")}, "a list of"),
    ({"command": "silence_add", "args": silence_args(matchers=[])}, "at least one matcher"),
    ({"command": "silence_add", "args": silence_args(ends_ms=T0_MS)}, "end in the future"),
    ({"command": "silence_add", "args": silence_args(ends_ms=10**18)}, "and 2100-01-01"),
    ({"command": "silence_add", "args": silence_args(ends_ms="soon")}, "ends: expected"),
    ({"command": "silence_add", "args": silence_args(starts_ms=True)}, "starts: expected"),
    ({"command": "silence_add", "args": silence_args(author="")}, "author is empty"),
    ({"command": "silence_add", "args": silence_args(comment=7)}, "comment: expected text"),
    ({"command": "silence_add", "args": silence_args(silence_id=7)}, "silence id: expected"),
    ({"command": "silence_add", "args": silence_args(silence_id="taken")}, "'taken' exists"),
    ({"command": "allow_add", "args": allow_args(entity_type="user")}, "entity type 'user'"),
    ({"command": "allow_add", "args": allow_args(entity="")}, "needs an entity"),
    ({"command": "allow_add", "args": allow_args(model_id=3)}, "model: expected"),
    ({"command": "allow_add", "args": allow_args(ends_ms=T0_MS)}, "expire in the future"),
    ({"command": "allow_add", "args": allow_args(reason=["x"])}, "reason: expected text"),
]


def test_api_refuses_bad_analyst_commands_and_the_worker_goes_on(served: Served) -> None:
    seed_incident(served.store)
    analyst.add_silence(served.store, analyst.new_silence(["entity=x"], FAR_MS, "ana", "", None,
                                                          "taken"))  # fmt: skip
    for body, message in BAD_COMMANDS:
        status, answer = http(f"{served.api.url}/v1/commands", served.api.token, body)
        error = orjson.loads(answer)["error"]
        assert (status, message in error) == (400, True), (body, status, error)
        assert "\n" not in error
    assert served.thread.is_alive() and served.error is None
    # nothing was queued; the next good command is applied as usual
    assert served.worker.commands == []
    submitted = served.client.command("incident_change", **change(status="acknowledged")["args"])
    deadline = time.monotonic() + 10
    while served.client.command_state(submitted["id"])["state"] == "pending":
        assert time.monotonic() < deadline, "not applied within 10 s"
        time.sleep(0.05)
    assert served.client.command_state(submitted["id"])["state"] == "applied"
    assert analyst.get_incident(served.store, "inc-1")["status"] == "acknowledged"
    assert served.thread.is_alive() and served.error is None


def test_a_command_invalid_by_the_time_it_is_applied_is_rejected_and_the_checkpoint_goes_on(
    tmp_path: Path,
) -> None:
    with Store(f"chdb:{tmp_path / 'store'}") as store:
        seed_incident(store)
        worker = Worker(store, IdleSource(), [], SETTINGS)
        api = ApiServer(worker, None)  # not serving: submit() is what a request calls
        try:
            # each is valid when it arrives; the first of each pair takes the id, and the
            # incident is gone before the checkpoint that applies the change
            bodies = [
                {"command": "silence_add", "args": silence_args()},
                {"command": "silence_add", "args": silence_args(comment="again")},
                {"command": "allow_add", "args": allow_args()},
                {"command": "allow_add", "args": allow_args(reason="again")},
                change(status="acknowledged"),
            ]
            ids = [api.submit(body)["id"] for body in bodies]
            store.command("DELETE FROM incidents WHERE incident_id = 'inc-1'")
            worker.checkpoint()  # no exception: the worker goes on
            states = [api.route("GET", f"/v1/commands/{i}", {}, None)[1] for i in ids]
        finally:
            api.stop()
        assert [s["state"] for s in states] == [
            "applied", "rejected", "applied", "rejected", "rejected"
        ]  # fmt: skip
        assert "silence 's1' exists" in states[1]["error"]
        assert "allow-list entry 'a1' exists" in states[3]["error"]
        assert "no incident 'inc-1'" in states[4]["error"]
        assert worker.counters.checkpoints_total == 1
        assert [s.comment for s in worker.lifecycle.silences] == [""]
        assert [a.reason for a in worker.lifecycle.allow] == [""]
        assert [s.comment for s in analyst.silences(store)] == [""]
