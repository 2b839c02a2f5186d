"""The module layout holds: production code never imports the dev stack, and no two
modules import each other, directly or through others.

Read from the source (every import statement, also those inside functions), so a
lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("dlm_pipelines", "dlm_api")
# The `dlm` command is the one place that may reach the dev stack: `dlm dev`, `dlm mock-prince`.
MAY_IMPORT_DEV = {"dlm_pipelines.cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "migrations" not in path.parts
    }


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that `name` imports (the deepest known module of each name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def is_dev(module: str) -> bool:
    return module == "dlm_pipelines.dev" or module.startswith("dlm_pipelines.dev.")


def test_production_code_never_imports_the_dev_stack() -> None:
    offenders = {
        module: sorted(m for m in imported if is_dev(m))
        for module, imported in import_graph().items()
        if not is_dev(module) and module not in MAY_IMPORT_DEV
    }
    assert {m: dev for m, dev in offenders.items() if dev} == {}


def test_no_import_cycles() -> None:
    graph = import_graph()
    # A package imports its own modules (re-exports); that is no cycle of ideas.
    edges = {
        module: {m for m in imported if not module.startswith(m + ".")}
        for module, imported in graph.items()
    }
    cycles = [component for component in strongly_connected(edges) if len(component) > 1]
    assert cycles == []


def test_the_graph_sees_real_imports() -> None:
    """Guards the two tests above against a parser that finds nothing."""
    graph = import_graph()
    assert "dlm_pipelines.catalog" in graph["dlm_pipelines.purger"]
    assert "dlm_pipelines.dev.stack" in graph["dlm_pipelines.cli"]  # a lazy import
    assert "dlm_pipelines.catalog" in graph["dlm_api.tables"]


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return components


def test_the_catalog_migrations_form_one_line() -> None:
    """Branches merged side by side must be rechained: one head, each file its revision."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", "dlm_pipelines:migrations")
    script = ScriptDirectory.from_config(config)
    assert len(script.get_heads()) == 1
    revisions = list(script.walk_revisions())  # newest first, raises on a broken chain
    assert [r.down_revision for r in revisions][-1] is None
    assert len({r.revision for r in revisions}) == len(revisions)
