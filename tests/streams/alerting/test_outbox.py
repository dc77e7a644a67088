"""Alert delivery through the outbox to a real local webhook receiver: every (alert, status)
once, retries with the same key, undelivered rows sent after a restart, refusals recorded."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from typer.testing import CliRunner

from detectors.registry import create_all
from schemas import alert as alert_v1
from schemas import finding as finding_v1
from streams.alerting.outage import DELIVERY_REFUSED_DETECTOR
from streams.alerting.webhook import WebhookRoute, WebhookSettings
from streams.api.server import metrics_text, serve_api
from streams.cli.outbox import outbox_app
from streams.sim.simulate import write as simulate_write
from streams.sources.base import FileSource
from streams.store.store import Store
from streams.worker.loop import FAULT_ENV, Counters, Worker, WorkerSettings
from tests.support.api_worker_process import SETTINGS as IDLE_SETTINGS
from tests.support.api_worker_process import IdleSource
from tests.support.cli import ALERT_FIELDS, run_cli
from tests.support.receiver import Receiver, route, serve

SETTINGS = WorkerSettings(batch_max=2_000, checkpoint_events=6_000, checkpoint_s=3600)


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("traffic") / "traffic.jsonl"
    simulate_write("default", 30_000, 11, path)
    return path


@pytest.fixture(scope="module")
def small_traffic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10,000 events: 5 rate-spike episodes, each firing and resolved."""
    path = tmp_path_factory.mktemp("small") / "traffic.jsonl"
    simulate_write("default", 10_000, 11, path)
    return path


def run_file(
    path: Path,
    store_dir: Path,
    route: WebhookRoute,
    settings: WorkerSettings = SETTINGS,
    from_start: bool = False,
) -> Counters:
    source = FileSource(path)
    try:
        with Store(f"chdb:{store_dir}") as store:
            worker = Worker(store, source, create_all(), settings, from_start, routes=[route])
            return worker.run()
    finally:
        source.close()


def assert_firing_first(rec: Receiver, since: int = 0) -> None:
    """Per alert id, no resolution reached the receiver before its firing was delivered."""
    fired: set[str] = set()
    for r in rec.requests[since:]:
        alert_id, status = r["headers"]["Idempotency-Key"].rsplit(":", 1)
        if status == "resolved":
            assert alert_id in fired, f"{alert_id}: resolution sent before its firing"
        elif r["code"] == 200:
            fired.add(alert_id)


def refused_alerts(store_dir: Path) -> list[tuple[str, str, dict[str, Any]]]:
    with Store(f"chdb:{store_dir}") as store:
        rows = store.query(
            "SELECT status, entity, evidence FROM alerts FINAL WHERE detector = {d:String}",
            {"d": DELIVERY_REFUSED_DETECTOR},
        ).result_rows
    return [(s, e, json.loads(ev)) for s, e, ev in rows]


def outbox_rows(store_dir: Path) -> dict[str, tuple[int, int, str]]:
    """ "alert_id:status" -> (delivered, attempts, last_error), newest version."""
    with Store(f"chdb:{store_dir}") as store:
        rows = store.query(
            "SELECT alert_id, status, argMax(delivered, version), argMax(attempts, version), "
            "argMax(last_error, version) FROM outbox GROUP BY alert_id, status, route"
        ).result_rows
        final = store.query("SELECT alert_id, status FROM alerts FINAL").result_rows
    out = {f"{a}:{s}": (int(d), int(n), e) for a, s, d, n, e in rows}
    assert {f"{a}:{s}" for a, s in final} <= set(out)  # every alert's latest status is staged
    return out


def test_outbox_delivers_every_alert_status_once_with_its_key(
    traffic: Path, tmp_path: Path, receiver: Receiver
) -> None:
    run_file(traffic, tmp_path / "store", route(receiver.url))
    rows = outbox_rows(tmp_path / "store")
    assert rows and all(d == 1 for d, _, _ in rows.values())
    keys = receiver.keys(None)
    assert set(keys) == set(rows) and set(keys.values()) == {1}
    for req in receiver.requests:
        assert req["headers"]["Content-Type"] == "application/json"
        alert = json.loads(req["body"])
        assert set(alert) == ALERT_FIELDS and alert["schema_version"] == 1
        assert req["headers"]["Idempotency-Key"] == f"{alert['alert_id']}:{alert['status']}"
        Draft202012Validator(alert_v1.json_schema()).validate(alert)
    assert {k.split(":")[1] for k in keys} == {"firing", "resolved"}
    assert_firing_first(receiver)
    # the CLI prints what the routes sent: alert v1 with the same times, finding v1
    sent = {
        (a["alert_id"], a["status"]): a for a in (json.loads(r["body"]) for r in receiver.requests)
    }
    store = f"chdb:{tmp_path / 'store'}"
    printed = run_cli("alerts", "--store", store, "--format", "jsonl")
    assert printed.returncode == 0, printed.stderr
    lines = [json.loads(line) for line in printed.stdout.splitlines()]
    assert lines and {(a["alert_id"], a["status"]) for a in lines} <= set(sent)
    for line in lines:
        Draft202012Validator(alert_v1.json_schema()).validate(line)
        # a firing alert is sent once and may grow later; where it started does not change
        assert line["first_seen"] == sent[line["alert_id"], line["status"]]["first_seen"]
    printed = run_cli("findings", "--store", store, "--format", "jsonl", "--limit", "50")
    assert printed.returncode == 0, printed.stderr
    for line in printed.stdout.splitlines():
        Draft202012Validator(finding_v1.json_schema()).validate(json.loads(line))


