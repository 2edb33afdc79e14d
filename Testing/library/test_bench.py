"""The benchmark scripts refuse bad input at once, in one line, and never replace a results file unasked."""

from __future__ import annotations

import json
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
    (["--report-file", "{tmp}/report.txt"], 2, "report file {tmp}/report.txt does not exist"),
    (["--report-file", "{tmp}/blank.txt"], 2, "the report is empty"),
])
def test_generation_refuses_bad_input_before_any_work(tmp_path, args, code, message):
    (tmp_path / "results.json").write_text("mine")
    (tmp_path / "blank.txt").write_text(" \n")
    result = bench("generation.py", "--preset", "tiny", *[a.format(tmp=tmp_path) for a in args])
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == code and message.format(tmp=tmp_path) in last, result.stderr
    assert "Traceback" not in result.stderr and (tmp_path / "results.json").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.txt", "results.json"]


def test_generation_times_the_report_file_it_is_given(tmp_path):
    report = tmp_path / "right.txt"
    report.write_text("\ufeffFindings: Right pleural effusion.\nImpressions: Right pleural effusion.\n")
    result = bench("generation.py", "--preset", "tiny", "--no-reference", "--slices", "8", "--threads", "1",
                   "--report-file", str(report), "--json", str(tmp_path / "results.json"))
    assert result.returncode == 0, result.stderr
    facts = json.loads((tmp_path / "results.json").read_text())
    assert facts["report"] == "Findings: Right pleural effusion.\nImpressions: Right pleural effusion.\n"
    assert [row["setting"] for row in facts["results"]] == ["default"] and facts["results"][0]["slices"] == 8


@pytest.mark.parametrize("script, args, code, message", [
    ("vae_decode.py", ["--vae", "{tmp}", "--threads", "0"], 2, "--threads: must be a whole number above zero, not 0"),
    ("vae_decode.py", ["--vae", "{tmp}"], 1, "vae_decode: cannot load the slice autoencoder from {tmp}/vae"),
    ("latent_store_scale.py", ["--out", "{tmp}/stores", "--batch", "0"], 2, "--batch: must be a whole number above"),
    ("latent_store_scale.py", ["--out", "{tmp}/stores", "--gpu-tflops", "inf"], 2, "must be a finite number above"),
    ("side_probe.py", ["probe", "--model", "{tmp}", "--data", "{tmp}", "--guidance", "nan"], 2,
     "--guidance: must be a finite number >= 0, not nan"),
    ("side_probe.py", ["probe", "--model", "{tmp}", "--data", "{tmp}", "--seeds", "-1"], 2, "--seeds: must be a whole"),
    ("slicer_logic.py", ["--tick", "nan"], 2, "--tick: must be a finite number above zero, not nan"),
    ("side_code_reading.py", ["--data", "{tmp}", "--variants", "0"], 2, "--variants: must be a whole number above"),
    ("side_code_reading.py", ["--data", "{tmp}/none"], 1, "side_code_reading: data folder {tmp}/none does not exist"),
    ("text_response.py", ["--model", "{tmp}", "--latents", "{tmp}", "--data", "{tmp}", "--out", "{tmp}/o.json",
                          "--threads", "-2"], 2, "--threads: must be a whole number above zero, not -2"),
    ("released_hu_check.py", ["--model", "{tmp}", "--ct", "{tmp}/ct.nii.gz", "--seeds", "0"], 2,
     "--seeds: must be a whole number above zero, not 0"),
    ("released_hu_check.py", ["--model", "{tmp}/none", "--ct", "{tmp}/ct.nii.gz"], 1, "released_hu_check: model"),
])
def test_every_bench_script_refuses_a_bad_number_or_input_in_one_line(tmp_path, script, args, code, message):
    result = bench(script, *[a.format(tmp=tmp_path) for a in args])
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == code and message.format(tmp=tmp_path) in last, result.stderr
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []
