"""No module of bnorder/ imports one that imports it back, directly or through others.

Read statically (ast), so imports inside functions count too: a lazy import hides a cycle
from `python -c "import ..."` but it is still a cycle that breaks when the two modules are
reordered or split."""
import ast
import graphlib
from pathlib import Path
from typing import Dict, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _resolve(package: str, modules: Set[str], node: ast.AST, current: str):
    """The modules of `package` that one import statement of module `current` loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
        return {n for n in names if n in modules} | {
            n.rsplit(".", 1)[0] for n in names if n not in modules and
            n.rsplit(".", 1)[0] in modules and n.startswith(package + ".")}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        # level 1 is the package that holds `current` (the package itself for its __init__)
        parts = current.split(".") if current == package else current.split(".")[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    found = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in modules:            # `from . import train`: the submodule itself
            found.add(sub)
        elif base in modules:         # `from .train import TrainConfig`
            found.add(base)
    return found


def import_graph(folder: Path) -> Dict[str, Set[str]]:
    """module name → the modules of the same package it imports (anywhere in its source).
    The package itself (its __init__) is a node only where it is imported by name: importing
    `pkg.sub` runs `pkg/__init__.py` first, but that edge is common to every submodule and
    says nothing about which of them depend on each other."""
    package = folder.name
    files = {package + ("" if p.stem == "__init__" else f".{p.stem}"): p
             for p in sorted(folder.glob("*.py"))}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        deps = set()
        for node in ast.walk(tree):
            deps |= _resolve(package, modules, node, name)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycle(graph: Dict[str, Set[str]]):
    """One import cycle as a list of modules (first == last), or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        return list(reversed(e.args[1]))
    return None


def test_bnorder_has_no_import_cycle():
    graph = import_graph(ROOT / "bnorder")
    assert "bnorder.train" in graph and graph["bnorder.train"], "the graph was not read"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in bnorder/: " + " -> ".join(cycle)


def _package(tmp_path: Path, sources: Dict[str, str]) -> Path:
    folder = tmp_path / "pkg"
    folder.mkdir()
    for name, text in sources.items():
        (folder / f"{name}.py").write_text(text)
    return folder


@pytest.mark.parametrize("sources, cycle", [
    # direct, through a lazy import inside a function
    ({"__init__": "", "a": "from .b import f\n",
      "b": "def f():\n    from .a import g\n"}, {"pkg.a", "pkg.b"}),
    # through three modules, with every spelling of an import
    ({"__init__": "", "a": "from . import b\n", "b": "import pkg.c\n",
      "c": "from pkg.a import x\n"}, {"pkg.a", "pkg.b", "pkg.c"}),
    # through the package's __init__ imported by name
    ({"__init__": "from . import a\n", "a": "from pkg import b\n",
      "b": "import pkg\n"}, {"pkg", "pkg.a", "pkg.b"}),
])
def test_cycles_are_found(tmp_path, sources, cycle):
    found = find_cycle(import_graph(_package(tmp_path, sources)))
    assert found is not None and found[0] == found[-1]
    assert set(found) == cycle


def test_a_chain_is_not_a_cycle(tmp_path):
    folder = _package(tmp_path, {"__init__": "from . import a\n", "a": "from . import b\n",
                                 "b": "from .c import x\n", "c": "import os\nx = 1\n"})
    graph = import_graph(folder)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": set()}
    assert find_cycle(graph) is None