def test_outbox_retries_a_failing_receiver_and_delivers_once_it_recovers(
    traffic: Path, tmp_path: Path, receiver: Receiver
) -> None:
    # the first key fails 3 times (the bound per round); the route then rests, and the next
    # round retries the oldest row first: it fails twice more, then everything goes through
    receiver.fail_first = 5
    run_file(traffic, tmp_path / "store", route(receiver.url))
    run_file(traffic, tmp_path / "store", route(receiver.url))  # a restart sends what is left
    rows = outbox_rows(tmp_path / "store")
    assert all(d == 1 for d, _, _ in rows.values())
    assert set(receiver.keys()) == set(rows) and set(receiver.keys().values()) == {1}
    assert_firing_first(receiver)
    failed = receiver.keys(503)
    first = receiver.requests[0]["headers"]["Idempotency-Key"]
    assert failed == {first: 5} and rows[first][1] == 6


@pytest.mark.parametrize("fault", ["kill_before_delivery:4", "kill_after_flush:4"])
def test_outbox_worker_killed_before_delivery_sends_it_after_restart(
    traffic: Path, tmp_path: Path, receiver: Receiver, fault: str
) -> None:
    """Killed after checkpoint 4 was saved, or before (its outbox rows are then dropped at start
    and staged again by the replay): nothing of checkpoint 4 was sent, all of it is sent once."""
    store = f"chdb:{tmp_path / 'store'}"
    args = ["run", "--source", f"file:{traffic}", "--store", store, "-q", "--batch-size", "2000"]
    args += ["--checkpoint-events", "6000", "--checkpoint-s", "3600", "--webhook", receiver.url]
    killed = run_cli(*args, env={FAULT_ENV: fault})
    assert killed.returncode == -9, killed.stderr
    before = receiver.keys()
    staged = outbox_rows(tmp_path / "store")
    undelivered = {k for k, (d, _, _) in staged.items() if d == 0}
    assert undelivered and not undelivered & set(before)
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    rows = outbox_rows(tmp_path / "store")
    assert all(d == 1 for d, _, _ in rows.values())
    assert set(receiver.keys()) == set(rows) and set(receiver.keys().values()) == {1}
    assert_firing_first(receiver)


def test_outbox_sends_the_firing_before_its_resolution_inside_one_checkpoint(
    small_traffic: Path, tmp_path: Path, receiver: Receiver
) -> None:
    """With one checkpoint for the whole file every episode fires and resolves before it: the
    receiver still gets each firing, then its resolution, each under its own key."""
    one = replace(SETTINGS, checkpoint_events=1 << 30)
    run_file(small_traffic, tmp_path / "store", route(receiver.url), one)
    keys = receiver.keys()
    resolved = {k.rsplit(":", 1)[0] for k in keys if k.endswith(":resolved")}
    assert len(resolved) >= 5, keys
    assert {f"{a}:firing" for a in resolved} <= set(keys) and set(keys.values()) == {1}
    assert_firing_first(receiver)
    bodies = {r["headers"]["Idempotency-Key"]: json.loads(r["body"]) for r in receiver.requests}
    for a in resolved:
        assert bodies[f"{a}:firing"]["status"] == "firing"
        assert bodies[f"{a}:firing"]["resolved_at"] is None
        assert bodies[f"{a}:resolved"]["resolved_at"] is not None
    with Store(f"chdb:{tmp_path / 'store'}") as store:
        stored = dict(store.query("SELECT alert_id, status FROM alerts FINAL").result_rows)
    assert all(stored[a] == "resolved" for a in resolved)  # the store keeps the latest


def test_outbox_replay_from_start_sends_nothing_again(
    small_traffic: Path, tmp_path: Path, receiver: Receiver
) -> None:
    """``run --from-start`` decides every alert again, with the same ids: the outbox already
    holds them, so the receiver is not paged a second time."""
    run_file(small_traffic, tmp_path / "store", route(receiver.url))
    first = receiver.keys(None)
    assert len(first) >= 5 and set(first.values()) == {1}
    run_file(small_traffic, tmp_path / "store", route(receiver.url), from_start=True)
    assert receiver.keys(None) == first


