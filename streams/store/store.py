"""The ClickHouse store: DSNs, the store lock, versioned migrations, and errors by class.

``chdb:DIR`` (the default, ``chdb:./inferwatch-data``) runs the ClickHouse engine in this
process through clickhouse-connect's chdb backend; ``http(s)://HOST:PORT[/DB]`` talks to a
server. Same SQL and client API either way. One process owns an embedded store: we take our own
``flock`` on ``DIR/inferwatch.lock`` (released by the kernel when the process dies, so a restart
after SIGKILL is never refused) and name the owner's pid when it is taken. Only a directory
that is new, empty or already a store is opened (``streams/store/directory.py``). A server DSN's
password may come from ``INFERWATCH_STORE_PASSWORD`` (or ``_FILE``) instead of the DSN; a DSN is
printed with its credentials redacted.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from streams.store import directory as store_dir
from streams.store.credentials import mask, redact
from streams.store.directory import LOCK_NAME as LOCK_NAME
from streams.store.directory import StoreDirError, UnsafeFileError, open_owned

DEFAULT_DSN = "chdb:./inferwatch-data"
# Replacing tables drop duplicates at merge and every read uses FINAL or argMax, so sorting
# each inserted block a second time to drop duplicates early is wasted: it was a third of the
# events insert (load-tests/README.md).
INSERT_SETTINGS = {"optimize_on_insert": 0}
# clickhouse-connect logs a warning before raising what we classify and report in one line;
# without a handler of its own, logging's last resort would print it as a second line.
logging.getLogger("clickhouse_connect").addHandler(logging.NullHandler())


class StoreError(Exception):
    """The store cannot be used as configured (bad DSN, failed migration): not retried."""


class StoreInUseError(StoreError):
    def __init__(self, path: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"store {path} is in use by {who}")
        self.path = path
        self.pid = pid


class TransientStoreError(Exception):
    """The store is unreachable or overloaded: retry with backoff, then pause the partitions."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class Dsn:
    kind: str  # "chdb" | "http" | "https"
    path: Path | None = None  # chdb directory
    url: str = ""

    @property
    def embedded(self) -> bool:
        return self.kind == "chdb"

    def __str__(self) -> str:
        """The DSN as it may be printed: credentials redacted."""
        return f"chdb:{self.path}" if self.path else redact(self.url)


def parse_dsn(dsn: str) -> Dsn:
    """``chdb:DIR`` / ``chdb:///abs/dir`` or ``http(s)://host:port[/database]``.

    >>> parse_dsn("chdb:/tmp/x").path
    PosixPath('/tmp/x')
    >>> parse_dsn("http://127.0.0.1:8123").kind
    'http'
    >>> parse_dsn("mysql://x")
    Traceback (most recent call last):
    ...
    streams.store.store.StoreError: store 'mysql://x': expected chdb:DIR or http(s)://HOST:PORT[/DB]
    """
    if dsn.startswith("chdb:"):
        rest = dsn[len("chdb:") :]
        if rest.startswith("//"):
            rest = rest[2:]
        if not rest:
            raise StoreError(f"store {dsn!r}: chdb needs a directory, e.g. {DEFAULT_DSN}")
        return Dsn("chdb", path=Path(rest).expanduser().resolve())
    if dsn.startswith(("http://", "https://")):
        parts = urllib.parse.urlsplit(dsn)
        if parts.password:
            mask(urllib.parse.unquote(parts.password))
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number in 0..65535
        except ValueError as exc:
            raise StoreError(f"store {redact(dsn)!r}: bad port ({exc})") from None
        if not parts.hostname:
            raise StoreError(f"store {redact(dsn)!r}: expected http(s)://HOST:PORT[/DB]")
        return Dsn(dsn.split(":", 1)[0], url=dsn)
    raise StoreError(f"store {redact(dsn)!r}: expected chdb:DIR or http(s)://HOST:PORT[/DB]")


class StoreLock:
    """``flock`` on the store directory, holding the owner's pid (and the API port, later).
    The lock file is never opened through a symbolic link and must be ours (store_dir)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LOCK_NAME
        self._fd: int | None = None

    def owner(self) -> int | None:
        try:
            text = store_dir.read_owned(self.path, 64).split()
            return int(text[0]) if text else None
        except (OSError, ValueError):
            return None

    def _open(self, flags: int) -> int:
        try:
            return open_owned(self.path, flags)
        except UnsafeFileError as exc:
            raise StoreError(f"store {self.directory}: {exc}") from None
        except OSError as exc:
            raise StoreError(f"store {self.directory}: {LOCK_NAME}: {exc.strerror}") from None

    def acquire(self) -> None:
        fd = self._open(os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreInUseError(self.directory, self.owner()) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def held_elsewhere(self) -> bool:
        """True if another live process holds the lock (probe without keeping it)."""
        if not os.path.lexists(self.path):
            return False
        fd = self._open(os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def classify(exc: BaseException, dsn: Dsn) -> BaseException:
    """Turn a driver error into TransientStoreError (retry) or StoreError (fail at start)."""
    text = str(exc)
    transient_markers = (
        "Connection refused",
        "Max retries exceeded",
        "timed out",
        "Timeout",
        "Connection reset",
        "TOO_MANY_SIMULTANEOUS_QUERIES",
        "MEMORY_LIMIT_EXCEEDED",
        "Name or service not known",
        "Temporary failure",
    )
    first = redact(text.splitlines()[0][:200] if text else type(exc).__name__)
    if isinstance(exc, OSError | TimeoutError) or any(m in text for m in transient_markers):
        return TransientStoreError(f"store {dsn} unreachable: {first}")
    return exc


def connect(dsn: Dsn, connect_timeout_s: float = 5.0, password: str | None = None) -> Any:
    """A clickhouse-connect client for ``dsn``; connection failures are classified, and any
    other failure to connect is a StoreError naming the store (redacted), not a traceback."""
    import clickhouse_connect

    try:
        if dsn.embedded:
            assert dsn.path is not None
            return clickhouse_connect.get_client(dsn=f"chdb://{dsn.path}")
        extra: dict[str, Any] = {"password": password} if password else {}
        return clickhouse_connect.get_client(
            dsn=dsn.url, connect_timeout=connect_timeout_s, send_receive_timeout=30, **extra
        )
    except Exception as exc:
        classified = classify(exc, dsn)
        if classified is exc:
            first = redact(str(exc).splitlines()[0][:200] if str(exc) else "")
            raise StoreError(
                f"store {dsn}: cannot connect ({type(exc).__name__}: {first})"
            ) from exc
        raise classified from exc


def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration shipped in ``schemas/clickhouse``, in order."""
    folder = resources.files("schemas") / "clickhouse"
    out = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            out.append((version, entry.name, entry.read_text()))
    return sorted(out)


