"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and can fail: a copy of the tree
with an upward import, a cycle inside the library and a Prefect import in the library breaks each one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("vinasmol_core", "tasks", "flows", "infra")
LAYERS = "infra > flows > tasks > vinasmol_core"
ACYCLIC = "no import cycles among the library's packages and modules"
NO_PREFECT = "the library never imports Prefect"

pytest.importorskip("importlinter")


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the tree under `root`, with that tree first on the import path."""
    cmd = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; "
                                 "sys.exit(c())", "--no-cache", "--no-logo"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)


def _copy_tree(dst: Path) -> Path:
    shutil.copy2(REPO / "pyproject.toml", dst / "pyproject.toml")
    for name in PACKAGES:
        shutil.copytree(REPO / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


def _status(output: str, contract: str) -> str:
    for line in output.splitlines():
        if line.startswith(contract + " "):
            return line.removeprefix(contract + " ").split()[0]
    raise AssertionError(f"contract {contract!r} not in the output:\n{output}")


def test_the_tree_keeps_every_contract() -> None:
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    for contract in (LAYERS, ACYCLIC, NO_PREFECT):
        assert _status(result.stdout, contract) == "KEPT"


def test_each_contract_fails_on_a_violation(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    library = root / "vinasmol_core"
    (library / "upward.py").write_text("import flows.pipeline  # the library reaching up into flows\n")
    (library / "uses_prefect.py").write_text("from prefect import flow  # Prefect inside the library\n")
    # a cycle between two of the library's packages: the CLI imports the model package already
    (library / "model" / "cycle.py").write_text("from vinasmol_core.cli import options\n")
    result = _lint_imports(root)
    out = result.stdout
    assert result.returncode != 0, out
    assert _status(out, LAYERS) == "BROKEN"
    assert "vinasmol_core.upward -> flows.pipeline" in out
    assert _status(out, ACYCLIC) == "BROKEN"
    assert _status(out, NO_PREFECT) == "BROKEN"
    assert "vinasmol_core.uses_prefect -> prefect" in out