def test_outbox_retries_a_timed_out_delivery_with_its_key_a_bounded_number_of_times(
    small_traffic: Path, tmp_path: Path, receiver: Receiver
) -> None:
    """A receiver slower than the timeout may have each attempt: it gets the same key, at most
    ``max_timeouts`` times in all (restarts included); then the delivery is kept as refused."""
    receiver.slow_s = 1.0
    for _ in range(3):  # each start first sends what waits, oldest first: the slow one
        slow = WebhookSettings(receiver.url, timeout_s=0.2, max_timeouts=2)
        run_file(small_traffic, tmp_path / "store", WebhookRoute(slow, sleep=lambda s: None))
    key = receiver.slow_key
    assert key is not None
    sent = receiver.keys(None)
    assert sent[key] == 2
    rows = outbox_rows(tmp_path / "store")
    state, attempts, error = rows[key]
    assert (state, attempts) == (2, 2) and "no answer within 0.2 s" in error, error
    waiting = key.replace(":firing", ":resolved")  # waits behind its firing, never sent alone
    assert waiting not in sent
    others = {k: v for k, v in rows.items() if k not in (key, waiting)}
    assert others and all(d == 1 for d, _, _ in others.values())
    assert all(sent[k] == 1 for k in others)
    assert_firing_first(receiver)


@pytest.mark.slow
def test_outbox_keeps_deliveries_refused_with_401_run_reports_them_and_retry_sends_them(
    small_traffic: Path, tmp_path: Path, receiver: Receiver
) -> None:
    """An expired token: every delivery is refused. Nothing is lost, ``run`` says so (exit 1),
    the store holds ``pipeline.delivery_refused``, and once the token is fixed ``outbox retry``
    (no worker running: directly) sends them all, firing before resolution."""
    receiver.fail_first, receiver.fail_code = -1, 401
    receiver.fail_body = b'{"error": "token expired"}'
    store_dir = tmp_path / "store"
    store = f"chdb:{store_dir}"
    args = ["run", "--source", f"file:{small_traffic}", "--store", store, "-q"]
    args += ["--batch-size", "2000", "--checkpoint-events", "6000", "--webhook", receiver.url]
    out = run_cli(*args)
    assert out.returncode == 1, out.stderr
    assert "deliveries refused" in out.stderr and "outbox list --status refused" in out.stderr
    rows = outbox_rows(store_dir)
    refused = {k for k, (d, _, _) in rows.items() if d == 2}
    assert len(refused) >= 5
    assert all("HTTP 401" in rows[k][2] and "token expired" in rows[k][2] for k in refused)
    waiting = {k for k, (d, _, _) in rows.items() if d == 0}  # behind their refused firing
    assert all(k.replace(":resolved", ":firing") in refused for k in waiting)
    assert not [k for k, (d, _, _) in rows.items() if d == 1]
    assert set(receiver.keys(401)) == refused  # each tried once; no resolution was sent
    ((status, entity, evidence),) = refused_alerts(store_dir)
    assert (status, entity, evidence["last_status"]) == ("firing", "route:webhook", 401)

    runner = CliRunner()
    listed = runner.invoke(
        outbox_app, ["list", "--status", "refused", "--format", "jsonl", "--store", store]
    )
    assert listed.exit_code == 0, listed.output
    shown = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {r["id"] for r in shown} == refused
    assert {r["response_status"] for r in shown} == {401}
    for bad, message in (
        ([], "give a delivery ID, --route R or --all-refused"),
        (["nosuch:firing"], "no delivery 'nosuch:firing'"),
        (["--route", "pager"], "no deliveries on route 'pager'"),
        (["--all-refused"], "route webhook is not given: pass --webhook URL"),
    ):
        res = runner.invoke(outbox_app, ["retry", *bad, "--store", store])
        assert res.exit_code == 2 and message in res.stderr, res.output

    receiver.fail_first = 0  # the token is fixed
    before = len(receiver.requests)
    retried = runner.invoke(
        outbox_app, ["retry", "--all-refused", "--store", store, "--webhook", receiver.url]
    )
    assert retried.exit_code == 0, retried.output
    assert f"delivered {len(refused) + len(waiting)}" in retried.stdout
    rows = outbox_rows(store_dir)
    assert all(d == 1 for d, _, _ in rows.values())
    again = Counter(r["headers"]["Idempotency-Key"] for r in receiver.requests[before:])
    assert set(again) == refused | waiting and set(again.values()) == {1}
    assert_firing_first(receiver, since=before)
    done = runner.invoke(outbox_app, ["retry", next(iter(refused)), "--store", store])
    assert done.exit_code == 2 and "was delivered" in done.stderr


