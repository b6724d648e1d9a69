"""The package installed as a user (or a Docker image) installs it: a wheel, not the checkout.

The suites live in the top-level ``expectations/`` folder; before, ``validate`` found them relative
to the checkout, so an installed ``pipeline`` could not validate anything."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_finding_an_installed_pipeline_cannot_find_its_suites(tmp_path, small_dataset):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(wheels)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("image_pipeline-*.whl")
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True, timeout=120)
    python = fresh / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # The locked dependencies from the test environment, after the fresh venv's own packages (a
    # path in a .pth file is appended; the checkout's editable finder is not loaded from there).
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "locked-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    elsewhere = tmp_path / "elsewhere"  # not the checkout: nothing found relative to the working directory
    elsewhere.mkdir()
    env = {"PATH": f"{fresh / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "PIPELINE_HOME": str(tmp_path / "home")}

    def pipeline(*args: str) -> dict:
        done = subprocess.run(
            [str(fresh / "bin" / "pipeline"), *args, "--json"],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    where = subprocess.run(
        [
            str(python),
            "-c",
            "import pipeline, pipeline.data.expectations as v; print(pipeline.__file__); print(v.suites_dir())",
        ],
        cwd=elsewhere,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where  # the wheel's copy, suites included
    assert (Path(where[1]) / "fashion-mnist" / "raw_profile.json").is_file()  # a dataset's own suites too
    dataset = pipeline("acquire", "--source", str(small_dataset))["dataset_hash"]
    result = pipeline("validate", "--dataset", dataset)
    assert result["suites"] == {"raw_dataset": True, "raw_profile": True}, result
