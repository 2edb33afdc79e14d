"""The library as users install it: a wheel (not editable), installed elsewhere, run from another folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_wheel_installed_elsewhere_finds_its_demo_model(tmp_path):
    source = tmp_path / "checkout"  # a copy: the build writes beside the sources
    skip = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    shutil.copytree(REPO / "CTFlowLib", source / "CTFlowLib", ignore=skip)
    shutil.copytree(REPO / "Resources" / "Models" / "ctflow-demo", source / "Resources" / "Models" / "ctflow-demo")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheels"),
                          str(source / "CTFlowLib")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheels").glob("ctflow-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True,
                   capture_output=True)
    shutil.rmtree(source)  # nothing may point back at the sources
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    env.pop("CTFLOW_MODEL", None)
    where = subprocess.run([sys.executable, "-c", "import ctflow; print(ctflow.__file__, ctflow.default_model())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(path).is_relative_to(tmp_path / "site") for path in where), where
    info = subprocess.run([sys.executable, "-m", "ctflow", "info", "--device", "cpu"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr
    card = json.loads(info.stdout[info.stdout.index("\n{") + 1:])
    assert card["model"] == "ctflow-demo"