def test_outbox_keeps_slack_like_400_refusals_counts_them_and_retries_through_the_worker(
    small_traffic: Path, tmp_path: Path, receiver: Receiver
) -> None:
    """A receiver that refuses our body (Slack answers 400 to it): refusals are kept, counted in
    ``inferwatch_deliveries_refused_total``, not retried by a restart, and retried through the
    running worker's API once the receiver is fixed; the route's alert then resolves."""
    receiver.fail_first, receiver.fail_code, receiver.fail_body = -1, 400, b"invalid_payload"
    store_dir = tmp_path / "store"
    store = f"chdb:{store_dir}"
    counters = run_file(small_traffic, store_dir, route(receiver.url))
    refused = {k for k, (d, _, _) in outbox_rows(store_dir).items() if d == 2}
    assert counters.deliveries_refused_total == {"webhook": len(refused)}
    metrics = metrics_text(counters, {})
    assert f'inferwatch_deliveries_refused_total{{route="webhook"}} {len(refused)}' in metrics
    run_file(small_traffic, store_dir, route(receiver.url))  # a restart retries nothing
    assert set(receiver.keys(400)) == refused and set(receiver.keys(None).values()) == {1}
    assert all(k.endswith(":firing") for k in receiver.keys(None))
    ((status, _, evidence),) = refused_alerts(store_dir)
    assert status == "firing" and "invalid_payload" in evidence["last_error"]

    receiver.fail_first = 0
    before = len(receiver.requests)
    runner = CliRunner()
    with Store(store) as st:
        worker = Worker(st, IdleSource(), [], IDLE_SETTINGS, routes=[route(receiver.url)])
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        api = serve_api(worker)
        try:
            bad = runner.invoke(outbox_app, ["retry", "nosuch:firing", "--store", store])
            assert bad.exit_code == 2 and "no delivery 'nosuch:firing'" in bad.stderr
            ok = runner.invoke(outbox_app, ["retry", "--all-refused", "--store", store])
            assert ok.exit_code == 0, ok.output
            assert "delivered" in ok.stdout and thread.is_alive()
        finally:
            api.stop()
            worker.stop_requested.set()
            thread.join(30)
    rows = outbox_rows(store_dir)
    assert all(d == 1 for d, _, _ in rows.values()), rows
    again = Counter(r["headers"]["Idempotency-Key"] for r in receiver.requests[before:])
    assert set(again) == set(rows) and set(again.values()) == {1}  # nothing had gone through
    assert_firing_first(receiver, since=before)
    ((status, _, _),) = refused_alerts(store_dir)
    assert status == "resolved"


def test_cli_rejects_a_bad_webhook_url_with_what_was_expected(tmp_path: Path) -> None:
    store = f"chdb:{tmp_path / 'store'}"
    for url in ("ftp://hooks.example.com/x", "https://", "hooks.example.com"):
        out = run_cli("run", "--source", "file:/nonexistent", "--store", store, "--webhook", url)
        assert out.returncode == 2, out.stderr
        assert "expected http(s)://HOST[:PORT]/PATH" in out.stderr
    env = run_cli(
        "run", "--source", "file:/nonexistent", "--store", store,
        env={"INFERWATCH_WEBHOOK_URL": "mailto:x@example.com"},
    )  # fmt: skip
    assert env.returncode == 2 and "INFERWATCH_WEBHOOK_URL" in env.stderr
    assert not (tmp_path / "store").exists()  # checked before anything is opened


def test_webhook_backs_off_with_full_jitter_and_leaves_a_down_receiver_for_later() -> None:
    delays: list[float] = []
    settings = WebhookSettings("http://127.0.0.1:9/closed", max_attempts=4, timeout_s=1.0)
    hook = WebhookRoute(settings, sleep=delays.append, rand=lambda: 1.0)
    outcome = hook.deliver("a:firing", b"{}")
    assert not outcome.delivered and not outcome.permanent and outcome.attempts == 4
    assert "refused" in outcome.error.lower()
    assert delays == [0.4, 0.8, 1.6]  # rand() * min(max, base * 2**attempt)


def test_webhook_posts_over_https_verified_with_a_ca_file(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    with serve(tls) as rec:
        untrusted = WebhookRoute(WebhookSettings(rec.url, max_attempts=1))
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.deliver("a:firing", b"{}").error
        trusted = WebhookRoute(WebhookSettings(rec.url, ca_file=cert, max_attempts=1))
        assert trusted.deliver("a:firing", b"{}").delivered
        assert rec.keys() == Counter({"a:firing": 1})