def split_sql(sql: str) -> list[str]:
    lines = [ln for ln in sql.splitlines() if not ln.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def migrate(client: Any, ttl_days: int = 30) -> list[str]:
    """Apply the migrations the store has not seen; returns the names applied."""
    client.command(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, "
        "applied_at DateTime64(3, 'UTC')) ENGINE = ReplacingMergeTree ORDER BY version"
    )
    done = {r[0] for r in client.query("SELECT version FROM schema_migrations FINAL").result_rows}
    applied = []
    for version, name, sql in migration_files():
        if version in done:
            continue
        for statement in split_sql(sql.replace("{ttl_days}", str(int(ttl_days)))):
            client.command(statement)
        client.insert(
            "schema_migrations",
            [[version, name, datetime.now(UTC)]],
            column_names=["version", "name", "applied_at"],
        )
        applied.append(name)
    return applied


class Store:
    """An open store: the client, and for an embedded store the lock that makes it ours."""

    def __init__(
        self,
        dsn: str = DEFAULT_DSN,
        ttl_days: int = 30,
        lock: bool = True,
        password: str | None = None,
    ) -> None:
        self.dsn = parse_dsn(dsn)
        self.next_seq = 0  # checkpoint sequence, shared by the workers of this process
        self.lock: StoreLock | None = None
        # The worker thread and the local API's threads share one client; the chdb client must
        # never run two calls at once, so every use of it takes this lock.
        self._client_lock = threading.RLock()
        if password and urllib.parse.urlsplit(self.dsn.url).password:
            raise StoreError(
                f"store {self.dsn}: the DSN has a password and INFERWATCH_STORE_PASSWORD "
                "(or _FILE) gives another; give it once"
            )
        if self.dsn.embedded and lock:
            assert self.dsn.path is not None
            self._open_directory(self.dsn.path)
        try:
            self.client = connect(self.dsn, password=password)
            self.applied = migrate(self.client, ttl_days)
        except BaseException:
            self.close()
            raise

    def _open_directory(self, path: Path) -> None:
        """Refuse a directory that is not a store, lock it, and mark it a store."""
        try:
            kind = store_dir.prepare(path)
        except StoreDirError as exc:
            raise StoreError(str(exc)) from None
        except UnsafeFileError as exc:
            raise StoreError(f"store {path}: {exc}") from None
        except OSError as exc:
            raise StoreError(f"store {path}: {exc.strerror or exc}") from None
        self.lock = StoreLock(path)
        self.lock.acquire()
        if kind is not store_dir.Kind.store:
            try:
                store_dir.mark(path)
            except OSError as exc:
                self.close()
                raise StoreError(f"store {path}: cannot write its marker: {exc}") from None

    @property
    def directory(self) -> Path | None:
        return self.dsn.path

    def query(
        self, sql: str, parameters: dict[str, Any] | None = None, binary: bool = False
    ) -> Any:
        """Run a read; ``binary`` returns String columns as bytes (state blobs, raw messages)."""
        formats = {"String": "bytes"} if binary else None
        try:
            with self._client_lock:
                return self.client.query(sql, parameters=parameters or {}, query_formats=formats)
        except Exception as exc:
            raise classify(exc, self.dsn) from exc

    def query_arrow(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        """Run a read into an Arrow table (bulk reads: no Python object per value)."""
        try:
            with self._client_lock:
                return self.client.query_arrow(sql, parameters=parameters or {})
        except Exception as exc:
            raise classify(exc, self.dsn) from exc

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        try:
            with self._client_lock:
                return self.client.command(sql, parameters=parameters or {})
        except Exception as exc:
            raise classify(exc, self.dsn) from exc

    def insert_arrow(self, table: str, data: Any) -> None:
        if data.num_rows == 0:
            return
        try:
            with self._client_lock:
                self.client.insert_arrow(table, data, settings=INSERT_SETTINGS)
        except Exception as exc:
            raise classify(exc, self.dsn) from exc

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            with self._client_lock:
                client.close()
                self.client = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
