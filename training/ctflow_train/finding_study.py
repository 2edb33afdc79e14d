"""Does a finding appear when the report asks for it, and stay away when the report negates it?

    ctflow-train finding-study --model Resources/Models/ctflow-demo --data cache/cohort --latents cache/latents.safetensors \\
        --seeds 5 --out cache/findings.json

Detectors are simple HU rules on the generated volume, each a single number per volume:
- emphysema: share of lung voxels below -950 HU in the upper half of the lungs (low-attenuation area);
- pleural_effusion: share of the lung volume in the lowest 40 % of the lung range (fluid displaces basal lung);
- ground_glass: share of voxels between -750 and -400 HU inside each lung's convex hull (hazy parenchyma);
- medical_material: share of voxels above +950 HU (metal, at the edge of the [-1000, 1000] window).
Cardiomegaly and consolidation were tried as well (non-lung share of the lungs' hull, dense share): on the
cohort's own volumes they did no better than chance, so they are not studied.
"Lungs" are voxels below -500 HU enclosed by the body. Each detector's threshold is the midpoint between its
mean on cohort patients with and without the finding, measured on their VAE reconstructions (generated
volumes pass through the same decoder, which blurs fine texture). A volume "shows" the finding when its value
lies on the finding's side of the threshold. Reports: the finding alone described (its parameters taken from a
cohort patient), versus a normal report, which negates every finding; the same seeds for both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ctflow import CTFlowPipeline, GenerationRequest

from .dataset import read_index
from .evaluate import real_slices
from .findings import _convex_fill
from .latent_cache import read_cache
from .reports import write_report

STUDIED = ("emphysema", "pleural_effusion", "ground_glass", "medical_material")
LUNG_HU, LOW_HU, METAL_HU = -500, -950, 950
HAZY_HU = (-750, -400)


def lungs(hu: np.ndarray) -> np.ndarray:
    """[S, H, W] bool: voxels below -500 HU that the body encloses (per slice)."""
    body = hu > LUNG_HU
    inside = np.stack([ndimage.binary_fill_holes(plane) for plane in body])
    return inside & ~body


def lung_range(mask: np.ndarray) -> tuple[int, int]:
    rows = np.nonzero(mask.sum(axis=(1, 2)) > 0.02 * mask.shape[1] * mask.shape[2])[0]
    return (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, len(mask))


def features(hu: np.ndarray) -> dict[str, float]:
    """One number per studied finding (see the module docstring)."""
    hu = hu[: real_slices(hu)].astype(np.float32)
    mask = lungs(hu)
    top, bottom = lung_range(mask)
    span = bottom - top
    upper, lower = slice(top, top + span // 2), slice(top + int(0.6 * span), bottom)
    hulls = np.stack([side_hulls(plane) for plane in mask[top:bottom]])  # [span, H, W]
    hazy = (hu[top:bottom] > HAZY_HU[0]) & (hu[top:bottom] < HAZY_HU[1])
    return {
        "emphysema": float((hu[upper][mask[upper]] < LOW_HU).mean()) if mask[upper].any() else 0.0,
        "pleural_effusion": float(mask[lower].sum() / max(1, mask[top:bottom].sum())),
        "ground_glass": float((hulls & hazy).sum() / max(1, hulls.sum())),
        "medical_material": float((hu > METAL_HU).mean()),
    }


def side_hulls(plane: np.ndarray) -> np.ndarray:
    """Convex hull of each lung (left and right of the lungs' middle column) filled: lung plus what lies in it."""
    columns = np.nonzero(plane.any(axis=0))[0]
    if not len(columns):
        return plane
    middle = (columns[0] + columns[-1]) // 2
    out = np.zeros_like(plane)
    out[:, :middle] = _convex_fill(plane[:, :middle])
    out[:, middle:] = _convex_fill(plane[:, middle:])
    return out


def calibrate(pipe: CTFlowPipeline, data: Path, latents_path: Path, patients: int, every: int) -> dict:
    """Per finding: threshold and direction from VAE-decoded cohort patients (every `every`-th slice), and the
    detector's accuracy on them."""
    cache = read_cache(latents_path)
    index = {entry["name"]: entry for entry in read_index(data)}
    values, present = [], []
    for number, name in enumerate(cache.meta["names"][:patients]):
        labels = json.loads((data / index[name]["labels"]).read_text())["findings"]
        latents = cache.latents[number][::every]  # [S / every, C, h, w]
        hu = pipe.autoencoder.decode(latents).numpy()
        values.append(features(hu))
        present.append({f: labels[f]["present"] for f in STUDIED})
    result = {}
    for finding in STUDIED:
        x = np.array([v[finding] for v in values])
        y = np.array([p[finding] for p in present])
        if y.all() or not y.any():
            raise ValueError(f"the first {patients} patients all have or all lack {finding}: use more")
        high = x[y].mean() > x[~y].mean()
        threshold = (x[y].mean() + x[~y].mean()) / 2
        shows = x > threshold if high else x < threshold
        result[finding] = {"threshold": round(float(threshold), 4), "present_is_high": bool(high),
                           "cohort_accuracy": round(float((shows == y).mean()), 2), "cohort_patients": len(y)}
    return result


def shows(value: float, rule: dict) -> bool:
    return value > rule["threshold"] if rule["present_is_high"] else value < rule["threshold"]


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
    pipe = CTFlowPipeline.from_pretrained(args.model, device="cpu")
    rules = calibrate(pipe, args.data, args.latents, args.calibration_patients, args.every)
    reports = study_reports(args.data, args.seed)
    request = GenerationRequest("", steps=args.steps, guidance=args.guidance)
    measured = {kind: [features(pipe.generate(dataclasses.replace(request, report=text, seed=args.seed + s)).hu)
                       for s in range(args.seeds)]
                for kind, text in reports.items()}
    return {
        "detectors": rules,
        "seeds": args.seeds,
        "steps": args.steps or pipe.config.sampling.steps,
        "guidance": pipe.config.sampling.guidance if args.guidance is None else args.guidance,
        "shown_when_asked": {f: sum(shows(v[f], rules[f]) for v in measured[f]) for f in STUDIED},
        "shown_when_negated": {f: sum(shows(v[f], rules[f]) for v in measured["normal"]) for f in STUDIED},
        "values": {kind: [{f: round(v[f], 4) for f in STUDIED} for v in vs] for kind, vs in measured.items()},
        "reports": reports,
    }


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--data", type=Path, required=True, help="the cohort folder (labels give the calibration truth)")
    parser.add_argument("--latents", type=Path, required=True, help="the latent cache of that cohort")
    parser.add_argument("--seeds", type=int, default=10, help="generations per report")
    parser.add_argument("--calibration-patients", type=int, default=16)
    parser.add_argument("--every", type=int, default=2, help="decode every N-th slice for calibration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="sampling steps per block (default: the model's)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default: the model's)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, required=True, help="JSON to write")


def run(args: argparse.Namespace) -> int:
    result = run_study(args)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("detectors", "shown_when_asked", "shown_when_negated")}, indent=1))
    return 0
