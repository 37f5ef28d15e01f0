"""Dependencies point one way (DESIGN.md), read from the source: `import` statements at any depth
(module level and inside functions) and string imports (`importlib.import_module("x.y")`,
`lazy("x.y", "attr")`, `__import__("x")` with a literal module name).

- The chain (scalecap/ except scalecap/fleet) imports nothing from scalecap.fleet, workers/,
  producer/, Celery or Redis, directly or through any module it imports.
- producer/ never reaches workers/, and of scalecap/backends only the contract types
  (scalecap.backends.base, which the chain's config and rating use, and the package __init__ that
  re-exports them): no engine, no backend set-up.
- No import cycle among the modules of scalecap/, workers/, producer/ and scalecap_command/.
- Importing the core loads no Celery, vLLM or torch.

Only scalecap_command/ (the `scalecap` entry point) may route to all of them.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

import scalecap

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("scalecap", "workers", "producer", "scalecap_command")
HEAVY = ("celery", "kombu", "vllm", "torch", "transformers", "boto3", "redis")
STRING_IMPORTERS = frozenset({"import_module", "__import__", "lazy", "_lazy"})
"""Calls whose first argument, when a literal string, is a module the call imports."""
CHAIN_MUST_NOT_REACH = ("scalecap.fleet", "workers", "producer", "scalecap_command", "celery", "kombu",
                        "redis")
PRODUCER_MAY_REACH = frozenset({"scalecap.backends", "scalecap.backends.base"})


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(source: str, module: str, is_package: bool, known: Iterable[str]) -> set[str]:
    """Every module `source` imports, anywhere in it: statements and literal string imports."""
    known = set(known)
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package holding `module`
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)  # `from pkg import module` imports the module
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if name in STRING_IMPORTERS and isinstance(first, ast.Constant) and isinstance(first.value, str):
                out.add(first.value)
    return out


def import_graph(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules it names in imports (ours and third-party, by dotted name)."""
    files = {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    return {m: imported_names(p.read_text(), m, p.name == "__init__.py", files) for m, p in files.items()}


def _with_parents(names: Iterable[str]) -> set[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first: those are reached too."""
    out = set()
    for name in names:
        parts = name.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return out


def reached(graph: dict[str, set[str]], start: str) -> set[str]:
    """Everything importing `start` can import, parent packages included."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for name in _with_parents(graph.get(todo.pop(), ())):
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is a few hundred modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph[v]:
                found.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _is_under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


# -- the reader itself ---------------------------------------------------------------------------


def test_the_reader_sees_statements_functions_and_string_imports(tmp_path):
    pkg = tmp_path / "producer"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "import json\n"
        "def f():\n    from workers import cli\n"
        "def g():\n    import importlib\n    return importlib.import_module('scalecap.fleet.app')\n"
        "H = {'w': (lazy('workers.jobs', 'main'), _lazy('scalecap.backends.vllm', 'X'))}\n"
        "from . import b\n"
    )
    (pkg / "b.py").write_text("from producer.a import f\n")
    g = import_graph(tmp_path, ["producer"])
    assert g["producer.a"] == {"json", "workers", "importlib", "scalecap.fleet.app", "workers.jobs",
                               "scalecap.backends.vllm", "producer.b"}
    assert cycles(g) == [["producer.a", "producer.b"]]
    assert {"workers", "workers.jobs", "scalecap", "scalecap.fleet"} <= reached(g, "producer.b")


# -- the rules -----------------------------------------------------------------------------------


def test_the_chain_reaches_no_fleet_worker_producer_celery_or_redis(graph):
    chain = [m for m in graph if _is_under(m, ["scalecap"]) and not _is_under(m, ["scalecap.fleet"])]
    assert "scalecap.images.load" in chain and "scalecap.cli.caption" in chain
    offenders = {m: sorted(x for x in reached(graph, m) if _is_under(x, CHAIN_MUST_NOT_REACH)) for m in chain}
    assert {m: xs for m, xs in offenders.items() if xs} == {}


def test_producer_never_reaches_workers_or_an_engine(graph):
    producer = [m for m in graph if _is_under(m, ["producer"])]
    assert "producer.cli" in producer and "producer.api.app" in producer
    offenders = {
        m: sorted(x for x in reached(graph, m)
                  if _is_under(x, ["workers", "scalecap.backends", "scalecap_command"])
                  and x not in PRODUCER_MAY_REACH)
        for m in producer
    }
    assert {m: xs for m, xs in offenders.items() if xs} == {}


def test_the_scalecap_command_routes_worker_and_caption(graph):
    """The entry point is where `scalecap worker` reaches workers/ (a string import, followed)."""
    assert {"workers.cli", "scalecap.cli.caption", "producer.cli"} <= graph["scalecap_command"]


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_importing_every_core_module_loads_no_heavy_library():
    modules = [m.name for m in pkgutil.walk_packages(scalecap.__path__, "scalecap.")]
    assert "scalecap.backends.vllm" in modules and "scalecap.fleet.app" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(','.join(h for h in {HEAVY!r} if h in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"loaded at import time: {r.stdout.strip()}"
