"""The package's folders depend one way and no module imports itself back through others (imports anywhere in a
module count, also those inside functions)."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2]
# lower layers first: a folder may import its own modules and those of folders on lower layers only
LAYERS = [{"kernels", "netem"}, {"scenarios"}, {"runtime"}, {"simulator"}, {"dashboards"}, {"testbed"}]
LEVEL = {folder: k for k, layer in enumerate(LAYERS) for folder in layer}


def _modules() -> dict[str, Path]:
    out = {}
    for folder in LEVEL:
        for f in (ROOT / folder).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (``from . import x`` counts as importing ``x``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("compactbed."):
                target = node.module.removeprefix("compactbed.")
            else:
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            found |= set(subs) or ({target} if target in modules else set())
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("compactbed.") for a in node.names
                      if a.name.removeprefix("compactbed.") in modules}
    return found - {name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_folders_import_only_lower_layers():
    wrong = [f"{a} imports {b}" for a, deps in _graph().items() for b in deps
             if LEVEL[b.split(".")[0]] > LEVEL[a.split(".")[0]]
             or (LEVEL[b.split(".")[0]] == LEVEL[a.split(".")[0]] and b.split(".")[0] != a.split(".")[0])]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles_between_modules():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def test_the_checks_see_imports_inside_functions():
    """The graph is not vacuous: it has the schema under every folder above it, and a lazy import counts."""
    graph = _graph()
    assert "scenarios.schema" in graph["runtime.engine"] and "scenarios.schema" in graph["simulator.workload"]
    assert "dashboards.app" in graph["testbed.cli"]              # imported inside cmd_dashboard
