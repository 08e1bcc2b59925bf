"""The package's import graph: layers that import only downward, and no cycle.

Layers, low to high: the core (`noprop`, from shared/, and `noprop.proto`), then `noprop.ops` (processes and
CLIs), then `noprop.server`, `noprop.client` and `noprop.deploy`. Server and client never import each other:
they meet only in the protocol (noprop.protocol) and in the Flower app references ops/ writes as strings.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"shared": "noprop", "proto": "noprop.proto", "ops": "noprop.ops", "server": "noprop.server",
            "client": "noprop.client", "deploy": "noprop.deploy"}
LAYER = {"noprop": 0, "noprop.proto": 0, "noprop.ops": 1, "noprop.server": 2, "noprop.client": 2,
         "noprop.deploy": 2}
MAX_LINES = 450
EXEMPT_LINES = {"noprop.deploy.edge": 600}  # the single-file edge runtime (issue 23)


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and ".".join(parts[:2]) in LAYER else "noprop"


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def imports_of(path: Path, known: set[str], top_level_only: bool) -> set[str]:
    """The package modules `path` imports (`from noprop.x import y` counts y when y is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # `if TYPE_CHECKING:` and try/except blocks at module level count too
        nodes = [n for stmt in tree.body for n in ast.walk(stmt)
                 if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def test_the_scan_sees_the_whole_package():
    found = modules()
    assert {"noprop.protocol", "noprop.methods", "noprop.server.run", "noprop.client.handlers", "noprop.ops.sim",
            "noprop.deploy.edge"} <= set(found)
    # and it reads an import the way the rules below need: server/run.py uses the protocol
    assert "noprop.protocol" in imports_of(found["noprop.server.run"], set(found), top_level_only=False)


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_module_imports_from_a_higher_layer_or_across_server_and_client(module):
    found = modules()
    mine = package_of(module)
    bad = []
    for imported in sorted(imports_of(found[module], set(found), top_level_only=False)):
        theirs = package_of(imported)
        if LAYER[theirs] > LAYER[mine] or (LAYER[theirs] == LAYER[mine] == 2 and theirs != mine):
            bad.append(imported)
    assert not bad, f"{module} ({mine}) imports {bad}: a higher layer, or the other side of the protocol"


def test_the_import_graph_has_no_cycle():
    found = modules()
    # imports inside functions count too: a lazy import back up a chain is still a circle a reader must follow
    graph = {m: imports_of(p, set(found), top_level_only=False) - {m} for m, p in found.items()}
    # a package's __init__ is imported by every module in it; that edge is Python's, not a design cycle
    graph = {m: {d for d in deps if not (found[d].name == "__init__.py" and m.startswith(d + "."))}
             for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [node, dep]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_file_outside_tests_and_bench_is_over_the_line_budget(module):
    lines = len(modules()[module].read_text().splitlines())
    budget = EXEMPT_LINES.get(module, MAX_LINES)
    assert lines <= budget, f"{module}: {lines} lines, over {budget}: split it by job"
