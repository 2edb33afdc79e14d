"""The benchmark scripts refuse bad input at once, in one line, and never replace a results file unasked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench"


def bench(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, code, message", [
    (["--setting", "fast=euler:ten:1"], 2, "invalid literal for int() with base 10: 'ten'"),
    (["--setting", "fast=dpm:10:1"], 2, "unknown sampler 'dpm'"),
    (["--truth", "heun:0:1"], 2, "steps must be a whole number from 1 to 1000"),
    (["--seeds", "0"], 2, "--seeds: must be a whole number above zero"),
    (["--json", "{tmp}/results.json"], 1, "already exists; choose another name or pass --overwrite"),
    (["--json", "{tmp}/none/results.json"], 1, "does not exist"),
])
def test_generation_refuses_bad_input_before_any_work(tmp_path, args, code, message):
    (tmp_path / "results.json").write_text("mine")
    result = bench("generation.py", "--preset", "tiny", *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == code and message in result.stderr.strip().splitlines()[-1], result.stderr
    assert "Traceback" not in result.stderr and (tmp_path / "results.json").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
