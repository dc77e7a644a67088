"""Secrets (issue 14, item 12): never printed or logged (config check, store errors, a failing
run, log records, tracebacks), and read from the environment or ``*_FILE`` paths."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streams.cli.main import app
from streams.sim.simulate import write as simulate_write
from streams.worker.settings import ConfigError, load

SECRET = "s3cretPW"
TOKEN = "Xy7kQ2mN9pL4rS8tV1wZ3aB5"
REPO = Path(__file__).resolve().parents[3]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Exit code and everything printed (stdout and stderr)."""
    result = CliRunner().invoke(app, list(args), env=env)
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), result.exception
    return result.exit_code, result.stdout + result.stderr


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("events") / "events.jsonl"
    simulate_write("quiet", 100, 3, path)
    return path


@pytest.mark.parametrize(
    ("text", "shown", "hidden"),
    [
        ("store http://alice:pw12345@db:8123/inferwatch down", "alice:***@db:8123/inferwatch",
         "pw12345"),
        (f"https://hooks.slack.com/services/T0123ABC/B0456DEF/{TOKEN}", "/services/***/***/***",
         TOKEN),
        ("https://soc.example.bank/hook?token=abc&sig=def#frag", "/hook?token=***&sig=***#***",
         "abc"),
        (f"https://{TOKEN}@github.com/org/repo", "https://***@github.com/org/repo", TOKEN),
        (f"Authorization: Bearer {TOKEN}", "Authorization: Bearer ***", TOKEN),
        (f"sasl.password={SECRET} security.protocol=SASL_SSL", "password=***", SECRET),
    ],
)  # fmt: skip
def test_redact_hides_credentials_and_keeps_where(text: str, shown: str, hidden: str) -> None:
    from streams.store.credentials import redact

    out = redact(text)
    assert shown in out and hidden not in out, out


def test_a_secret_read_from_a_variable_is_hidden_even_outside_a_url() -> None:
    from streams.store.credentials import redact, secret_from_env

    assert secret_from_env({"X_TOKEN": "plain-words-secret"}, "X_TOKEN") is not None
    assert redact("webhook 'plain-words-secret': no scheme") == "webhook '***': no scheme"


def test_config_check_never_prints_a_secret(tmp_path: Path) -> None:
    password_file = tmp_path / "pw"
    password_file.write_text(SECRET + "\n")
    url_file = tmp_path / "url"
    url_file.write_text(f"https://hooks.example.com/services/T01ABCDEF2/B02GHIJKL3/{TOKEN}\n")
    config = tmp_path / "c.toml"
    config.write_text(
        f'[store]\ndsn = "http://alice:{SECRET}@127.0.0.1:8123/inferwatch"\n'
        f'[routes.webhook]\nurl = "https://soc.example.bank/hooks/x?token={SECRET}"\n'
    )
    code, out = cli("config", "check", "--config", str(config))
    assert code == 0 and "http://alice:***@127.0.0.1:8123/inferwatch" in out, out
    assert "https://soc.example.bank/hooks/x?token=***" in out and SECRET not in out
    env = {
        "INFERWATCH_STORE": "http://alice@127.0.0.1:8123",
        "INFERWATCH_STORE_PASSWORD_FILE": str(password_file),
        "INFERWATCH_WEBHOOK_URL_FILE": str(url_file),
    }
    code, out = cli("config", "check", env=env)
    assert code == 0 and "store.password from INFERWATCH_STORE_PASSWORD_FILE" in out, out
    assert "routes.webhook.url from INFERWATCH_WEBHOOK_URL_FILE" in out
    assert "https://hooks.example.com/services/***/***/***" in out
    assert SECRET not in out and TOKEN not in out


