"""The package layout: no import cycles, each module importable on its own, layers that point one way.

`import_graph` reads every ``import`` in openk2/ with ``ast`` (function-level
imports included: a lazy import still ties two modules together; imports under
``if TYPE_CHECKING:`` are skipped) and `import_cycles(graph, prefixes)` returns
the cycles that involve a module under one of the prefixes. Extend PACKAGES to
cover more of openk2 (``["openk2"]`` checks everything).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["openk2"]


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def module_files(src: Path, package: str = "openk2") -> dict[str, Path]:
    """Module name -> file, for every .py file of `package` under `src` (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for f in sorted((src / package.replace(".", "/")).rglob("*.py")):
        parts = list(f.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, skipping `if TYPE_CHECKING:` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(src: Path = ROOT, package: str = "openk2") -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports.

    ``import a.b.c`` points at the deepest of a.b.c, a.b, a that is a module;
    ``from a.b import c`` at a.b.c when that is a module, else at a.b. Relative
    imports are resolved. The implicit import of a parent package is not an edge.
    """
    files = module_files(src, package)
    graph: dict[str, set[str]] = {m: set() for m in files}

    def deepest(name: str) -> str | None:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in files:
                return ".".join(parts[:i])
        return None

    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [deepest(a.name) for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else deepest(base) for a in node.names]
            graph[mod].update(t for t in targets if t is not None and t != mod)
    return graph


def import_cycles(graph: dict[str, set[str]], prefixes: list[str]) -> list[list[str]]:
    """The strongly connected components (size > 1) that contain a module under `prefixes`, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = 0
    for root in sorted(graph):  # iterative Tarjan: no recursion limit on long chains
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1 and any(_under(m, prefixes) for m in comp):
                        comps.append(sorted(comp))
    return sorted(comps)


def imports_between(graph: dict[str, set[str]], sources: list[str], targets: list[str]) -> list[tuple[str, str]]:
    """Edges from a module under `sources` to a module under `targets`."""
    return sorted((a, b) for a, deps in graph.items() if _under(a, sources) for b in deps if _under(b, targets))


# --------------------------------------------------------------------------- the checker itself


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))


def test_the_checker_finds_cycles_through_lazy_and_relative_imports(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def f():\n    from .c import x\n",           # a function-level, relative import
        "pkg/c.py": "import pkg.a\nx = 1\n",                          # closes a -> b -> c -> a
        "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n",
        "pkg/e.py": "from pkg.d import *\n",                          # d -> e only for type checkers: no cycle
        "pkg/sub/__init__.py": "from . import f\n",
        "pkg/sub/f.py": "from .. import a\n",
    })
    g = import_graph(tmp_path, "pkg")
    assert g["pkg.b"] == {"pkg.c"} and g["pkg.d"] == set() and g["pkg.sub"] == {"pkg.sub.f"} and g["pkg.sub.f"] == {"pkg.a"}
    assert import_cycles(g, ["pkg"]) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert import_cycles(g, ["pkg.sub"]) == []  # the cycle does not involve pkg.sub


# --------------------------------------------------------------------------- openk2


def test_no_import_cycles():
    assert import_cycles(import_graph(), PACKAGES) == []


def test_layers_point_one_way():
    g = import_graph()
    # the chat format is the bottom layer of post-training: only special tokens beneath it
    below = [(a, b) for a, b in imports_between(g, ["openk2.chat"], ["openk2"])
             if not _under(b, ["openk2.chat", "openk2.data.special_tokens"])]
    assert below == []
    # serving never reaches for the clients; the clients run the serving engine in-process
    assert imports_between(g, ["openk2.serve"], ["openk2.llm"]) == []
    assert ("openk2.llm.local", "openk2.serve.engine") in imports_between(g, ["openk2.llm"], ["openk2.serve"])
    # data knows nothing of serving, clients or training
    assert imports_between(g, ["openk2.data"], ["openk2.serve", "openk2.llm", "openk2.chat", "openk2.train"]) == []
    # the model knows nothing of the optimizer, the trainer or serving (MuonClip reads the model's statistic)
    assert imports_between(g, ["openk2.model"], ["openk2.optim", "openk2.train", "openk2.serve", "openk2.llm",
                                                  "openk2.experiments"]) == []
    # the optimizer is usable on its own: no trainer, no serving
    assert imports_between(g, ["openk2.optim"], ["openk2.train", "openk2.serve", "openk2.llm", "openk2.data"]) == []
    # the trainer does not reach into serving or clients
    assert imports_between(g, ["openk2.train"], ["openk2.serve", "openk2.llm", "openk2.chat"]) == []
    # the shared sampler is used by generate, the engine and constrained decoding
    users = {a for a, deps in g.items() if "openk2.model.sampling" in deps}
    assert {"openk2.model.generate", "openk2.serve.engine", "openk2.serve.constrained"} <= users


def test_every_module_imports_on_its_own():
    """Each module in a clean openk2 state (all openk2.* dropped from sys.modules first): no import-order dependence."""
    mods = sorted(m for m in module_files(ROOT) if _under(m, PACKAGES))
    code = textwrap.dedent("""
        import importlib, json, sys
        failed, skipped = {}, {}
        for m in json.loads(sys.argv[1]):
            for k in [k for k in sys.modules if k == "openk2" or k.startswith("openk2.")]:
                del sys.modules[k]
            try:
                importlib.import_module(m)
            except ModuleNotFoundError as e:
                if e.name and not e.name.startswith("openk2"):
                    skipped[m] = e.name  # an optional dependency that is not installed
                else:
                    failed[m] = repr(e)
            except Exception as e:
                failed[m] = repr(e)
        print(json.dumps({"failed": failed, "skipped": skipped}))
    """)
    r = subprocess.run([sys.executable, "-c", code, json.dumps(mods)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["failed"] == {}
    if out["skipped"]:
        pytest.skip(f"optional dependencies missing: {out['skipped']}")
