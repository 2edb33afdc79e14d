"""Flow training under torchrun (two CPU processes, gloo): the same run as one process, and a killed run resumes.

The store is a real one written by the store's own writer, with random latents and prompt embeddings: what is
proved here is the distribution (who reads which sample, gradient averaging, rank-0 checkpoints), not the learning.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ctflow_train import train_flow
from ctflow_train.checkpoint import read_meta
from ctflow_train.latent_store import FORMAT, StoreWriter

BLOCK, STEPS = 4, 24
OPTIONS = ["--preset", "tiny", "--block", str(BLOCK), "--warmup", "2", "--lr", "1e-3", "--rollout-p", "0.5",
           "--save-every", "2", "--workers", "0", "--threads", "1"]


def write_store(folder: Path, names: list[str]) -> Path:
    rng = torch.Generator().manual_seed(0)
    header = {"format": FORMAT, "dtype": "float16", "image_size": 16, "latent_shape": [4, 8, 8], "text_dim": 32,
              "vae": "random", "vae_sha256": None, "text": {}}
    common = {"start": torch.randn(4, 8, 8, generator=rng), "end": torch.randn(4, 8, 8, generator=rng),
              "text/empty": torch.randn(2, 32, generator=rng)}
    writer = StoreWriter(folder, header, common)
    for n, name in enumerate(names):
        slices = 14 + 2 * n
        text = {kind: torch.randn(5 + n + tokens, 32, generator=rng) for tokens, kind in enumerate(("plain", "length"))}
        writer.add(name, torch.randn(slices, 4, 8, 8, generator=rng), text, slices - 4, (1.0, 1.0, 2.5), "random")
    writer.merge()
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("store"), [f"v{n}" for n in range(5)])


def command(store, out, batch: int, *extra: str) -> list[str]:
    return ["--cache", str(store), "--out", str(out), "--batch", str(batch), "--steps", str(STEPS), *OPTIONS, *extra]


def torchrun(store, out, *extra: str) -> subprocess.Popen:
    """Two processes of batch 2 each, as a cluster starts them."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path),
                   "PYTHONFAULTHANDLER": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "ctflow_train.train_flow", *command(store, out, 2, *extra)],
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def family(pid: int) -> list[int]:
    """The process and its descendants: torchrun starts each worker in a session of its own."""
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        children = [int(child) for task in tasks for child in (task / "children").read_text().split()]
    except FileNotFoundError:  # it has just ended
        return []
    return [pid] + [member for child in children for member in family(child)]


def signal_all(pids: list[int], number: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, number)
        except ProcessLookupError:
            pass


def finish(process: subprocess.Popen) -> str:
    """The run's output once it has ended; a run that hangs is ended with every worker's Python stacks in the
    failure (faulthandler prints them on SIGABRT), so a rare hang says where it was."""
    try:
        output = process.communicate(timeout=300)[0].decode()
    except subprocess.TimeoutExpired:
        members = family(process.pid)
        signal_all(members[:1], signal.SIGSTOP)  # the launcher would end the other worker when one aborts
        for worker in members[1:]:  # one at a time, so that their stacks do not interleave
            signal_all([worker], signal.SIGABRT)
            time.sleep(1)
        signal_all(members, signal.SIGKILL)
        pytest.fail("the two-process run hung; its output:\n" + process.communicate()[0].decode())
    assert process.returncode == 0, output
    return output


def losses(out) -> list[float]:
    with open(out / "loss.csv", newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def weights(out) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(out / "checkpoint.safetensors").items() if k.startswith(("model/", "ema/"))}


@pytest.fixture(scope="module")
def two_processes(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    finish(torchrun(store, out))
    return out


def in_this_process(out, *arguments: str):
    threads = torch.get_num_threads()
    parser = argparse.ArgumentParser()
    train_flow.configure(parser)
    train_flow.train(train_flow.FlowRun.from_args(parser.parse_args(list(arguments))))
    torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def one_process(store, tmp_path_factory):
    """The same global batch (4) in one process."""
    out = tmp_path_factory.mktemp("single")
    return in_this_process(out, *command(store, out, 4))


def test_two_processes_train_as_one_with_the_same_global_batch(one_process, two_processes):
    assert len(losses(two_processes)) == STEPS
    assert losses(two_processes) == pytest.approx(losses(one_process), abs=2e-5)  # loss.csv holds 5 decimals
    single, double = weights(one_process), weights(two_processes)
    assert single.keys() == double.keys()
    assert all(torch.allclose(single[k], double[k], atol=1e-5) for k in single)
    assert read_meta(two_processes / "checkpoint.safetensors")["world"] == 2
    assert read_meta(two_processes / "checkpoint.safetensors")["samples"] == STEPS * 4
    assert sorted(path.name for path in two_processes.iterdir()) == ["checkpoint.safetensors", "loss.csv"]  # rank 0's


def test_twin_losses_train_and_log_on_two_processes_as_on_one(tmp_path):
    """A rank may hold more twin pairs than another: the twin losses are averaged over pair slots, not over the
    pairs a rank holds, so the ranks' losses and gradients still add up to one process's."""
    twins = write_store(tmp_path / "twins", ["v0", "v0_with_emphysema", "v1", "v1_with_right_consolidation", "v2"])
    extra = ("--paired-twins", "--pair-weight", "0.1", "--region-weight", "0.5")
    single = in_this_process(tmp_path / "one", *command(twins, tmp_path / "one", 4, *extra))
    double = tmp_path / "two"
    finish(torchrun(twins, double, *extra))
    columns = ("loss", "pair_loss", "region_loss")
    rows = {out: [[float(row[c]) for c in columns] for row in csv.DictReader(open(out / "loss.csv", newline=""))]
            for out in (single, double)}
    assert len(rows[double]) == STEPS and any(row[2] > 0 for row in rows[double])  # the pairs reached the losses
    assert rows[double] == [pytest.approx(row, abs=2e-5) for row in rows[single]]
    one, two = weights(single), weights(double)
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)


def test_a_killed_two_process_run_resumes_to_the_same_weights(store, two_processes, tmp_path):
    out = tmp_path / "killed"
    process = torchrun(store, out)
    checkpoint = out / "checkpoint.safetensors"
    while True:  # let it run in slices of 20 ms (a few steps at most) until its first checkpoint is there
        time.sleep(0.02)
        members = family(process.pid)
        signal_all(members, signal.SIGSTOP)
        if checkpoint.exists() or process.poll() is not None:
            break
        signal_all(members, signal.SIGCONT)
    signal_all(members, signal.SIGKILL)  # the launcher and both workers, mid-run
    process.communicate()
    stopped_at = read_meta(checkpoint)["step"]
    assert 0 < stopped_at < STEPS, "the run ended before it could be killed"
    finish(torchrun(store, out, "--resume"))
    resumed, straight = weights(out), weights(two_processes)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert losses(out) == losses(two_processes)


def test_gradient_accumulation_trains_as_the_whole_batch(store, one_process, tmp_path):
    out = in_this_process(tmp_path, *command(store, tmp_path, 2, "--accumulate", "2"))
    assert losses(out) == pytest.approx(losses(one_process), abs=2e-5)
    single, accumulated = weights(one_process), weights(out)
    assert all(torch.allclose(single[k], accumulated[k], atol=1e-5) for k in single)
