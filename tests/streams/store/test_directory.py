"""The store directory (issue 14, item 11): only a new, empty or marked directory becomes a
store, ``demo --fresh`` empties only a store it recognises and never the root, a home or a
directory above the current one, the lock and key files are never opened through a link, and
the directory and key files are owner-only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streams.cli.demo import DemoError, prepare_store
from streams.cli.main import app
from streams.sim.simulate import write as simulate_write
from streams.store.store import Store, StoreError
from streams.worker.buffers import hmac_key
from streams.worker.environment import Environment

MARKER = "inferwatch.store"  # the documented marker of a store directory


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("events") / "events.jsonl"
    simulate_write("quiet", 200, 3, path)
    return path


def foreign(tmp_path: Path, *, with_lock: bool = False) -> Path:
    """A user's directory; ``with_lock``: as today's ``run`` left it (lock and chdb files)."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    if with_lock:
        (theirs / "inferwatch.lock").write_text("123\n")
        (theirs / "metadata").mkdir()
        (theirs / "store").mkdir()
    return theirs


@pytest.mark.parametrize("with_lock", [False, True])
def test_a_foreign_directory_survives_run_and_demo(
    tmp_path: Path, events: Path, with_lock: bool
) -> None:
    # --store chdb:/// took / the same way: any non-empty directory without the marker
    theirs = foreign(tmp_path, with_lock=with_lock)
    before = sorted(p.name for p in theirs.iterdir())
    code, _, err = cli("run", "--source", f"file:{events}", "--store", f"chdb:{theirs}", "-q")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"store {theirs} is not an inferwatch store: it holds " in err and "notes.txt" in err
    code, _, err = cli("demo", "--events", "10", "--store", f"chdb:{theirs}")
    assert code == 2 and "not an inferwatch store" in err, err
    with pytest.raises(DemoError, match="not an inferwatch store"):
        prepare_store(f"chdb:{theirs}", fresh=False)
    assert sorted(p.name for p in theirs.iterdir()) == before
    assert (theirs / "notes.txt").read_text() == "keep me"


def test_the_root_directory_is_never_a_store() -> None:
    # Checked without opening a store on / (a regression would write there): the same check
    # refuses the foreign directories above, through run and demo.
    from streams.store.directory import StoreDirError, prepare, protected

    with pytest.raises(StoreDirError, match="store / is not an inferwatch store"):
        prepare(Path("/"))
    assert protected(Path("/")) == "the root directory"


def test_demo_never_empties_a_home_or_a_directory_above_the_current_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    Store(f"chdb:{home}").close()  # even a real store, if it is a home directory
    (home / "keep.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(DemoError, match="which is a home directory"):
        prepare_store(f"chdb:{home}", fresh=True)
    assert (home / "keep.txt").exists()
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    below = home / "demo" / "deeper"
    below.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(below)
    with pytest.raises(DemoError, match="above the current directory"):
        prepare_store(f"chdb:{home}", fresh=True)
    assert (home / "keep.txt").exists()


def test_a_store_made_before_the_marker_is_recognised_and_marked(tmp_path: Path) -> None:
    old = tmp_path / "old"
    with Store(f"chdb:{old}") as st:
        st.command("INSERT INTO schema_migrations VALUES (9999, 'probe', now())")
    (old / MARKER).unlink()  # a store as the previous release left it
    (old / "hmac.key").write_text("k" * 64)
    with Store(f"chdb:{old}") as st:  # opened, with its data, and marked
        assert st.query("SELECT count() FROM schema_migrations WHERE version = 9999").first_row
    assert (old / MARKER).is_file()
    assert prepare_store(f"chdb:{old}", fresh=True) == old  # a store demo may clear
    assert [p.name for p in old.iterdir()] == [MARKER]
    (old / MARKER).unlink()
    Store(f"chdb:{old}").close()
    (old / MARKER).unlink()
    (old / "report.pdf").write_text("someone's")  # not ours, not chdb's: not recognised
    with pytest.raises(StoreError, match=r"report\.pdf"):
        Store(f"chdb:{old}")


def test_a_store_path_that_is_a_file_is_one_line(tmp_path: Path, events: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = cli("run", "--source", f"file:{events}", "--store", f"chdb:{afile}", "-q")
    assert code == 2 and err == f"error: store {afile} is a file, not a directory\n"


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    st_dir = tmp_path / "s"
    Store(f"chdb:{st_dir}").close()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (st_dir / "inferwatch.lock").unlink()
    (st_dir / "inferwatch.lock").symlink_to(victim)
    with pytest.raises(StoreError, match=r"inferwatch\.lock is a symbolic link"):
        Store(f"chdb:{st_dir}")
    with pytest.raises(DemoError, match="symbolic link"):
        prepare_store(f"chdb:{st_dir}", fresh=True)
    assert victim.read_text() == "precious"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to another user")
def test_a_lock_file_of_another_user_is_refused(tmp_path: Path) -> None:
    st_dir = tmp_path / "s"
    Store(f"chdb:{st_dir}").close()
    os.chown(st_dir / "inferwatch.lock", 65534, 65534)
    with pytest.raises(StoreError, match="owned by uid 65534"):
        Store(f"chdb:{st_dir}")


def test_a_symlinked_hmac_key_is_refused(tmp_path: Path) -> None:
    planted = tmp_path / "known.key"
    planted.write_text("attacker-chosen-key")
    with Store(f"chdb:{tmp_path / 's'}") as st:
        (tmp_path / "s" / "hmac.key").symlink_to(planted)
        with pytest.raises(ValueError, match=r"hmac\.key is a symbolic link"):
            hmac_key(st, Environment.read())


def test_store_directory_and_key_files_are_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INFERWATCH_HMAC_KEY", raising=False)
    monkeypatch.delenv("INFERWATCH_HMAC_KEY_FILE", raising=False)
    old = os.umask(0o022)
    try:
        with Store(f"chdb:{tmp_path / 'a' / 's'}") as st:
            key = hmac_key(st, Environment.read())
    finally:
        os.umask(old)
    root = tmp_path / "a" / "s"

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(root) == 0o700
    for name in ("hmac.key", "inferwatch.lock", MARKER):
        assert mode(root / name) == 0o600, name
    assert len(key) == 64
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temp left