def test_secrets_come_from_a_variable_or_its_file_never_both(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text(f"  {SECRET}\n")
    cfg = load(None, {"INFERWATCH_STORE_PASSWORD_FILE": str(pw)})
    assert cfg.store_password == SECRET and SECRET not in repr(cfg)
    assert load(None, {"INFERWATCH_STORE_PASSWORD": SECRET}).store_password == SECRET
    in_file = tmp_path / "c.toml"
    in_file.write_text(f'[store]\npassword_file = "{pw}"\n')
    assert load(in_file, {}).store_password == SECRET
    url = tmp_path / "url"
    url.write_text("https://hooks.example.com/x\n")
    hook = load(None, {"INFERWATCH_WEBHOOK_URL_FILE": str(url)}).webhook
    assert hook is not None and hook["url"] == "https://hooks.example.com/x"
    (tmp_path / "empty").write_text("\n")
    wrong = [
        ({"INFERWATCH_STORE_PASSWORD": "a", "INFERWATCH_STORE_PASSWORD_FILE": str(pw)},
         "INFERWATCH_STORE_PASSWORD and INFERWATCH_STORE_PASSWORD_FILE are both set"),
        ({"INFERWATCH_STORE_PASSWORD_FILE": "/nonexistent/pw"}, "cannot read it"),
        ({"INFERWATCH_STORE_PASSWORD_FILE": str(tmp_path)}, "INFERWATCH_STORE_PASSWORD_FILE="),
        ({"INFERWATCH_WEBHOOK_URL_FILE": str(tmp_path / "empty")}, "the file is empty"),
        ({"INFERWATCH_WEBHOOK_URL_FILE": str(pw)},
         "INFERWATCH_WEBHOOK_URL_FILE: routes.webhook.url"),
    ]  # fmt: skip
    for env, message in wrong:
        with pytest.raises(ConfigError) as err:
            load(None, env)
        assert message in str(err.value), (env, str(err.value))


@pytest.mark.parametrize(
    ("dsn", "env"),
    [
        (f"http://alice:{SECRET}@127.0.0.1:{{port}}", {}),
        (f"http://alice:{SECRET}@127.0.0.1:{{port}}/db?password={SECRET}", {}),
        ("http://alice@127.0.0.1:{port}", {"INFERWATCH_STORE_PASSWORD": SECRET}),
    ],
)
def test_a_failing_run_never_prints_the_store_password(
    events: Path, dsn: str, env: dict[str, str]
) -> None:
    port = closed_port()
    code, out = cli(
        "run", "--source", f"file:{events}", "--store", dsn.format(port=port), "-q", env=env
    )
    assert code == 2 and len(out.splitlines()) == 1, out
    assert f"127.0.0.1:{port}" in out and SECRET not in out, out


def test_a_failing_run_process_prints_one_redacted_line(events: Path) -> None:
    port = closed_port()
    dsn = f"http://alice:{SECRET}@127.0.0.1:{port}"
    ran = subprocess.run(
        [sys.executable, "-m", "streams.cli", "run", "--source", f"file:{events}", "--store",
         dsn, "-q"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert ran.returncode == 2 and SECRET not in ran.stdout + ran.stderr
    assert (
        ran.stderr
        == f"error: store http://alice:***@127.0.0.1:{port} unreachable: "
        + (ran.stderr.split(" unreachable: ", 1)[1])
    )
    assert len(ran.stderr.splitlines()) == 1 and "Traceback" not in ran.stderr


@pytest.fixture()
def refusing_server() -> Iterator[tuple[int, list[str]]]:
    """An HTTP server answering every request as ClickHouse does a wrong password, recording
    the Authorization headers it was sent."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.do_POST()

        def do_POST(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            body = (
                b"Code: 516. DB::Exception: alice: Authentication failed. (AUTHENTICATION_FAILED)"
            )
            self.send_response(401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


def test_the_password_file_reaches_the_server_and_not_the_screen(
    tmp_path: Path, events: Path, refusing_server: tuple[int, list[str]]
) -> None:
    port, seen = refusing_server
    pw = tmp_path / "pw"
    pw.write_text(SECRET)
    code, out = cli(
        "run", "--source", f"file:{events}", "--store", f"http://alice@127.0.0.1:{port}", "-q",
        env={"INFERWATCH_STORE_PASSWORD_FILE": str(pw)},
    )  # fmt: skip
    assert code == 2 and len(out.splitlines()) == 1 and SECRET not in out, out
    assert f"store http://alice@127.0.0.1:{port}" in out
    assert f"Basic {base64.b64encode(f'alice:{SECRET}'.encode()).decode()}" in seen


def test_log_records_and_tracebacks_are_redacted(tmp_path: Path) -> None:
    script = (
        "import logging\n"
        "from streams.store.credentials import install_redaction\n"
        "install_redaction()\n"
        "logging.getLogger('streams.sources.kafka').warning(\n"
        f"    'commit failed: %s', 'kafka broker sasl.password={SECRET}')\n"
        f"raise RuntimeError('store http://alice:{SECRET}@db:8123 refused')\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert ran.returncode == 1 and SECRET not in ran.stderr, ran.stderr
    assert "commit failed: kafka broker sasl.password=***" in ran.stderr
    assert "RuntimeError: store http://alice:***@db:8123 refused" in ran.stderr
