"""Secrets: where they come from, and the one redaction applied to everything we print or log.

A secret is read from a variable or from the file a ``*_FILE`` variable names (the convention of
Docker and Kubernetes secrets: the file's content, surrounding whitespace stripped), never both.
Every secret read is remembered for the life of the process, and :func:`redact` replaces it
wherever it appears. Besides those, :func:`redact` rewrites every URL it finds: the password of
``user:password@`` (and a user name that looks like a token), every query value, the fragment,
and, in an http(s) URL, each path segment that looks like a token (8 characters or more with a
digit, or 16 or more): webhook URLs carry their token in the path (Slack, Teams, Discord).
``password=…``, ``token: …`` and ``Bearer …`` outside URLs are redacted as well. The CLI's
errors, ``config check``, store errors, the local API's errors, the worker's log records and an
uncaught exception's traceback all go through it.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
import sys
import threading
import traceback
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from streams.store.directory import KEY_NAME, UnsafeFileError, open_owned

HIDDEN = "***"
MAX_SECRET_BYTES = 1 << 16
_known: set[str] = set()
_known_lock = threading.Lock()
_URL = re.compile(r"\b(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>[^\s'\"<>`]+)")
_PAIR = re.compile(
    r"(?i)\b(?P<key>password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|auth)"
    r"(?P<sep>\s*[=:]\s*)(?P<value>[^\s,;'\"&]+)"
)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")


class SecretError(ValueError):
    """A secret cannot be read as configured; the message names the variable or file."""


def mask(secret: str) -> None:
    """Remember ``secret`` so :func:`redact` hides it wherever it appears (4 characters or more:
    a shorter one would blank out ordinary words). Of a URL, only the parts :func:`redact`
    hides are remembered, so the rest (scheme, host, path) stays readable in messages."""
    secret = secret.strip()
    parts = [secret]
    match = _URL.fullmatch(secret)
    if match:
        original, shown = secret, _redact_url(match)
        parts = [
            p for p in re.split(r"[/?#&=@:]", original) if p not in re.split(r"[/?#&=@:]", shown)
        ]
    with _known_lock:
        _known.update(p for p in parts if len(p) >= 4)


def _token_like(text: str) -> bool:
    return len(text) >= 16 or (len(text) >= 8 and any(c.isdigit() for c in text))


def _redact_url(match: re.Match[str]) -> str:
    scheme, rest = match["scheme"], match["rest"]
    rest, hash_, fragment = rest.partition("#")
    rest, qmark, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        user = HIDDEN if _token_like(user) else user
        userinfo = f"{user}:{HIDDEN}" if colon else user
    if path and scheme.lower() in ("http", "https"):
        path = "/".join(HIDDEN if _token_like(seg) else seg for seg in path.split("/"))
    if query:
        query = "&".join(
            f"{k}={HIDDEN}" if eq else (HIDDEN if _token_like(k) else k)
            for k, eq, _v in (item.partition("=") for item in query.split("&"))
        )
    fragment = HIDDEN if fragment else ""
    return f"{scheme}://{userinfo}{at}{host}{slash}{path}{qmark}{query}{hash_}{fragment}"


def redact(text: str) -> str:
    """``text`` with credentials replaced by ``***``.

    >>> redact("store http://alice:s3cret@db.example:8123/inferwatch unreachable")
    'store http://alice:***@db.example:8123/inferwatch unreachable'
    >>> redact("https://hooks.slack.com/services/T0123ABC/B0456DEF/Xy7kQ2mN9pL4rS8tV1wZ3aB5")
    'https://hooks.slack.com/services/***/***/***'
    >>> redact("https://soc.example.bank/hooks/inferwatch?token=abc&v=1")
    'https://soc.example.bank/hooks/inferwatch?token=***&v=***'
    >>> redact("kafka://broker:9092/inferwatch.events.v1 password=hunter22")
    'kafka://broker:9092/inferwatch.events.v1 password=***'
    """
    text = _URL.sub(_redact_url, text)
    text = _PAIR.sub(lambda m: f"{m['key']}{m['sep']}{HIDDEN}", text)
    text = _BEARER.sub(lambda m: f"{m[1]} {HIDDEN}", text)
    with _known_lock:
        known = sorted(_known, key=len, reverse=True)
    for secret in known:
        text = text.replace(secret, HIDDEN)
    return text


def read_secret_file(path: str | Path, what: str) -> str:
    """The content of a secret file (stripped); SecretError names ``what`` (the variable or key)
    when it is missing, not a regular file, unreadable, empty or larger than 64 KiB. Symbolic
    links are followed: a Kubernetes secret volume is made of them."""
    where = f"{what}={path}"
    try:
        with open(path, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise SecretError(f"{where}: not a regular file")
            data = fh.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise SecretError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_SECRET_BYTES:
        raise SecretError(f"{where}: larger than {MAX_SECRET_BYTES} bytes; not a secret file")
    try:
        value = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SecretError(f"{where}: not UTF-8 text") from None
    if not value:
        raise SecretError(f"{where}: the file is empty")
    mask(value)
    return value


def secret_from_env(env: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """(value, variable) from ``name`` or the file ``name_FILE`` names; None if neither is set.
    Both set is an error: which one wins would be a guess."""
    direct, file_var = env.get(name, ""), f"{name}_FILE"
    path = env.get(file_var, "")
    if direct and path:
        raise SecretError(f"{name} and {file_var} are both set; set one")
    if direct:
        mask(direct)
        return direct, name
    if path:
        return read_secret_file(path, file_var), file_var
    return None


def hmac_key(directory: Path | None, env: Mapping[str, str]) -> bytes:
    """The keyed-fingerprint secret: ``INFERWATCH_HMAC_KEY`` or ``INFERWATCH_HMAC_KEY_FILE``,
    else ``DIR/hmac.key`` of an embedded store, made once (0600, never through a link)."""
    given = secret_from_env(env, "INFERWATCH_HMAC_KEY")
    if given is not None:
        return given[0].encode()
    if directory is None:
        raise SecretError("a server store needs INFERWATCH_HMAC_KEY or INFERWATCH_HMAC_KEY_FILE")
    path = directory / KEY_NAME
    try:
        if not os.path.lexists(path):
            _create_key(path)
        fd = open_owned(path, os.O_RDONLY)
        try:
            key = os.read(fd, MAX_SECRET_BYTES).strip()
        finally:
            os.close(fd)
    except OSError as exc:  # UnsafeFileError included
        detail = str(exc) if isinstance(exc, UnsafeFileError) else f"{path}: {exc.strerror}"
        raise SecretError(f"HMAC key {detail}") from None
    if not key:
        raise SecretError(f"HMAC key {path} is empty; restore it (fingerprints depend on it)")
    return key


def _create_key(path: Path) -> None:
    """Write a new key to a temp file and link it into place: a crash leaves no empty key, and
    a key that appeared meanwhile is kept (``link`` never replaces)."""
    tmp = path.with_name(f".{KEY_NAME}.{os.getpid()}.tmp")
    fd = open_owned(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, secrets.token_hex(32).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


class RedactingFormatter(logging.Formatter):
    """A formatter whose whole output (message, arguments, traceback) goes through redact."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def install_redaction() -> None:
    """Log records printed by logging's last-resort handler (what a worker prints when nothing
    configured logging: WARNING and above, to stderr) and an uncaught exception's traceback go
    through :func:`redact`. Idempotent."""
    if logging.lastResort is not None:
        logging.lastResort.setFormatter(RedactingFormatter("%(message)s"))
    sys.excepthook = _redacted_excepthook


def _redacted_excepthook(
    kind: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    sys.stderr.write(redact("".join(traceback.format_exception(kind, exc, tb))))
