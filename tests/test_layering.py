"""The import direction of the packages, read from the source with ``ast`` (nothing is imported).

- No import cycle between modules, nor between packages: at every level of the tree the
  subpackages and modules of one package import each other in one direction only. Imports
  inside functions count (they still run, and hide a cycle from a module-level reading);
  imports only under ``if TYPE_CHECKING:`` do not (they never run).
- ``detectors/`` is pure: it imports nothing of ``streams/``, not even in a doctest.
- ``schemas/`` imports nothing of ours but ``schemas/``.

Modules are found from the files present, so the test holds for any layout of the packages.
"""

from __future__ import annotations

import ast
import doctest
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
PACKAGES = ("schemas", "detectors", "streams")

# Edges (importer, imported) of the cycles still known, each to be removed with its cycle;
# the check runs on the graph without them, so no new cycle can hide behind one.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()  # none left
# Imports of streams/ from detectors/ still known, each to be removed.
KNOWN_LAYER_EDGES: set[tuple[str, str]] = {
    # the doctest of privacy.query_probing builds its traffic with the simulator
    ("detectors.privacy.query_probing.detector", "streams.sim.callers"),
    ("detectors.privacy.query_probing.detector", "streams.sim.privacy"),
}

Edge = tuple[str, str]


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of our packages (a package is its ``__init__``)."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: at module level or in a function, but not in the
    body of ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            for other in node.orelse:
                yield from _imports(ast.Module(body=[other], type_ignores=[]))
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _imports(node)


def _targets(
    module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: Iterable[str]
) -> Iterator[str]:
    """Our modules an import statement loads: ``from a.b import c`` loads ``a.b.c`` when that is
    a module, else ``a.b``; relative imports are resolved against the importing module."""
    known = set(known)
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join([*anchor, *([base] if base else [])])
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        yield sub if sub in known else base


def edges_of(module: str, source: str, known: Iterable[str], is_package: bool = False) -> set[Edge]:
    """The import edges of one module to modules of ours (``known``). Imports of the module
    itself or of a package containing it are left out: those are initialised before it."""
    known = set(known)
    out: set[Edge] = set()
    for node in _imports(ast.parse(source)):
        for target in _targets(module, is_package, node, known):
            while target and target not in known:  # a name of a module: its package
                target = target.rpartition(".")[0]
            if target and not (module + ".").startswith(target + "."):
                out.add((module, target))
    return out


def doctest_imports(module: str, source: str, known: Iterable[str]) -> set[Edge]:
    """The import edges of the examples in a module's docstrings."""
    known = set(known)
    out: set[Edge] = set()
    parser = doctest.DocTestParser()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        text = ast.get_docstring(node, clean=False)
        for example in parser.get_examples(text or ""):
            try:
                out |= edges_of(module, example.source, known)
            except SyntaxError:
                continue
    return out


def graph(root: Path = ROOT) -> set[Edge]:
    mods = modules(root)
    out: set[Edge] = set()
    for name, path in mods.items():
        out |= edges_of(name, path.read_text(), mods, path.name == "__init__.py")
    return out


def sibling_edges(edges: Iterable[Edge]) -> dict[str, set[Edge]]:
    """Per package, the imports between its direct children (subpackages and modules): an
    import of ``a.x.m`` from ``a.y.n`` is an edge ``a.y -> a.x`` in package ``a``. Imports
    between a package and what it contains are not edges between siblings."""
    out: dict[str, set[Edge]] = {}
    for a, b in edges:
        pa, pb = a.split("."), b.split(".")
        k = 0
        while k < min(len(pa), len(pb)) and pa[k] == pb[k]:
            k += 1
        if k == len(pa) or k == len(pb):
            continue
        parent = ".".join(pa[:k])
        out.setdefault(parent, set()).add((".".join(pa[: k + 1]), ".".join(pb[: k + 1])))
    return out


