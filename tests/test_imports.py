"""The package's import graph: no cycle, and the adapter family standing on torch and qadapt.errors alone.

Every `import qadapt...` / `from qadapt... import` counts, at module level or inside a function: a
function-level import still ties the two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qadapt"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the qadapt modules it imports}, a package standing for its __init__."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from qadapt.adapters import spec` may name a submodule, else a name in the package.
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                            for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "qadapt.errors" in graph["qadapt.recipe"]
    assert "qadapt.tasks.causal_lm" in graph["qadapt.tasks"]  # a package's __init__ is a module too
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_back():
    assert cycles(import_graph()) == []


def test_the_adapter_family_imports_only_itself_and_errors():
    outside = {name: sorted(t for t in targets if not t.startswith("qadapt.adapters") and t != "qadapt.errors")
               for name, targets in import_graph().items() if name.startswith("qadapt.adapters")}
    assert {name: targets for name, targets in outside.items() if targets} == {}


def test_a_task_name_is_written_only_in_the_registry_and_the_recipe_schema():
    from typing import get_args

    from qadapt.recipe import Task
    from qadapt.tasks import TASKS

    names = set(get_args(Task))
    assert names == set(TASKS)  # every task the schema accepts has its module, and no other
    allowed = {PACKAGE / "recipe.py", *(PACKAGE / "tasks").glob("*.py")}
    written = sorted(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                     for path in PACKAGE.rglob("*.py") if path not in allowed
                     for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.Constant) and node.value in names)
    assert written == []


# The packages a package must not import: imports run from the command line to the studio (a page over the
# actions) to the actions (the commands beside training; training, inference, export) to the tasks to the
# building blocks, never back.
ACTIONS = ("qadapt.actions", "qadapt.studio", "qadapt.cli")
NOT_BELOW = {
    "qadapt.builtin_data": ("qadapt.tasks", "qadapt.training", "qadapt.inference", "qadapt.export", *ACTIONS),
    "qadapt.decoding": ("qadapt.tasks", "qadapt.training", "qadapt.inference", "qadapt.export", *ACTIONS),
    "qadapt.tasks": ("qadapt.training", "qadapt.inference", "qadapt.export", *ACTIONS),
    "qadapt.training": ("qadapt.inference", "qadapt.export", *ACTIONS),
    "qadapt.inference": ("qadapt.training", "qadapt.export", *ACTIONS),
    "qadapt.export": ("qadapt.training", *ACTIONS),
    "qadapt.actions": ("qadapt.studio", "qadapt.cli"),
    "qadapt.studio": ("qadapt.cli",),
}


def test_imports_run_one_way_between_packages():
    graph = import_graph()
    upward = sorted(f"{name} -> {target}" for name, targets in graph.items() for target in targets
                    for package, above in NOT_BELOW.items()
                    if (name == package or name.startswith(package + ".")) and target.startswith(above))
    assert upward == []
    assert [name for name, targets in graph.items() if "qadapt.cli" in targets] == ["qadapt.__main__"]


def test_an_adapter_kind_is_compared_only_in_the_table_of_kinds():
    """Code asks qadapt.adapters.kinds.KINDS what a kind allows, never `kind == "dora"` (the specs name theirs)."""
    from qadapt.adapters.kinds import KINDS

    allowed = {PACKAGE / "adapters" / "kinds.py", PACKAGE / "adapters" / "spec.py"}
    compared = sorted(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                      for path in PACKAGE.rglob("*.py") if path not in allowed
                      for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Compare)
                      for side in [node.left, *node.comparators]
                      if isinstance(side, ast.Constant) and side.value in KINDS
                      or isinstance(side, (ast.Tuple, ast.List, ast.Set))
                      and any(isinstance(e, ast.Constant) and e.value in KINDS for e in side.elts))
    assert compared == []


def test_every_module_compiles_without_a_warning():
    """A warning at compile time (an invalid escape such as `\\.` in a docstring) is a SyntaxWarning from
    Python 3.12 on, printed by every command that imports the module: the GPU machine's Python showed one."""
    import warnings

    sources = [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "tools").rglob("*.py")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in sources:
            compile(path.read_text(), str(path), "exec")
