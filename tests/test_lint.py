"""The tree passes ruff (pyproject.toml's rules, Airflow's AIR rules included) and keeps the
package's layer contract (import-linter), which an upward import breaks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_ruff_passes_on_the_tree():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]


def test_the_layer_contract_is_kept():
    out = subprocess.run([str(LINT_IMPORTS)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "1 kept, 0 broken" in out.stdout


def test_an_upward_import_breaks_the_layer_contract(tmp_path):
    """A copy of the package where the data layer imports the serving layer fails the check,
    and the report names the offending import."""
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    idx = tmp_path / "pipeline" / "data" / "idx.py"
    idx.write_text(idx.read_text() + "\n\ndef _upward() -> None:\n    import pipeline.serving.payload  # noqa: F401\n")
    out = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 1, out.stdout[-3000:]
    assert "BROKEN" in out.stdout and "pipeline.data.idx -> pipeline.serving.payload" in out.stdout, out.stdout[-3000:]


def test_every_subpackage_ships_and_has_its_tests_folder():
    """A new subpackage is listed in pyproject.toml's packages (else a wheel lacks it) and its
    tests live in tests/<subpackage>/, as the package is laid out."""
    import tomllib

    subpackages = sorted(p.parent.name for p in (ROOT / "pipeline").glob("*/__init__.py"))
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(listed) == sorted(["pipeline", "pipeline.suites", *(f"pipeline.{name}" for name in subpackages)])
    assert [name for name in subpackages if not list((ROOT / "tests" / name).glob("test_*.py"))] == []
