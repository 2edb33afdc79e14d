"""Does a finding appear when the report asks for it, and stay away when the report negates it?

    ctflow-train finding-study --model Resources/Models/ctflow-demo --data cache/cohort cache/twins \\
        --latents cache/latents16 cache/twins16 --seeds 10 --out cache/findings.json

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

Where the report puts it: for findings on one side (pleural effusion, consolidation), a second probe, fitted on
the cohort's volumes that have the finding on one side only, tells right from left. It reads the grid's features
minus those of its mirror image, the part that differs between the two sides (cross-validated on the cohort: 0.82
for consolidation where the plain grid gave 0.65). The finding's report is generated once with the finding on the
right and once on the left (parameters of the first cohort patient with it there), and the study counts the seeds
whose volume that probe puts on the reported side, and the seeds in which the right-sided report made the volume
more right-sided than the left-sided one did (5 in 10 by chance).
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
from ctflow.conventions import START_HU

from .dataset import read_index
from .evaluate import real_slices
from .findings import SIDED, SIDES  # the findings a report puts on one side; "right", "left"
from .latent_store import LatentStore, same_encoding
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


def mirrored_difference(features: np.ndarray) -> np.ndarray:
    """grid_features minus those of the left-right mirrored volume (the grid's columns reversed): the asymmetry."""
    cells = features.reshape(*features.shape[:-1], -1, GRID[2])  # the last grid axis runs across the columns
    return (cells - cells[..., ::-1]).reshape(features.shape)


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


def side(params: dict) -> str | None:
    """'right' or 'left' for a finding on one side (its side, or its lobe's); None when absent or on both."""
    if not params["present"]:
        return None
    where = params.get("side") or params.get("lobe", "").split(" ")[0]
    return where if where in SIDES else None


def labelled_latents(folders: list[Path], caches: list[Path], start: torch.Tensor):
    """Features of every cached volume, its findings (label file) and its patient. `start` is the start slice's
    latent as the model's autoencoder encodes it: caches from another one are refused."""
    features, labels, groups = [], [], []
    for folder, path in zip(folders, caches, strict=True):
        cache = LatentStore(path)
        if not same_encoding(cache.start, start):
            raise ValueError(f"{path} was not encoded by the model's autoencoder: probes trained on it would not "
                             "read the model's volumes")
        index = {entry["name"]: entry for entry in read_index(folder)}
        for number, name in enumerate(cache.meta["names"]):
            labels.append(json.loads((folder / index[name]["labels"]).read_text())["findings"])
            features.append(grid_features(cache.window(number, 0, cache.meta["content_slices"][number])[::EVERY]))
            groups.append(TWIN_SUFFIX.sub("", name))
    return np.stack(features), labels, groups


@dataclasses.dataclass
class Detectors:
    present: dict[str, Probe]  # per studied finding: is it there?
    right: dict[str, Probe]  # per sided finding seen on both sides: is it on the right rather than the left?
    report: dict  # per finding: cross-validated accuracies and counts


def calibrate(folders: list[Path], caches: list[Path], start: torch.Tensor) -> Detectors:
    """The probes, fitted on every cached volume, and their cross-validated accuracy."""
    x, labels, groups = labelled_latents(folders, caches, start)
    detectors = Detectors({}, {}, {})
    for finding in STUDIED:
        y = np.array([bool(findings[finding]["present"]) for findings in labels])
        if y.all() or not y.any():
            raise ValueError(f"the cached volumes all have or all lack {finding}: a probe needs both")
        detectors.present[finding] = fit_probe(x, y)
        detectors.report[finding] = {"cross_validated_accuracy": round(cross_validated_accuracy(x, y, groups), 3),
                                     "volumes": len(y), "with_finding": int(y.sum()), "patients": len(set(groups))}
    for finding in SIDED:
        where = [side(findings[finding]) for findings in labels]
        one_sided = np.array([w is not None for w in where])
        y = np.array([w == "right" for w in where])[one_sided]
        if y.all() or not y.any():
            detectors.report[finding]["side"] = {"skipped": "the cached volumes show it on one side only"}
            continue
        asymmetry = mirrored_difference(x[one_sided])
        detectors.right[finding] = fit_probe(asymmetry, y)
        one_sided_groups = [g for g, keep in zip(groups, one_sided) if keep]
        detectors.report[finding]["side"] = {
            "cross_validated_accuracy": round(cross_validated_accuracy(asymmetry, y, one_sided_groups), 3),
            "right": int(y.sum()), "left": int((~y).sum()),
            "always_the_commoner_side": round(max(y.mean(), 1 - y.mean()), 3)}  # what a probe must beat
    return detectors


def volume_features(pipe: CTFlowPipeline, hu: np.ndarray) -> np.ndarray:
    """A generated volume's features: encoded by the model's VAE, as the cohort's volumes were."""
    with torch.no_grad():
        latents = pipe.autoencoder.encode(torch.from_numpy(hu[: max(1, real_slices(hu)) : EVERY]).to(pipe.device))
    return grid_features(latents.cpu())


def study_reports(data: Path, seed: int) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """'normal' (every finding negated) and, per studied finding, a report describing that finding alone (on one
    side for a sided finding); and per sided finding, its report with the finding on each side, where the cohort
    has a patient with it there."""
    absent = {"present": False}
    entries = read_index(data)
    labels = [json.loads((data / entry["labels"]).read_text())["findings"] for entry in entries]
    normal = {name: absent for name in labels[0]}

    def describing(finding: str, wanted) -> str | None:
        params = next((findings[finding] for findings in labels if wanted(findings[finding])), None)
        return None if params is None else write_report({**normal, finding: params}, np.random.default_rng(seed)).text

    reports = {"normal": write_report(normal, np.random.default_rng(seed)).text}
    for finding in STUDIED:
        described = describing(finding, (lambda p: side(p) is not None) if finding in SIDED else (lambda p: p["present"]))
        if described is None:
            raise ValueError(f"no patient in {data} has {finding}: its report cannot be written")
        reports[finding] = described
    sided = {finding: {where: describing(finding, lambda p, where=where: side(p) == where) for where in SIDES}
             for finding in SIDED}
    return reports, {finding: texts for finding, texts in sided.items() if None not in texts.values()}


def run_study(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if len(args.data) != len(args.latents):
        raise ValueError("give one --latents cache per --data folder, in the same order")
    pipe = CTFlowPipeline.from_pretrained(args.model, device="cpu")
    detectors = calibrate(args.data, args.latents, pipe.autoencoder.constant_latent(START_HU).cpu())
    reports, sided_reports = study_reports(args.data[0], args.seed)
    sided_reports = {f: texts for f, texts in sided_reports.items() if f in detectors.right}
    request = GenerationRequest("", steps=args.steps, guidance=args.guidance)
    generated: dict[str, list[np.ndarray]] = {}  # report text -> features per seed; a text is generated once

    def features(text: str) -> list[np.ndarray]:
        if text not in generated:
            generated[text] = [volume_features(pipe, pipe.generate(dataclasses.replace(request, report=text,
                                                                                        seed=args.seed + s)).hu)
                               for s in range(args.seeds)]
        return generated[text]

    probability = {kind: [{f: float(detectors.present[f].probability(x)) for f in STUDIED} for x in features(text)]
                   for kind, text in reports.items()}
    right = {f: {where: [float(detectors.right[f].probability(mirrored_difference(x))) for x in features(text)]
                 for where, text in texts.items()} for f, texts in sided_reports.items()}
    asked, negated = {f: probability[f] for f in STUDIED}, probability["normal"]
    return {
        "detectors": detectors.report,
        "seeds": args.seeds,
        "steps": args.steps or pipe.config.sampling.steps,
        "guidance": pipe.config.sampling.guidance if args.guidance is None else args.guidance,
        "shown_when_asked": {f: sum(p[f] > 0.5 for p in asked[f]) for f in STUDIED},
        "shown_when_negated": {f: sum(p[f] > 0.5 for p in negated) for f in STUDIED},
        "asking_raised_probability": {f: sum(a[f] > n[f] for a, n in zip(asked[f], negated)) for f in STUDIED},
        "own_report_ranked_first": {f: sum(max(probability, key=lambda kind: probability[kind][s][f]) == f
                                           for s in range(args.seeds)) for f in STUDIED},
        "at_reported_side": {f: {"right": sum(p > 0.5 for p in r["right"]), "left": sum(p < 0.5 for p in r["left"])}
                             for f, r in right.items()},
        "right_report_more_right": {f: sum(a > b for a, b in zip(r["right"], r["left"])) for f, r in right.items()},
        "values": probability,  # unrounded, so the counts above can be recounted from them
        "side_values": right,  # probability that the finding is on the right, per sided report and seed
        "reports": reports,
        "sided_reports": sided_reports,
    }


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--data", type=Path, nargs="+", required=True,
                        help="cohort folder(s) whose labels train the probes (the first also gives the reports)")
    parser.add_argument("--latents", type=Path, nargs="+", required=True, help="the latent store of each --data folder")
    parser.add_argument("--seeds", type=int, default=10, help="generations per report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="sampling steps per block (default: the model's)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default: the model's)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, required=True, help="JSON to write")


def run(args: argparse.Namespace) -> int:
    result = run_study(args)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    keys = ("detectors", "shown_when_asked", "shown_when_negated", "asking_raised_probability", "own_report_ranked_first",
            "at_reported_side", "right_report_more_right")
    print(json.dumps({k: result[k] for k in keys}, indent=1))
    return 0
