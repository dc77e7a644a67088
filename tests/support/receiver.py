"""A webhook receiver on loopback for the delivery tests, and the route that posts to it."""

from __future__ import annotations

import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from streams.alerting.webhook import WebhookRoute, WebhookSettings


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: records every request; answers ``fail_code`` (with
    ``fail_body``) to the first ``fail_first`` requests (all of them when ``fail_first`` is
    negative), 200 after. With ``slow_s``, the first key it sees is answered only after that
    many seconds, every time (a receiver slower than the sender's timeout)."""

    url: str = ""
    fail_first: int = 0
    fail_code: int = 503
    fail_body: bytes = b"no"
    slow_s: float = 0.0
    slow_key: str | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, headers: dict[str, str], body: bytes) -> int:
        with self.lock:
            n = len(self.requests)
            failing = self.fail_first < 0 or n < self.fail_first
            code = self.fail_code if failing else 200
            self.requests.append({"headers": headers, "body": body, "code": code})
            if self.slow_s and self.slow_key is None:
                self.slow_key = headers["Idempotency-Key"]
            return code

    def delay_s(self, headers: dict[str, str]) -> float:
        with self.lock:
            return self.slow_s if headers["Idempotency-Key"] == self.slow_key else 0.0

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
            time.sleep(rec.delay_s(dict(self.headers)))
            answer = rec.fail_body if code >= 300 else b"ok"
            try:
                self.send_response(code)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
            except OSError:
                pass  # the sender gave up waiting (a timeout): nothing to answer

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


def route(url: str, max_attempts: int = 3) -> WebhookRoute:
    settings = WebhookSettings(url, max_attempts=max_attempts, timeout_s=2.0)
    return WebhookRoute(settings, sleep=lambda s: None, rand=lambda: 0.5)