def cycles(edges: Iterable[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan, iterative)."""
    succ: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        succ.setdefault(a, []).append(b)
        succ.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in succ:
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on_stack.add(v)
            if i < len(succ[v]):
                work.append((v, i + 1))
                w = succ[v][i]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return sorted(found)


def problems(edges: set[Edge], doctest_edges: Iterable[Edge] = ()) -> list[str]:
    """Every broken rule, one line each."""
    out = []
    live = edges - KNOWN_CYCLE_EDGES
    for comp in cycles(live):
        inner = sorted((a, b) for a, b in live if a in comp and b in comp)
        out.append(f"import cycle between modules {comp}: {inner}")
    for parent, sib in sorted(sibling_edges(live).items()):
        for comp in cycles(sib):
            inner = sorted((a, b) for a, b in live if _under(a, comp) and _under(b, comp))
            where = parent or "the root"
            out.append(f"import cycle between the packages {comp} of {where}: {inner}")
    for a, b in sorted(edges | set(doctest_edges)):
        pure = a.split(".")[0] == "detectors" and (a, b) not in KNOWN_LAYER_EDGES
        if pure and b.split(".")[0] == "streams":
            out.append(f"{a} imports {b}: detectors/ must not import streams/")
        if a.split(".")[0] == "schemas" and b.split(".")[0] != "schemas":
            out.append(f"{a} imports {b}: schemas/ imports nothing of ours")
    return list(dict.fromkeys(out))


def _under(module: str, names: list[str]) -> bool:
    return any(module == n or module.startswith(n + ".") for n in names)


def test_layering_packages_import_in_one_direction() -> None:
    mods = modules()
    edges = graph()
    doc = set()
    for name, path in mods.items():
        if name.startswith("detectors"):
            doc |= doctest_imports(name, path.read_text(), mods)
    assert len(mods) > 50 and len(edges) > 100, "the import graph was not read"
    assert problems(edges, doc) == []


def test_layering_known_exceptions_are_still_real() -> None:
    """An allow-list entry whose import is gone is removed with it, so the list only shrinks."""
    mods = modules()
    edges = graph()
    doc = set()
    for name, path in mods.items():
        doc |= doctest_imports(name, path.read_text(), mods)
    assert edges >= KNOWN_CYCLE_EDGES
    assert edges | doc >= KNOWN_LAYER_EDGES


def test_layering_sees_function_level_imports_and_skips_type_checking() -> None:
    known = {"streams.a", "streams.b", "streams.c", "streams.pkg", "streams.pkg.m"}
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from streams.c import C\n"
        "else:\n    import streams.pkg.m\n"
        "def f():\n    from streams import b\n    return b\n"
        "class K:\n    def g(self):\n        from . import pkg\n"
    )
    assert edges_of("streams.a", source, known) == {
        ("streams.a", "streams.b"),
        ("streams.a", "streams.pkg"),
        ("streams.a", "streams.pkg.m"),
    }
    assert edges_of("streams.pkg.m", "from .. import c\nfrom . import x", known) == {
        ("streams.pkg.m", "streams.c")
    }


def test_layering_reports_module_and_package_cycles_and_wrong_directions() -> None:
    assert problems({("streams.a", "streams.b"), ("streams.b", "streams.a")}) == [
        "import cycle between modules ['streams.a', 'streams.b']: "
        "[('streams.a', 'streams.b'), ('streams.b', 'streams.a')]",
        "import cycle between the packages ['streams.a', 'streams.b'] of streams: "
        "[('streams.a', 'streams.b'), ('streams.b', 'streams.a')]",
    ]
    # modules without a cycle whose packages import each other
    pkg = {("streams.x.one", "streams.y.one"), ("streams.y.two", "streams.x.two")}
    assert problems(pkg) == [
        "import cycle between the packages ['streams.x', 'streams.y'] of streams: "
        "[('streams.x.one', 'streams.y.one'), ('streams.y.two', 'streams.x.two')]"
    ]
    assert problems({("detectors.d", "streams.s"), ("schemas.s", "detectors.base")}) == [
        "detectors.d imports streams.s: detectors/ must not import streams/",
        "schemas.s imports detectors.base: schemas/ imports nothing of ours",
    ]
    assert problems({("streams.a", "detectors.b"), ("detectors.b", "schemas.c")}) == []


@pytest.mark.parametrize("source", ['"""\n>>> from streams.sim import x\n"""\n'])
def test_layering_reads_doctest_imports(source: str) -> None:
    known = {"detectors.d", "streams.sim"}
    assert doctest_imports("detectors.d", source, known) == {("detectors.d", "streams.sim")}
