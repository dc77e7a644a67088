"""Store DSNs, error classes and migrations."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from streams.store.store import Store, StoreError, TransientStoreError, migration_files, parse_dsn


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_store_on_a_closed_http_port_is_a_transient_error() -> None:
    port = closed_port()
    with pytest.raises(TransientStoreError, match=f"store http://127.0.0.1:{port} unreachable"):
        Store(f"http://127.0.0.1:{port}")


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("mysql://db", r"expected chdb:DIR or http\(s\)://HOST:PORT"),
        ("chdb:", "chdb needs a directory"),
        ("", "expected chdb:DIR"),
    ],
)
def test_store_rejects_bad_dsns_with_what_was_expected(dsn: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        parse_dsn(dsn)


def test_store_migrations_apply_once_and_are_ordered(tmp_path: Path) -> None:
    versions = [v for v, _, _ in migration_files()]
    assert versions == sorted(versions) and versions[0] == 1
    with Store(f"chdb:{tmp_path / 's'}") as store:
        assert store.applied == [name for _, name, _ in migration_files()]
        tables = {r[0] for r in store.query("SHOW TABLES").result_rows}
    assert {"events", "findings", "alerts", "window_metrics", "incidents", "dead_letters"} <= tables
    assert {"detector_state", "checkpoints", "model_references"} <= tables
    with Store(f"chdb:{tmp_path / 's'}") as store:
        assert store.applied == []
