"""Does a finding appear when the report asks for it, and stay away when the report negates it?

    ctflow-train finding-study --model Resources/Models/ctflow-demo --data cache/cohort cache/twins \\
        --latents cache/latents16.safetensors cache/twins16.safetensors --seeds 10 --out cache/findings.json

The detector of each finding is a probe: a logistic regression on the volume's latents (the model's own space)
of every 4th real slice, averaged over a coarse grid (8 levels x 8 x 8 places x the latent channels; mean and
spread in each cell). It is trained on the cohort's latent caches and label files, and cohort twins
(`ctflow-train cohort --twins`) sharpen it, since a pair differs only in the finding. Its accuracy is
cross-validated with each patient and his twins in one fold. CTFlow and GenerateCT measure text alignment alike:
a classifier trained on real CTs (CT-CLIP there) applied to generated ones. HU rules on the decoded volumes do
worse through the 16x slice autoencoder: the share of lung below -950 HU (LAA-950) and the lungs' area, in 4
levels, told emphysema apart in 65 % of the cohort's volumes and pleural effusion in 64 % (latent probe: 62 % and
83 %); adding them to the probe changed nothing, so they are not measured.

A generated volume is encoded by the model's VAE, as the cohort's volumes were, and "shows" the finding when its
probe says more likely than not. Reports: the finding alone described (its parameters taken from a cohort
patient), versus a normal report, which negates every finding; the same seeds for both, so the study also
counts the seeds in which asking raised the probe's probability over negating: a paired comparison, which a
weak detector blurs less than it blurs the counts. Any described finding may change a volume somewhat (a report
that is not normal), so it also counts the seeds in which the finding's own report, of all the reports, gave its
probe the highest probability (1 in 5 by chance): that the change is the one asked for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ctflow import CTFlowPipeline, GenerationRequest
from ctflow.pipeline import START_HU

from .dataset import read_index
from .evaluate import real_slices
from .latent_cache import read_cache
from .reports import write_report

STUDIED = ("emphysema", "pleural_effusion", "consolidation", "cardiomegaly")
GRID = (8, 8, 8)  # levels along the body x rows x columns the latents are averaged over
EVERY = 4  # every 4th real slice is enough for 8 levels, and a generated volume is encoded 4x faster
FOLDS = 5
TWIN_SUFFIX = re.compile(r"_with(out)?_[a-z_]+$")


def grid_features(latents: torch.Tensor) -> np.ndarray:
    """[S, C, h, w] latents of real slices -> mean and spread of each channel in each cell of GRID."""
    x = latents.float().permute(1, 0, 2, 3)[None]  # [1, C, S, h, w]
    mean = F.adaptive_avg_pool3d(x, GRID)
    spread = (F.adaptive_avg_pool3d(x * x, GRID) - mean * mean).clamp(min=0).sqrt()
    return torch.cat([mean.flatten(), spread.flatten()]).numpy()


@dataclasses.dataclass
class Probe:
    """Logistic regression on standardised features."""

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float

    def probability(self, features: np.ndarray) -> np.ndarray:
        z = ((features - self.mean) / self.scale) @ self.weight + self.bias
        return 1 / (1 + np.exp(-z))


def fit_probe(x: np.ndarray, y: np.ndarray, l2: float = 1.0) -> Probe:
    """Penalised maximum likelihood (L-BFGS); strong L2 because features outnumber patients."""
    mean, scale = x.mean(0), x.std(0) + 1e-6
    xs = torch.from_numpy((x - mean) / scale).double()
    ys = torch.from_numpy(y.astype(np.float64))
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = F.binary_cross_entropy_with_logits(xs @ weight + bias, ys) + l2 * weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    return Probe(mean, scale, weight.detach().numpy(), float(bias.detach()))


def cross_validated_accuracy(x: np.ndarray, y: np.ndarray, groups: list[str]) -> float:
    """Accuracy on held-out folds of whole groups (a patient and his twins), so a twin never tests its pair."""
    names = sorted(set(groups))
    fold_of = {name: number % FOLDS for number, name in enumerate(names)}
    folds = np.array([fold_of[g] for g in groups])
    right = 0
    for fold in range(FOLDS):
        test = folds == fold
        if test.any() and 0 < y[~test].sum() < (~test).sum():
            right += int(((fit_probe(x[~test], y[~test]).probability(x[test]) > 0.5) == y[test]).sum())
        else:
            right += int((y[test] == (y[~test].mean() > 0.5)).sum())
    return right / len(y)


def labelled_latents(folders: list[Path], caches: list[Path], start: torch.Tensor):
    """Features of every cached volume, each finding's presence from its label file, and its patient. `start` is
    the start slice's latent as the model's autoencoder encodes it: caches from another one are refused."""
    features, present, groups = [], {f: [] for f in STUDIED}, []
    for folder, path in zip(folders, caches, strict=True):
        cache = read_cache(path)
        if not torch.allclose(cache.start, start, atol=1e-3):
            raise ValueError(f"{path} was not encoded by the model's autoencoder: probes trained on it would not "
                             "read the model's volumes")
        index = {entry["name"]: entry for entry in read_index(folder)}
        for number, name in enumerate(cache.meta["names"]):
            labels = json.loads((folder / index[name]["labels"]).read_text())["findings"]
            features.append(grid_features(cache.latents[number][: cache.meta["content_slices"][number] : EVERY]))
            for finding in STUDIED:
                present[finding].append(bool(labels[finding]["present"]))
            groups.append(TWIN_SUFFIX.sub("", name))
    return np.stack(features), {f: np.array(p) for f, p in present.items()}, groups


def calibrate(folders: list[Path], caches: list[Path], start: torch.Tensor) -> tuple[dict[str, Probe], dict]:
    """One probe per finding, fitted on every cached volume, and its cross-validated accuracy."""
    x, present, groups = labelled_latents(folders, caches, start)
    probes, report = {}, {}
    for finding in STUDIED:
        y = present[finding]
        if y.all() or not y.any():
            raise ValueError(f"the cached volumes all have or all lack {finding}: a probe needs both")
        probes[finding] = fit_probe(x, y)
        report[finding] = {"cross_validated_accuracy": round(cross_validated_accuracy(x, y, groups), 3),
                           "volumes": len(y), "with_finding": int(y.sum()), "patients": len(set(groups))}
    return probes, report


def volume_features(pipe: CTFlowPipeline, hu: np.ndarray) -> np.ndarray:
    """A generated volume's features: encoded by the model's VAE, as the cohort's volumes were."""
    with torch.no_grad():
        latents = pipe.autoencoder.encode(torch.from_numpy(hu[: max(1, real_slices(hu)) : EVERY]).to(pipe.device))
    return grid_features(latents.cpu())


