"""The project's import graph, read from the source: no cycles, and no torch where serving routes."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dimee_models", "deployments", "load", "analysis")


def module_files() -> dict[str, Path]:
    return {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
            for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imported(tree: ast.AST, modules: set[str]) -> set[str]:
    """The project modules a file imports, function-level imports included."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from package import module` imports the module; `from module import name` the module
            found |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    return found & modules


def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported(ast.parse(path.read_text()), set(files)) - {name} for name, path in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read():
    edges = graph()
    assert "dimee_models.risk" in edges["dimee_models.policy"]
    assert "dimee_models.artifact" in edges["deployments.tier"]  # `from dimee_models import artifact`
    assert "dimee_models.train" in edges["dimee_models.cli"]  # an import inside a function


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_serving_policy_and_router_import_no_torch_at_module_level():
    files = module_files()
    for name in ("dimee_models.policy", "deployments.router"):
        tree = ast.parse(files[name].read_text())
        tops = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
        tops |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
        assert "torch" not in tops, name


def test_loading_policies_does_not_load_torch():
    code = "import sys, dimee_models.policy; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_every_name_imported_from_the_project_exists():
    """Function-level imports run only when their command does (`dimee up`'s tuning, say): a name
    moved to another module must not wait for a user to find it missing."""
    import importlib

    files, missing = module_files(), []
    for path in [*files.values(), *sorted((ROOT / "tests").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in files and not node.level:
                module = importlib.import_module(node.module)
                missing += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{alias.name}"
                            for alias in node.names if not hasattr(module, alias.name)
                            and f"{node.module}.{alias.name}" not in files]
    assert missing == []
