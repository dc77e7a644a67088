"""docs/architecture.md against the tree: its module table names every module of our packages,
and every file the page names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = ("schemas", "detectors", "streams")


def table_modules(text: str) -> list[str]:
    """The module column of the page's module table."""
    return re.findall(r"^\| `([\w/]+\.py)` \|", text, re.M)


def tree_modules(root: Path = ROOT) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for pkg in PACKAGES
        for p in (root / pkg).rglob("*.py")
        if p.name != "__init__.py"
    }


def test_architecture_table_reader_finds_rows() -> None:
    text = "| module | what |\n| --- | --- |\n| `a/b.py` | one |\n| `c.py` | two |\nx `d.py`\n"
    assert table_modules(text) == ["a/b.py", "c.py"]


def test_architecture_module_table_lists_every_module() -> None:
    listed = table_modules(DOC.read_text())
    assert len(listed) == len(set(listed)), "a module is listed twice"
    present = tree_modules()
    assert sorted(present - set(listed)) == [], "modules missing from docs/architecture.md"
    assert sorted(set(listed) - present) == [], "docs/architecture.md lists modules that are gone"


def test_architecture_page_names_only_files_that_exist() -> None:
    named = set(re.findall(r"(?<![\w/.])((?:schemas|detectors|streams|tests|load-tests|docs)/"
                           r"[\w/.-]*\w\.(?:py|md|sql|json))", DOC.read_text()))  # fmt: skip
    assert sorted(n for n in named if not (ROOT / n).exists()) == []
