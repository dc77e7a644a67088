"""The embedded store's directory: what makes a directory a store, and its private files.

A store is recognised by its marker, ``DIR/inferwatch.store``, written when the store is
created (into a new or empty directory). A store made before the marker existed holds our lock
file and chdb's own files and nothing else; it is recognised as a store and gets the marker. Any
other non-empty directory is not a store: nothing writes into it, and ``demo --fresh`` never
empties it, nor ``/``, a home directory, or a directory above the current one or a home.

The files we keep in the directory (lock, marker, HMAC key) are opened without following
symbolic links and must be regular files owned by this process's user: a link planted there
would otherwise make us truncate, overwrite or trust a file elsewhere. The directory and those
files are created owner-only (0700 and 0600).
"""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import stat
from enum import StrEnum
from pathlib import Path

MARKER_NAME = "inferwatch.store"
MARKER_TEXT = b"inferwatch store, format 1\n"
LOCK_NAME = "inferwatch.lock"
KEY_NAME = "hmac.key"
# What we keep in a store directory, besides chdb's files (temp files of api.json and the key
# start with a dot or the key's name).
OURS = frozenset({MARKER_NAME, LOCK_NAME, KEY_NAME, "api.json", "demo"})
OURS_PREFIXES = (".api.json.", f".{KEY_NAME}.")
# What chdb (the ClickHouse engine) creates in its path.
CHDB = frozenset(
    {
        "data", "metadata", "metadata_dropped", "store", "tmp", "user_files", "user_scripts",
        "user_defined", "flags", "format_schemas", "preprocessed_configs", "access",
        "named_collections", "dictionaries_lib", "disks", "backups", "status", "uuid",
    }
)  # fmt: skip
DIR_MODE = 0o700
FILE_MODE = 0o600


class StoreDirError(Exception):
    """The directory cannot be used as a store (or cleared) as asked; the message says why."""


class UnsafeFileError(OSError):
    """A file we keep is a symbolic link, not a regular file, or someone else's."""


class Kind(StrEnum):
    missing = "missing"
    empty = "empty"
    store = "store"  # has the marker
    legacy = "legacy"  # a store made before the marker: our lock and chdb's files only
    foreign = "foreign"


def open_owned(path: Path, flags: int, mode: int = FILE_MODE) -> int:
    """``os.open`` that never follows a symbolic link, and a descriptor only for a regular file
    owned by our user (``O_NONBLOCK``, so a FIFO planted in its place cannot hang us)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(f"{path} is a symbolic link; refusing to follow it") from None
        raise
    info = os.fstat(fd)
    problem = ""
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_uid != os.geteuid():
        problem = f"is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()})"
    if problem:
        os.close(fd)
        raise UnsafeFileError(f"{path} {problem}; refusing to use it")
    return fd


def read_owned(path: Path, max_bytes: int = 1 << 16) -> bytes:
    fd = open_owned(path, os.O_RDONLY)
    try:
        return os.read(fd, max_bytes)
    finally:
        os.close(fd)


def _is_ours(name: str) -> bool:
    return name in OURS or name.startswith(OURS_PREFIXES)


def inspect(path: Path) -> tuple[Kind, list[str]]:
    """What ``path`` is, and its entries (sorted). Raises StoreDirError when it is not a
    directory or cannot be listed, and UnsafeFileError for a marker we must not trust."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return Kind.missing, []
    except OSError as exc:
        raise StoreDirError(f"store {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise StoreDirError(f"store {path} is a file, not a directory")
    try:
        entries = sorted(os.listdir(path))
    except OSError as exc:
        raise StoreDirError(f"store {path}: cannot list it: {exc.strerror}") from None
    if not entries:
        return Kind.empty, entries
    if MARKER_NAME in entries:
        if not read_owned(path / MARKER_NAME).startswith(MARKER_TEXT[:16]):
            raise StoreDirError(f"store {path}: {MARKER_NAME} is not an inferwatch store marker")
        return Kind.store, entries
    if LOCK_NAME in entries and all(_is_ours(e) or e in CHDB for e in entries):
        return Kind.legacy, entries
    return Kind.foreign, entries


def foreign_error(path: Path, entries: list[str]) -> StoreDirError:
    """What was found, the entries that are neither ours nor chdb's first."""
    strangers = [e for e in entries if not (_is_ours(e) or e in CHDB)]
    first = (strangers + [e for e in entries if e not in strangers])[:3]
    shown = ", ".join(first)
    if len(entries) > len(first):
        shown += f" and {len(entries) - len(first)} more"
    return StoreDirError(
        f"store {path} is not an inferwatch store: it holds {shown} and no {MARKER_NAME}; "
        "use a new or empty directory"
    )


def prepare(path: Path) -> Kind:
    """Before the store is opened: create a missing directory (0700), refuse a directory that
    is not a store. The caller takes the lock, then calls :func:`mark` unless it is a store."""
    kind, entries = inspect(path)
    if kind is Kind.foreign:
        raise foreign_error(path, entries)
    if kind is Kind.missing:
        try:
            path.mkdir(parents=True, mode=DIR_MODE)
        except FileExistsError:
            return prepare(path)  # created meanwhile: look again
        except OSError as exc:
            raise StoreDirError(f"store {path}: cannot create it: {exc.strerror}") from None
    return kind


def mark(path: Path) -> None:
    """Make ``path`` a recognised store: the marker, and the directory owner-only."""
    try:
        fd = open_owned(path / MARKER_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return
    try:
        os.write(fd, MARKER_TEXT)
    finally:
        os.close(fd)
    if path.stat().st_uid == os.geteuid():
        path.chmod(DIR_MODE)


def protected(path: Path) -> str:
    """Why ``path`` must never be emptied ('' when it may be): the root, a home directory, or a
    directory that holds the current directory or a home."""
    home = Path.home().resolve()
    homes = {home, *(Path(p.pw_dir).resolve() for p in pwd.getpwall() if p.pw_dir)}
    cwd = Path.cwd().resolve()
    if path == Path(path.anchor):
        return "the root directory"
    if path in homes:
        return "a home directory"
    if path in home.parents:
        return f"a directory above the home directory {home}"
    if path in cwd.parents:
        return f"a directory above the current directory {cwd}"
    return ""


def clear(path: Path) -> None:
    """Empty a recognised store (keeping its marker), for ``demo --fresh``; refuses anything
    else, and never touches a protected directory."""
    why = protected(path)
    if why:
        raise StoreDirError(f"--fresh would empty {path}, which is {why}; pass another --store")
    kind, entries = inspect(path)
    if kind is Kind.foreign:
        raise foreign_error(path, entries)
    for name in entries:
        if name == MARKER_NAME:
            continue
        entry = path / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
