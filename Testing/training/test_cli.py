"""The `ctflow-train` command itself: subcommands load lazily, and a torchrun entry point reports errors as it does."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

import pytest

from ctflow_train import cli


def python(*arguments: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, *arguments], env=environment, capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommand_without_importing_torch():
    done = python("-c", "import sys\nfrom ctflow_train import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n"
                        "    pass\nprint('torch' in sys.modules, 'diffusers' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in cli.COMMANDS)
    assert done.stdout.splitlines()[-1] == "False False"


def test_every_subcommand_names_a_module_with_its_options_and_runner():
    for command in cli.COMMANDS.values():
        module = importlib.import_module(f"ctflow_train.{command.module}")
        parser = argparse.ArgumentParser()
        getattr(module, command.configure)(parser)
        assert callable(getattr(module, command.run)) and "usage:" in parser.format_help()
    with pytest.raises(ValueError, match="twice"):
        cli.register(cli.Command("flow", "again", "train_flow"))


def test_a_torchrun_entry_point_ends_in_one_line_on_stderr(tmp_path):
    done = python("-m", "ctflow_train.train_flow", "--cache", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert done.returncode == cli.EXIT_ERROR
    assert done.stderr.strip().splitlines() == [f"ctflow-train: error: {tmp_path / 'missing'} is not a latent store "
                                                "(no store.json): make one with ctflow-train cache-latents"]
    assert not (tmp_path / "out").exists()


def test_a_command_that_loads_a_model_prints_its_progress_and_nothing_of_the_libraries(tiny_model, tmp_path):
    """diffusers' advice to install accelerate and transformers' weight-loading bar mean nothing to a ctflow-train
    user (a separate process: the libraries' log handlers hold the stderr of their first import)."""
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "normal.txt").write_text("Findings: Normal chest.")
    (reports / "effusion.txt").write_text("Findings: Small right pleural effusion.")
    done = python("-m", "ctflow_train.cli", "report-figure", "--model", str(tiny_model), "--reports",
                  str(reports / "effusion.txt"), "--normal", str(reports / "normal.txt"), "--seeds", "0",
                  "--slices", "2", "--steps", "1", "--tile", "32", "--threads", "1", "--out", str(tmp_path / "f.png"))
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("volume ") for line in lines), done.stderr
