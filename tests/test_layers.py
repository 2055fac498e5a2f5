"""The direction of imports between the packages (DESIGN.md), checked on the source itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import (directly, at any depth of its files)
FORBIDDEN = {
    "api": {"torch", "numpy", "app_engine", "worker", "safetensors", "sklearn"},
    "app_common": {"torch", "numpy", "app_engine", "worker", "api", "fastapi", "celery"},
    "app_engine": {"fastapi", "starlette", "celery", "kombu", "redis", "api", "worker", "anytime_prune", "httpx"},
    "worker": {"api", "fastapi"},
}
# The engine may use only the torch-free wire types of app_common, not the service's store or settings.
ENGINE_ALLOWED_COMMON = {"app_common", "app_common.spec", "app_common.events"}


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_its_import_rules(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imports_of(path):
            if name.split(".")[0] in FORBIDDEN[package]:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
            if package == "app_engine" and name.startswith("app_common") and name not in ENGINE_ALLOWED_COMMON:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_engine_reads_no_environment_and_never_prints():
    offenders = []
    for path in sorted((ROOT / "app_engine").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.name}:{node.lineno} print()")
            if isinstance(node, ast.Attribute) and node.attr in {"environ", "getenv"}:
                offenders.append(f"{path.name}:{node.lineno} os.{node.attr}")
    assert not offenders, offenders


@pytest.mark.parametrize(
    "module", ["api.main", "app_common.store", "app_common.settings", "anytime_prune.client", "worker.celery_app"]
)
def test_service_modules_import_without_torch(module):
    code = f"import sys, {module}; bad = [m for m in ('torch', 'numpy', 'app_engine') if m in sys.modules]; " \
           "assert not bad, bad"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


LIBRARY_PACKAGES = ("anytime_prune", "api", "app_common", "app_engine", "worker")
MAX_MODULE_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library_modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in LIBRARY_PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The library modules that module ``name`` imports anywhere (lazy imports inside functions
    count: they are a dependency all the same), except under ``if TYPE_CHECKING:``."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # ``from package import submodule`` depends on the submodule itself.
            found.update(f"{module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return {m for m in found if m in known and m != name}


def test_library_modules_stay_small():
    """A module holds one idea; past this size it wants to be a package."""
    sizes = {name: len(path.read_text().splitlines()) for name, path in _library_modules().items()}
    too_big = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not too_big, too_big


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every back edge of a depth-first walk, as the cycle it closes."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                walk(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name)
    return cycles


def test_no_import_cycles_between_library_modules():
    modules = _library_modules()
    known = set(modules)
    graph = {name: _imported_modules(name, path, known) for name, path in modules.items()}
    # Importing a submodule first imports its package: that edge is Python's, not a cycle we made.
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
    cycles = find_cycles(graph)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_cycle_finder_sees_a_cycle(tmp_path):
    """The cycle test above must be able to fail: two modules importing each other are found."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import x\n")
    known = {"pkg", "pkg.a", "pkg.b"}
    assert _imported_modules("pkg.a", pkg / "a.py", known) == {"pkg", "pkg.b"}
    assert _imported_modules("pkg.b", pkg / "b.py", known) == {"pkg.a"}
    graph = {name: _imported_modules(name, pkg / f"{name.split('.')[-1]}.py", known) for name in ("pkg.a", "pkg.b")}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]
    assert find_cycles({"x": {"y"}, "y": set()}) == []
