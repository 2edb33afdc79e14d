"""Whether two checkouts train, export and evaluate the same: a tiny run of every `ctflow-train` model step, made by
each checkout, then compared file by file (weights bit for bit, loss logs, metrics, model card). Not a test: it
compares a refactor against the code before it.

    git archive main | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before/CTFlowLib:/tmp/before/training python bench/training_identity.py run /tmp/id/before
    PYTHONPATH=CTFlowLib:training python bench/training_identity.py run /tmp/id/after --evaluation-of /tmp/id/before
    python bench/training_identity.py compare /tmp/id/before /tmp/id/after

`run` makes a tiny prepared folder, a VAE (6 steps) and a decoder-only VAE (3 steps), a latent store, a flow run
(5 steps, rollout) and a warm-started one (--slice-position), then an evaluation and an export of the second flow
run. The export takes the first checkout's evaluation file where it exists (`--evaluation-of`), so the model cards
of both hold the same figures. One thread, so the numbers are the same in both processes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

SIZE = 16


def volume(rng: np.random.Generator, slices: int) -> np.ndarray:
    """int16 [slices + 4 white, 16, 16]: a body with two lungs whose size changes along z."""
    j, i = np.mgrid[:SIZE, :SIZE]
    hu = np.full((slices + 4, SIZE, SIZE), -1000, np.int16)
    for k in range(slices):
        hu[k][(j - 8) ** 2 / 36 + (i - 8) ** 2 / 49 < 1] = 40
        r = 1.5 + 2 * np.sin(np.pi * k / slices) + rng.uniform(-0.3, 0.3)
        hu[k][((j - 8) ** 2 + (i - 5) ** 2 < r**2) | ((j - 8) ** 2 + (i - 11) ** 2 < r**2)] = -850
    hu[slices:] = 1000
    return hu


def command(*argv) -> None:
    from ctflow_train import cli

    if cli.main([str(a) for a in argv]) != 0:
        sys.exit(f"ctflow-train {argv[0]} failed")


def run(out: Path, evaluation_of: Path | None) -> None:
    from ctflow.report import Report
    from ctflow.volume import Geometry, Volume
    from ctflow_train.dataset import DatasetWriter

    torch.set_num_threads(1)
    data, common = out / "data", ["--threads", 1]
    rng = np.random.default_rng(0)
    with DatasetWriter(data) as writer:
        for n in range(5):
            findings = f"Patient {n}. {'Pleural effusion.' if n % 2 else 'No effusion.'}"
            report = Report(findings=findings, impressions="-")
            writer.add(f"t{n}", Volume(volume(rng, 14 + n), Geometry((2.0, 2.0, 2.5)), None), report,
                       {"name": f"t{n}", "synthetic": True, "findings": {}})
    vae = ["--data", data, "--size", SIZE, "--crop", SIZE, "--batch", 4, "--holdout", 1, "--warmup", 1,
           "--eval-slices", 8, "--eval-every", 1, *common]
    command("vae", *vae, "--out", out / "vae", "--preset", "tiny", "--steps", 6, "--adv-start", 3)
    command("vae", *vae, "--out", out / "vae2", "--decoder-of", out / "vae", "--steps", 3, "--adv-start", 0)
    command("cache-latents", "--data", data, "--vae", out / "vae" / "vae", "--out", out / "latents", "--size", SIZE,
            "--holdout", 1)
    flow = ["--cache", out / "latents", "--preset", "tiny", "--block", 4, "--batch", 3, "--warmup", 1, "--workers", 0,
            *common]
    command("flow", *flow, "--out", out / "flow", "--steps", 5, "--lr", 1e-3, "--save-every", 2, "--rollout-p", 0.5)
    command("flow", *flow, "--out", out / "flow2", "--init", out / "flow", "--slice-position", "--steps", 2)
    evaluation = (evaluation_of or out) / "eval.json"
    if evaluation_of is None:  # the first checkout: its own model, evaluated, gives the figures both cards show
        command("export", "--flow", out / "flow2", "--vae", out / "vae2", "--cache", out / "latents", "--out",
                out / "unevaluated", "--steps", 2, "--calibration-cases", 2)
        command("evaluate", "--model", out / "unevaluated", "--data", data, "--holdout", 2, "--requested", 12,
                "--out", evaluation, *common)
    command("export", "--flow", out / "flow2", "--vae", out / "vae2", "--cache", out / "latents", "--out",
            out / "model", "--steps", 2, "--calibration-cases", 2, "--half", "--evaluation", evaluation)
    command("evaluate", "--model", out / "model", "--data", data, "--holdout", 2, "--requested", 12,
            "--out", out / "model_eval.json", *common)


def compare(a: Path, b: Path) -> dict[str, bool]:
    from safetensors.torch import load_file

    def same_tensors(name: str) -> bool:
        x, y = load_file(a / name), load_file(b / name)
        return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    def text(folder: Path, name: str) -> str:  # run folders and times differ by nature
        found = (folder / name).read_text().replace(str(folder), "RUN")
        return re.sub(r'"(train_seconds|seconds|seconds_per_128_slices|machine)": [^,}\n]+', "", found)

    def losses(folder: Path, name: str) -> list:  # all but the step time
        return [row.split(",")[:-1] for row in (folder / name).read_text().splitlines()]

    found = {name: same_tensors(name) for name in (
        "vae/checkpoint.safetensors", "vae2/checkpoint.safetensors", "vae2/vae/diffusion_pytorch_model.safetensors",
        "flow/checkpoint.safetensors", "flow2/checkpoint.safetensors", "model/model.safetensors")}
    found |= {name: losses(a, name) == losses(b, name) for name in (
        "vae/loss.csv", "vae2/loss.csv", "flow/loss.csv", "flow2/loss.csv")}
    found |= {name: text(a, name) == text(b, name) for name in (
        "vae/metrics.json", "vae2/metrics.json", "model/config.json", "model/README.md", "model_eval.json")}
    found |= {f"latents/volumes/{p.name}": p.read_bytes() == (b / "latents" / "volumes" / p.name).read_bytes()
              for p in sorted((a / "latents" / "volumes").iterdir())}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    made = steps.add_parser("run", help="make the tiny runs with the ctflow_train on PYTHONPATH")
    made.add_argument("out", type=Path, help="a new folder")
    made.add_argument("--evaluation-of", type=Path, help="the first checkout's run folder: export with its eval.json")
    both = steps.add_parser("compare", help="compare two run folders file by file")
    both.add_argument("a", type=Path)
    both.add_argument("b", type=Path)
    args = parser.parse_args()
    if args.step == "run":
        run(args.out, args.evaluation_of)
    else:
        found = compare(args.a, args.b)
        print(json.dumps({"same": all(found.values()), "files": found}, indent=1))


if __name__ == "__main__":
    main()
