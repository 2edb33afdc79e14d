"""What every training process sets up the same way: the learning-rate schedule, its place among torchrun's
processes, and run configs built once from the command line whose checkpoint metadata keeps the option names."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

import ctflow
from ctflow_train import evaluate, export, train_flow, train_vae
from ctflow_train.runtime import cosine_schedule, start_processes


def test_schedule_warms_up_linearly_then_decays_to_a_tenth():
    assert [cosine_schedule(step, 1.0, 4, 20) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine_schedule(4, 1.0, 4, 20) == pytest.approx(1.0)
    assert cosine_schedule(12, 2.0, 4, 20) == pytest.approx(2.0 * 0.55)  # half way down
    assert cosine_schedule(20, 1.0, 4, 20) == pytest.approx(0.1) == cosine_schedule(500, 1.0, 4, 20)
    rates = [cosine_schedule(step, 1.0, 4, 20) for step in range(4, 21)]
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_processes_follow_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    processes = start_processes(join_group=False)
    assert (processes.rank, processes.world, processes.distributed, processes.master) == (1, 3, True, False)
    assert processes.device == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ctflow.CTFlowError, match="does not fit WORLD_SIZE"):
        start_processes(join_group=False)


@pytest.mark.parametrize("module, run_config, argv", [
    (train_flow, train_flow.FlowRun, ["--cache", "a", "b", "--out", "o", "--batch", "5"]),
    (train_vae, train_vae.VAERun, ["--data", "d", "--out", "o", "--batch", "5"]),
    (export, export.ExportRun, ["--flow", "f", "--vae", "v", "--cache", "c", "--out", "o"]),
    (evaluate, evaluate.EvaluationRun, ["--model", "m", "--data", "d", "--out", "o"]),
])
def test_a_run_config_takes_every_option_once_and_records_them_by_their_names(module, run_config, argv):
    parser = argparse.ArgumentParser()
    module.configure(parser)
    args = parser.parse_args(argv)
    config = run_config.from_args(argparse.Namespace(**vars(args), command="x", run=print))  # as cli passes it
    assert {field.name for field in dataclasses.fields(run_config)} == set(vars(args))  # no option left out
    assert dataclasses.asdict(config) == vars(args)
    meta = config.meta()  # a checkpoint's "args": read back by export's lineage, so the option names stay
    assert "batch_size" not in meta and "run" not in meta
    if "batch_size" in vars(args):
        assert config.batch_size == 5 and meta["batch"] == 5
