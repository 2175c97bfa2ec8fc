"""The layering, checked on the source: no import circles, ``common/`` free of Flower
and of every package above it, and each ``common`` sub-package importing only the
ones below it. Function-local imports count: a lazy import is still an arrow."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulations", "deploy")
# Bottom to top; a sub-package may import those before it (and itself).
COMMON_LAYERS = ("core", "data", "learn", "federated", "runs", "commands")
ABOVE_COMMON = ("client", "server", "simulations", "deploy", "flwr")


def _module_name(path: Path) -> str:
    parts = ["fedscan", *path.relative_to(ROOT).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_pkg else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            # `from pkg import module` imports that module
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    files = {
        _module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if p.is_file()
    }
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in files.items():
        graph[name] = {i for i in _imports(path, name) if i in files and i != name}
    return graph


def _raw_imports() -> dict[str, set[str]]:
    return {
        _module_name(p): _imports(p, _module_name(p))
        for p in (ROOT / "common").rglob("*.py")
        if p.is_file()
    }


def _top(name: str) -> str:
    """The top-level folder an import names: ``fedscan.server.app`` -> ``server``."""
    parts = name.split(".")
    return parts[1] if parts[0] == "fedscan" and len(parts) > 1 else parts[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles() -> None:
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_circle() -> None:
    # the check above must be able to fail
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_common_imports_nothing_above_it() -> None:
    bad = {
        mod: sorted(i for i in imps if _top(i) in ABOVE_COMMON)
        for mod, imps in _raw_imports().items()
    }
    assert {m: i for m, i in bad.items() if i} == {}


@pytest.mark.parametrize("layer", COMMON_LAYERS)
def test_common_subpackage_imports_only_layers_below(layer: str) -> None:
    allowed = set(COMMON_LAYERS[: COMMON_LAYERS.index(layer) + 1])
    wrong = {}
    for mod, imps in _raw_imports().items():
        parts = mod.split(".")
        if len(parts) < 3 or parts[2] != layer:
            continue
        up = sorted(
            i
            for i in imps
            if i.startswith("fedscan.common.")
            and i.split(".")[2] in COMMON_LAYERS
            and i.split(".")[2] not in allowed
        )
        if up:
            wrong[mod] = up
    assert wrong == {}


def test_common_has_no_loose_modules() -> None:
    """Every module sits in a layer, so the folder names tell where it belongs."""
    loose = [p.name for p in (ROOT / "common").glob("*.py") if p.name != "__init__.py"]
    assert loose == []
    assert sorted(p.name for p in (ROOT / "common").iterdir() if (p / "__init__.py").exists()) == (
        sorted(COMMON_LAYERS)
    )


def _long_functions(folders: tuple[str, ...], limit: int) -> list[str]:
    out = []
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > limit:
                        out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    return out


def test_no_function_in_the_federated_core_is_longer_than_80_lines() -> None:
    """The Flower glue and the federated core stay readable: one loop object, small
    steps (the 218-line ``_federate`` it replaced had five closures)."""
    assert _long_functions(("server", "client", "common/federated"), 80) == []
    assert _long_functions(("server",), 20)  # the check can fail


def test_importing_fedscan_leaves_logging_and_warning_filters_alone() -> None:
    """Library modules configure nothing at import (no warning filter, no logger level,
    handler or filter): only the entry points do, when they run."""
    import subprocess
    import sys

    code = """
import logging, warnings
import numpy, torch, opacus, mlflow, sklearn, scipy.stats, flwr.simulation, flwr.serverapp
import flwr.clientapp, flwr.server.workflow, flwr.client.mod, omegaconf, hydra

def snapshot():
    loggers = {
        name: (lg.level, lg.propagate, len(lg.handlers), len(lg.filters))
        for name, lg in logging.root.manager.loggerDict.items()
        if isinstance(lg, logging.Logger)
    }
    return list(warnings.filters), logging.root.level, len(logging.root.handlers), loggers

before = snapshot()
import fedscan.common.federated.privacy, fedscan.common.runs.tracking
import fedscan.simulations.federated, fedscan.simulations.engine, fedscan.simulations.cli
import fedscan.server.app, fedscan.client.app, fedscan.client.secure
after = snapshot()
assert after[:3] == before[:3], (after[:3], before[:3])
# a logger that existed is as it was; a new one (a module imported on the way that
# set up its own, e.g. torch._dynamo) counts only under fedscan or flwr
changed = {
    n: c for n, c in after[3].items()
    if (n in before[3] or n.split(".")[0] in ("fedscan", "flwr"))
    and c != before[3].get(n, (logging.NOTSET, True, 0, 0))
}
assert not changed, changed
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