def study_reports(data: Path, seed: int) -> dict[str, str]:
    """'normal' (every finding negated) and, per studied finding, a report describing that finding alone."""
    absent = {"present": False}
    entries = read_index(data)
    finding_names = json.loads((data / entries[0]["labels"]).read_text())["findings"].keys()
    normal = {name: absent for name in finding_names}
    reports = {"normal": write_report(normal, np.random.default_rng(seed)).text}
    for finding in STUDIED:
        for entry in entries:
            params = json.loads((data / entry["labels"]).read_text())["findings"][finding]
            if params["present"]:
                reports[finding] = write_report({**normal, finding: params}, np.random.default_rng(seed)).text
                break
    return reports


def run_study(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if len(args.data) != len(args.latents):
        raise ValueError("give one --latents cache per --data folder, in the same order")
    pipe = CTFlowPipeline.from_pretrained(args.model, device="cpu")
    probes, detectors = calibrate(args.data, args.latents, pipe.autoencoder.constant_latent(START_HU).cpu())
    reports = study_reports(args.data[0], args.seed)
    request = GenerationRequest("", steps=args.steps, guidance=args.guidance)
    probability = {kind: [{f: float(probes[f].probability(features)) for f in STUDIED} for features in
                          (volume_features(pipe, pipe.generate(dataclasses.replace(request, report=text, seed=args.seed + s)).hu)
                           for s in range(args.seeds))]
                   for kind, text in reports.items()}
    asked, negated = {f: probability[f] for f in STUDIED}, probability["normal"]
    return {
        "detectors": detectors,
        "seeds": args.seeds,
        "steps": args.steps or pipe.config.sampling.steps,
        "guidance": pipe.config.sampling.guidance if args.guidance is None else args.guidance,
        "shown_when_asked": {f: sum(p[f] > 0.5 for p in asked[f]) for f in STUDIED},
        "shown_when_negated": {f: sum(p[f] > 0.5 for p in negated) for f in STUDIED},
        "asking_raised_probability": {f: sum(a[f] > n[f] for a, n in zip(asked[f], negated)) for f in STUDIED},
        "own_report_ranked_first": {f: sum(max(probability, key=lambda kind: probability[kind][s][f]) == f
                                           for s in range(args.seeds)) for f in STUDIED},
        "values": probability,  # unrounded, so the counts above can be recounted from it
        "reports": reports,
    }


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--data", type=Path, nargs="+", required=True,
                        help="cohort folder(s) whose labels train the probes (the first also gives the reports)")
    parser.add_argument("--latents", type=Path, nargs="+", required=True, help="the latent cache of each --data folder")
    parser.add_argument("--seeds", type=int, default=10, help="generations per report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="sampling steps per block (default: the model's)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default: the model's)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, required=True, help="JSON to write")


def run(args: argparse.Namespace) -> int:
    result = run_study(args)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    keys = ("detectors", "shown_when_asked", "shown_when_negated", "asking_raised_probability", "own_report_ranked_first")
    print(json.dumps({k: result[k] for k in keys}, indent=1))
    return 0
