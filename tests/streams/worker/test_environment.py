"""The environment is read in one place, and every ``INFERWATCH_*`` variable the code reads is
the list in streams/worker/environment.py and in the README's configuration section."""

from __future__ import annotations

import re
from pathlib import Path

from streams.worker.environment import VARIABLES, Environment

ROOT = Path(__file__).parents[3]
NAME = re.compile(r"INFERWATCH_[A-Z0-9_]*(?:<[A-Z]+>)?")
FAMILIES = ("INFERWATCH_WORKER_", "INFERWATCH_KAFKA_")


def names_in_code() -> set[str]:
    """Every INFERWATCH_* name in streams/ (a family's prefix stands for the family)."""
    out = set()
    for path in (ROOT / "streams").rglob("*.py"):
        for name in NAME.findall(path.read_text()):
            if name.rstrip("_") == "INFERWATCH":
                continue  # ``INFERWATCH_*`` in prose
            family = next((f for f in FAMILIES if name.startswith(f)), None)
            if name.endswith("_FILE") and name.removesuffix("_FILE") in VARIABLES:
                continue  # the file variant of a secret
            if family is not None:
                name = next(v for v in VARIABLES if v.startswith(family))
            out.add(name.rstrip("_"))
    return out


def test_every_variable_the_code_reads_is_listed_and_in_the_readme() -> None:
    assert names_in_code() == set(VARIABLES)
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    assert set(VARIABLES) <= set(NAME.findall(section)), set(VARIABLES) - set(NAME.findall(section))


def test_only_the_environment_module_reads_os_environ() -> None:
    readers = sorted(
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "streams").rglob("*.py")
        if re.search(r"os\.environ|getenv\(", path.read_text())
    )
    assert readers == ["streams/worker/environment.py"]


def test_environment_keeps_only_inferwatch_variables_frozen() -> None:
    env = Environment.of({"INFERWATCH_FAULT": "kill_mid_batch:1", "PATH": "/bin"})
    assert dict(env.values) == {"INFERWATCH_FAULT": "kill_mid_batch:1"}
    assert (env.fault, env.operator) == ("kill_mid_batch:1", None)
