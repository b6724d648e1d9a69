"""The embedded stores (MLflow's SQLite DB, the data, Airflow's home) are their owner's only."""

from __future__ import annotations

import os
import stat

from services import run_cli


def test_finding_embedded_stores_readable_by_every_local_user(tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)  # as a home made by an earlier version, or by hand
    out = run_cli("history", env={"PIPELINE_HOME": str(home), "MLFLOW_TRACKING_URI": "", "PIPELINE_STORAGE_URI": ""})
    assert out.returncode == 2 and "expected a registered model, found none" in out.stderr  # nothing trained yet
    assert (home / "mlflow.db").exists()
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
