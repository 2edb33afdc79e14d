"""How few sampling steps keep the quality of the 200-step Euler reference? Measured on flows whose answer is known.

A trained model's velocity is an estimate of the exact rectified-flow velocity of its data. For two data
distributions that exact velocity has a closed form, so every solver setting can be scored against the
true end point, with no model in the way (seconds on a CPU, the same on every machine):

- "detail": Gaussian data with per-component standard deviations spread log-uniformly from 0.01 to 3,
  like an image spectrum from fine texture to coarse shape. Its flow is stiff near t = 0 for the fine
  components: coarse steps there blur detail. The end point is known exactly (x0 = s * noise).
- "anatomy": a mixture of 8 well-separated clusters (which anatomy) with the same spectrum inside each.
  Here the trajectory bends near t = 1, where the sample picks its cluster: coarse steps there pick the
  wrong one. The end point is a 1000-step Heun solution.

Reported per setting: model calls per block, relative error of the whole sample, and relative error of
the fine components (std < 0.1) and of the coarse ones, each divided by the reference's error: 1.0 means
"as good as 200 Euler steps", below 1 better. Not a test; results go to docs/BENCHMARKS.md.

    python bench/solver_study.py [--setting heun:20:1 ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ctflow.errors import CTFlowError
from ctflow.sampling import sample
from generation import json_output, write_json  # bench/, the script's folder

REFERENCE = ("euler", 200, 1.0)
CANDIDATES = [
    ("heun", 20, 1.0), ("heun", 10, 1.0), ("ab2", 10, 1.0), ("ab2", 16, 1.0), ("ab2", 20, 1.0), ("ab2", 25, 1.0),
    ("ab2", 32, 1.0), ("ab2", 50, 1.0), ("heun", 25, 1.0), ("euler", 50, 1.0), ("heun", 20, 0.3), ("heun", 20, 3.0),
]
FINE = 0.1  # components with a smaller standard deviation count as fine detail


class GaussianMixtureFlow:
    """Exact rectified-flow velocity of a mixture of Gaussians with shared diagonal covariance (z_t = (1-t) x0 + t e).

    Posterior mean of x0 given z_t: cluster responsibilities times each cluster's Gaussian posterior mean.
    """

    def __init__(self, std: torch.Tensor, centres: torch.Tensor) -> None:
        self.std, self.centres = std, centres  # [D], [K, D]

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.double()
        variance = (1 - t) ** 2 * self.std**2 + t**2  # of z_t given the cluster, per component
        offset = z[:, None, :] - (1 - t) * self.centres[None]  # [B, K, D]
        weights = torch.softmax(-0.5 * (offset**2 / variance).sum(-1), dim=1)  # [B, K]
        clean = self.centres[None] + (1 - t) * self.std**2 / variance * offset  # [B, K, D]
        return (z - (weights[..., None] * clean).sum(1)) / t


def problems(seed: int = 0, dim: int = 2048, batch: int = 128) -> dict[str, tuple]:
    """(velocity, noise, true end point, std per component) of the two test flows."""
    generator = torch.Generator().manual_seed(seed)
    std = torch.logspace(-2, 0.5, dim, dtype=torch.float64)
    noise = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    detail = GaussianMixtureFlow(std, torch.zeros(1, dim, dtype=torch.float64))
    anatomy = GaussianMixtureFlow(std, torch.randn(8, dim, generator=generator, dtype=torch.float64))
    return {
        "detail": (detail, noise, std * noise, std),
        "anatomy": (anatomy, noise, sample(anatomy, noise.clone(), 1000, "heun", 1.0), std),
    }


def errors(velocity, noise, truth, std, setting) -> dict[str, float]:
    """Relative errors against the true end points; with clusters, only over samples that ended in the same cluster
    as the truth (landing in another, equally valid cluster is a different sample, not a worse one), and the share of
    samples that did not."""
    method, steps, shift = setting
    end = sample(velocity, noise.clone(), steps, method, shift)
    same = cluster(velocity, end) == cluster(velocity, truth)
    error = (end - truth)[same]
    fine = std < FINE
    return {
        "all": float(error.norm() / truth[same].norm()),
        "fine": float((error[:, fine] / std[fine]).pow(2).mean().sqrt()),
        "coarse": float((error[:, ~fine] / std[~fine]).pow(2).mean().sqrt()),
        "other_cluster": 1 - float(same.double().mean()),
    }


def cluster(flow: GaussianMixtureFlow, points: torch.Tensor) -> torch.Tensor:
    """Index of the most likely cluster of each clean point."""
    return (((points[:, None, :] - flow.centres[None]) / flow.std) ** 2).sum(-1).argmin(1)


def study(settings: list[tuple]) -> list[dict]:
    rows = []
    tests = problems()
    reference = {name: errors(*test, REFERENCE) for name, test in tests.items()}
    for setting in [REFERENCE] + settings:
        method, steps, shift = setting
        row = {"sampler": method, "steps": steps, "shift": shift, "calls_per_block": 2 * steps - 1 if method == "heun" else steps}
        for name, test in tests.items():
            measured = errors(*test, setting)
            row.update({f"{name}_{part}": measured[part] / reference[name][part] for part in ("all", "fine", "coarse")})
            if name == "anatomy":
                row["anatomy_other_cluster"] = measured["other_cluster"]
        row["worst"] = max(value for key, value in row.items() if key.endswith(("_all", "_fine", "_coarse")))
        rows.append(row)
    return rows


def parse(text: str) -> tuple:
    method, steps, shift = text.split(":")
    return method, int(steps), float(shift)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", action="append", type=parse, help="SAMPLER:STEPS:SHIFT (default: a built-in list)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args()
    try:
        json_output(args.json, args.overwrite)
    except CTFlowError as exc:
        raise SystemExit(f"solver_study: {exc}") from exc
    torch.set_num_threads(1)
    rows = study(args.setting or CANDIDATES)
    write_json(args.json, rows, args.overwrite)
    columns = list(rows[0])
    print("Errors relative to the 200-step Euler reference's own error (1.0 = equal quality; lower is better)\n")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) and k not in ("shift",) else f"{v:g}" if isinstance(v, float)
                                 else str(v) for k, v in row.items()) + " |")


if __name__ == "__main__":
    sys.exit(main())
