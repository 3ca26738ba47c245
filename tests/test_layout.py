"""The code's layout holds: data flows config -> data -> model -> engine -> wire with no back-edge,
client/ and server/ never import each other, the engine never reads the settings table, nothing
imports in a cycle, a device's install needs nothing from simulations/, and a module over 250
lines says why at its top. Read from the source (ast), nothing imported."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulations")
# common/'s layers in the order data flows; a module imports its own layer and those before it
LAYERS = {"common.settings": 0, "common.io": 0, "common.memory": 0, "common": 0,
          "common.data": 1, "common.model": 2, "common.engine": 3, "common.wire": 4, "common.cli": 5}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = _modules()


def _imports(path: Path, top_only: bool) -> set[str]:
    """The project modules `path` imports (top_only: at module level, what runs on import)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in MODULES}


def _layer(module: str) -> int | None:
    best = None
    for prefix, rank in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, rank)
    return None if best is None else best[1]


def test_client_and_server_never_import_each_other_and_common_imports_neither():
    bad = []
    for name, path in MODULES.items():
        for dep in _imports(path, top_only=False):
            side = dep.split(".")[0]
            if (name.startswith("client") and side == "server") or (name.startswith("server") and side == "client"):
                bad.append((name, dep))
            if name.startswith("common") and side in ("client", "server", "simulations"):
                bad.append((name, dep))
    assert not bad


def test_common_layers_import_only_their_own_layer_or_earlier():
    bad = [(name, dep) for name, path in MODULES.items() if name.startswith("common")
           for dep in _imports(path, top_only=False)
           if dep.startswith("common") and _layer(dep) > _layer(name)]
    assert not bad, f"back-edges (config -> data -> model -> engine -> wire): {bad}"


def test_the_engine_never_reads_the_settings_table():
    bad = [name for name, path in MODULES.items()
           if name.startswith("common.engine") and "common.settings" in _imports(path, top_only=False)]
    assert not bad


def test_no_module_imports_in_a_cycle():
    graph = {name: {d for d in _imports(path, top_only=True) if d != name} for name, path in MODULES.items()}
    seen, stack, cycles = set(), [], []

    def visit(n):
        if n in stack:
            cycles.append(stack[stack.index(n):] + [n])
            return
        if n in seen:
            return
        seen.add(n)
        stack.append(n)
        for d in graph.get(n, ()):
            visit(d)
        stack.pop()

    for n in sorted(graph):
        visit(n)
    # a package's __init__ importing its own modules is no cycle of ideas
    cycles = [c for c in cycles if not all(x.startswith(c[0]) or c[0].startswith(x) for x in c)]
    assert not cycles


def test_a_devices_install_needs_nothing_from_simulations():
    """Everything the device's entry points reach, at import or at run time, lives outside
    simulations/ (the benchmarks and studies are not installed on a phone)."""
    todo = [m for m in MODULES if m.startswith("client")]
    reached = set()
    while todo:
        m = todo.pop()
        if m in reached:
            continue
        reached.add(m)
        todo.extend(_imports(MODULES[m], top_only=False))
    assert not [m for m in reached if m.startswith("simulations")]


@pytest.mark.parametrize("pkg", ["common", "client", "server"])
def test_a_long_module_says_why_at_its_top(pkg):
    long = []
    for name, path in MODULES.items():
        if not name.startswith(pkg):
            continue
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > 250 and "lines" not in doc:
            long.append((name, lines))
    assert not long, f"over 250 lines with no reason stated in the module docstring: {long}"


def test_the_layout_checks_can_fail():
    """The rules above see real imports: the engine's orchestration imports the engine's steps,
    and a constructed back-edge is caught."""
    assert "common.engine.search" in _imports(MODULES["common.engine.prune"], top_only=True)
    assert _layer("common.wire.summary") > _layer("common.engine.scoring") > _layer("common.model.mask")
