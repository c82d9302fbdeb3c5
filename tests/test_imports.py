"""The project's modules form no import cycle: the loss math and the fused loss lie below the model, the library
below the driver. Every import counts, those inside functions too (a cycle there still ties two modules into
one reason to change)."""

import ast
from pathlib import Path

from conftest import REPO_ROOT


def project_modules(root: Path) -> dict[str, Path]:
    """{dotted module name: file} of the driver, the model, the package and the scripts and benchmarks."""
    files = [*root.glob("*.py"), *root.glob("patch_training/**/*.py"), *root.glob("scripts/*.py"),
             *root.glob("benchmarks/*.py")]
    modules = {}
    for path in files:
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that module `name` (file `path`) imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
    return {module for module in found if module in modules and module != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for successor in sorted(graph[node]):
            if state.get(successor) == 1:
                return path[path.index(successor):] + [successor]
            if successor not in state:
                cycle = visit(successor)
                if cycle:
                    return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one_inside_functions_too(tmp_path):
    """The checker itself: a cycle through an import inside a function is found; a chain is not a cycle."""
    (tmp_path / "patch_training").mkdir()
    (tmp_path / "patch_training" / "__init__.py").write_text("")
    (tmp_path / "patch_training" / "loss.py").write_text("def f():\n    from modeling_x import g\n")
    (tmp_path / "modeling_x.py").write_text("from patch_training.loss import f\n")
    (tmp_path / "run.py").write_text("import modeling_x\n")
    modules = project_modules(tmp_path)
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert find_cycle(graph) in (["modeling_x", "patch_training.loss", "modeling_x"],
                                 ["patch_training.loss", "modeling_x", "patch_training.loss"])
    (tmp_path / "patch_training" / "loss.py").write_text("import math\n")
    graph = {name: imports_of(name, path, modules) for name, path in project_modules(tmp_path).items()}
    assert find_cycle(graph) is None


def test_no_import_cycle():
    modules = project_modules(REPO_ROOT)
    assert "modeling_llama_patch" in modules and "patch_training.loss" in modules
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_library_never_imports_the_driver():
    """No module of patch_training/ or the model imports run_clm.py: a script of one's own can use the library."""
    modules = project_modules(REPO_ROOT)
    for name, path in modules.items():
        if name.startswith("patch_training") or name == "modeling_llama_patch":
            assert "run_clm" not in imports_of(name, path, modules), f"{name} imports run_clm"
