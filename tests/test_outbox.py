"""Alert delivery through the outbox to a real local webhook receiver: every (alert, status)
once, retries with the same key, undelivered rows sent after a restart, refusals recorded."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from detectors.registry import create_all
from streams.simulate import write as simulate_write
from streams.sources import FileSource
from streams.store import Store
from streams.webhook import WebhookRoute, WebhookSettings
from streams.worker import FAULT_ENV, Worker, WorkerSettings
from tests.test_worker import ALERT_FIELDS, run_cli

SETTINGS = WorkerSettings(batch_max=2_000, checkpoint_events=6_000, checkpoint_s=3600)


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: records every request; answers ``fail_code`` to the
    first ``fail_first`` requests (all of them when ``fail_first`` is negative), 200 after."""

    url: str = ""
    fail_first: int = 0
    fail_code: int = 503
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, headers: dict[str, str], body: bytes) -> int:
        with self.lock:
            n = len(self.requests)
            failing = self.fail_first < 0 or n < self.fail_first
            code = self.fail_code if failing else 200
            self.requests.append({"headers": headers, "body": body, "code": code})
            return code

    def keys(self, code: int | None = 200) -> Counter[str]:
        return Counter(
            r["headers"]["Idempotency-Key"]
            for r in self.requests
            if code is None or r["code"] == code
        )


@contextmanager
def serve(tls: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            code = rec.answer(dict(self.headers), body)
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"no" if code >= 300 else b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    scheme = "https" if tls else "http"
    rec.url = f"{scheme}://127.0.0.1:{server.server_address[1]}/hook"
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serve() as rec:
        yield rec


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("traffic") / "traffic.jsonl"
    simulate_write("default", 30_000, 11, path)
    return path


def run_file(path: Path, store_dir: Path, route: WebhookRoute) -> None:
    source = FileSource(path)
    try:
        with Store(f"chdb:{store_dir}") as store:
            Worker(store, source, create_all(), SETTINGS, routes=[route]).run()
    finally:
        source.close()


def route(url: str, max_attempts: int = 3) -> WebhookRoute:
    settings = WebhookSettings(url, max_attempts=max_attempts, timeout_s=2.0)
    return WebhookRoute(settings, sleep=lambda s: None, rand=lambda: 0.5)


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
        assert alert["ts"].endswith("Z")
    assert {k.split(":")[1] for k in keys} == {"firing", "resolved"}


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


def test_outbox_records_a_refusal_and_does_not_retry_it(
    traffic: Path, tmp_path: Path, receiver: Receiver
) -> None:
    receiver.fail_first, receiver.fail_code = -1, 400
    run_file(traffic, tmp_path / "store", route(receiver.url))
    run_file(traffic, tmp_path / "store", route(receiver.url))
    rows = outbox_rows(tmp_path / "store")
    assert rows and all(d == 2 and n == 1 and "HTTP 400" in e for d, n, e in rows.values())
    assert set(receiver.keys(400)) == set(rows) and set(receiver.keys(None).values()) == {1}


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
