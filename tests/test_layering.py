"""Dependencies point one way (DESIGN.md): the core imports no Celery, vLLM or torch at module
level, and the producer side depends on the core only, never on workers/."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import scalecap

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("celery", "kombu", "vllm", "torch", "transformers", "boto3", "redis")


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


def test_producer_and_core_never_import_workers():
    offenders = []
    for folder in ("scalecap", "producer"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                              if n == "workers" or n.startswith("workers.")]
    assert offenders == []
