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
