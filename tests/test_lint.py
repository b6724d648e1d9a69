"""The whole tree passes ruff (pyproject.toml's rules, Airflow's AIR rules included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_ruff_passes_on_the_tree():
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "ruff", "check", str(root)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
