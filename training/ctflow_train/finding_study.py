"""Does a finding appear when the report asks for it, where it asks for it, and stay away when negated?

    ctflow-train finding-study --model Resources/Models/ctflow-demo --data cache/cohort \\
        --latents cache/latents16 --prior cache/anatomy_prior.npz --seeds 10 --out cache/findings.json

Every finding the cohort draws is studied, with two report sets: the cohort's own writer (reports.py: the finding
alone described, against a normal report that negates every finding) and the held-out phrasings
(heldout_reports.json: a radiologist's own words, each against its counterpart with the finding negated or
resolved). Same seeds for both reports of a pair, so the study also counts the seeds in which asking raised the
detector's probability over negating: a paired comparison, which a weak detector blurs less than the counts.

Detectors, so that "the model does not respond" can be told from "the detector cannot see it": for each finding
and target (present; its side; its lobe, where the cohort's labels name one) two classifiers are cross-validated
on the cohort's volumes, each patient and his twins in one fold, and the better one reads the generated volumes:
- a probe on the volume's latents (the model's own space) of every 4th real slice, averaged over a coarse grid
  (8 levels x 8 x 8 places x the latent channels, mean and spread); for the side, the grid minus its mirror image.
  A generated volume's latents are its decoded HU encoded again, so a cohort volume's are too: the decoder drops
  what the encoder kept of small findings (nodules, calcifications), and a probe fitted on the encoder's own
  latents would look for what no generated volume can show;
- a probe on the decoded HU (every 4th real slice, through the model's own decoder, as a generated volume is) in
  the regions of an anatomy prior: the share of voxels in 11 HU bins in each lobe, the heart, the aorta, the airway
  and oesophagus and the whole slice, in 8 levels along the body. A generated volume has no label map, so the
  regions are the cohort's mean label maps (the share of patients in whom a place lies in that structure), with
  the body's levels taken as fractions of its real slices: registration-free, and blurred where patients differ.
Probes are L2-penalised logistic regressions, one against the rest for the lobe; the lobe predicted is the likeliest.
The detector's ceiling: in the cohort's twins (a patient's volumes that differ only in one finding), how often the
used detector, cross-validated, reads the one with the finding higher. A model that draws findings as the cohort
does raises the probability by asking in about that share of seeds, and no detector reads more than that.
A pair of generated volumes (the same seed, the finding asked for and negated) is also read by a paired detector:
a probe on the difference of the two volumes' features, fitted on the twins' differences (with minus without,
and the reverse), in the view whose cross-validated twins it reads right more often (HU on a tie). The patient,
whom a pair shares, cancels out; the presence detectors must tell a finding apart across patients, whose other
differences swamp a small one.
Side and lobe are also read without a detector: the place (the prior's lobes, or a lung's) where the volume differs
most from its pair, the same seed with the finding negated ("side (change)", "lobe (change)"); their ceiling is
counted on the cohort's real twins the same way (placed_by_change). Any change of the
report moves the heart's border, which the left lung's region takes in more than the right's, so "side (relative
change)" divides each lung's change by its usual one: its median change, at the same seed, between the writer's
normal report and his reports of the findings that name no side.
The writer's sided reports come from the first patient with the finding on each side, so a right and a left one may
differ in more than the side (a 7 mm nodule against a 20 mm one, a port against a pacemaker); each is also made
mirrored, its words but the side the same, and a report with its mirror tests the side alone.
CTFlow and GenerateCT measure text alignment alike: a classifier trained on real CTs applied to generated ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ctflow import CTFlowPipeline, GenerationRequest
from ctflow.checksums import sha256_file
from ctflow.config import ModelConfig, SamplingConfig
from ctflow.conventions import START_HU, real_slices
from ctflow.errors import CTFlowError
from ctflow.io import atomic_write
from ctflow.model_folder import VAE_FOLDER
from ctflow.places import LOBE_FILE, Places
from ctflow.report import findings_named, half_reports, names_one_side, parse_report, without_findings
from ctflow.sampling import FINDING_ONSET, denoiser_codes

from .anatomy import in_labels
from .dataset import patient_of, read_index
from .evaluate import generate_volume
from .findings import FINDINGS, LOBES, SIDES, mirrored
from .heldout import DEFAULT as HELDOUT, HeldOutCase, load_heldout
from .latent_store import LatentStore, same_encoding
from .options import add_ct_cache_option, add_guidance_options, add_threads_option, count, positive, seed
from .reports import WORDING_SEED, compose_report, normal_report
from .runtime import set_threads

STUDIED = tuple(finding.name for finding in FINDINGS)  # every finding the cohort draws
KINDS = ("latent", "hu")
GRID = (8, 8, 8)  # levels along the body x rows x columns the latents are averaged over
EVERY = 4  # every 4th real slice is enough for 8 levels, and a generated volume is encoded 4x faster
POOL = 2  # decoded HU averaged over 2 x 2 pixels: the 16x latent keeps no finer detail
LEVELS = 8
HU_EDGES = (-950, -850, -700, -400, -100, 20, 80, 150, 400, 1000)  # air, emphysema, lung, haze, fat, fluid,
# soft tissue, enhancing tissue, calcium, bone, metal
REGIONS = {**{name: (label,) for label, name in LOBES.items()}, "heart": ("heart",), "aorta": ("aorta",),
           "airway and oesophagus": ("trachea", "esophagus")}  # and the whole slice
FOLDS = 5
COHORT_NAME = re.compile(r"^synth_(\d+)_(\d+)$")
MIN_CLASS = 2  # volumes each class needs for a detector to be fitted and cross-validated


# ---------------------------------------------------------------- features


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


def pooled(hu: np.ndarray) -> np.ndarray:
    """[S, H, W] HU -> int16 [S, H/POOL, W/POOL] means."""
    s, h, w = hu.shape
    return np.rint(hu.reshape(s, h // POOL, POOL, w // POOL, POOL).mean((2, 4))).astype(np.int16)


def levels(slices: int) -> np.ndarray:
    """The level (of LEVELS, head to feet) of each of `slices` slices: registration-free, by fraction of the body."""
    return np.minimum(((np.arange(slices) + 0.5) * LEVELS / slices).astype(int), LEVELS - 1)


@dataclasses.dataclass
class AnatomyPrior:
    """Soft regions in the model's grid: [region, level, row, column] share of patients with that structure there."""

    regions: tuple[str, ...]
    weights: np.ndarray  # float32 [len(regions), LEVELS, H / POOL, W / POOL]
    patients: int

    @classmethod
    def from_label_maps(cls, maps: list[np.ndarray], names: dict[str, int]) -> "AnatomyPrior":
        """From label maps [S, H, W] of real slices (each its own length), `names` structure -> label id."""
        s, h, w = maps[0].shape
        weights = np.zeros((len(REGIONS) + 1, LEVELS, h // POOL, w // POOL), np.float32)
        for labels in maps:
            level = levels(len(labels))
            for r, structures in enumerate(REGIONS.values()):
                inside = in_labels(labels, [names[s] for s in structures]).astype(np.float32)
                share = inside.reshape(len(labels), h // POOL, POOL, w // POOL, POOL).mean((2, 4))
                for lv in range(LEVELS):
                    weights[r, lv] += share[level == lv].mean(0) / len(maps)
        weights[-1] = 1.0
        return cls((*REGIONS, "whole slice"), weights, len(maps))

    def save(self, path: Path) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to the temporary name
                np.savez(f, weights=self.weights, regions=np.array(self.regions), patients=self.patients)

        atomic_write(path, write, overwrite=True)

    @classmethod
    def load(cls, path: Path) -> "AnatomyPrior":
        with np.load(path) as stored:
            return cls(tuple(str(r) for r in stored["regions"]), stored["weights"], int(stored["patients"]))

    def features(self, hu: np.ndarray) -> np.ndarray:
        """Pooled HU [S, h, w] of a volume's real slices -> share of each region's voxels in each HU bin, per level."""
        if hu.shape[1:] != self.weights.shape[2:]:
            raise CTFlowError(f"the anatomy prior is {self.weights.shape[2:]} a slice, the volume {hu.shape[1:]}")
        bins = np.digitize(hu, HU_EDGES)
        count = len(HU_EDGES) + 1
        share = np.zeros((LEVELS, count, *hu.shape[1:]), np.float32)
        for lv, where in enumerate(levels(len(hu))[None] == np.arange(LEVELS)[:, None]):
            if where.any():
                share[lv] = (bins[where][None] == np.arange(count)[:, None, None, None]).mean(1)
        inside = np.einsum("rlhw,lbhw->rlb", self.weights, share)
        return (inside / (self.weights.sum((2, 3))[..., None] + 1e-6)).ravel()


def cohort_prior(folder: Path, patients: int, size: int, slice_spacing: float, cache: Path | None, log) -> AnatomyPrior:
    """The prior from the label maps of the first `patients` patients of a cohort folder, drawn again (the cohort
    keeps their findings, not their maps; a patient is a function of the cohort seed and his index)."""
    from .cohort import generate_patient, template

    names = [m.groups() for e in read_index(folder) if (m := COHORT_NAME.match(e["name"]))][:patients]
    if not names:
        raise CTFlowError(f"{folder} holds no patient of `ctflow-train cohort`: its anatomy cannot be drawn again")
    maps = []
    for seed, index in names:
        maps.append(generate_patient(int(seed), int(index), size, slice_spacing, cache).labels)
        log(f"anatomy prior: patient {len(maps)}/{len(names)}")
    return AnatomyPrior.from_label_maps(maps, template(size, cache).anatomy.names)


def read_or_make_prior(path: Path, cohort: Path | None, patients: int, config: ModelConfig, ct_cache: Path | None,
                       log) -> AnatomyPrior:
    """The prior in `path`, or made from the cohort's first patients in the model's grid and written there."""
    if path.is_file():
        return AnatomyPrior.load(path)
    if cohort is None:
        raise CTFlowError(f"{path} does not exist: give the cohort (--data) to make the anatomy prior from")
    prior = cohort_prior(cohort, patients, config.autoencoder.image_size, config.geometry.spacing[2], ct_cache, log)
    prior.save(path)
    return prior


@dataclasses.dataclass
class Features:
    """What the detectors read of one volume."""

    latent: np.ndarray  # grid_features of its latents
    hu: np.ndarray  # AnatomyPrior.features of its decoded HU
    pooled: np.ndarray | None = None  # its pooled decoded HU, for a generated volume (see `place_changes`)

    def view(self, kind: str, target: str) -> np.ndarray:
        if kind == "hu":
            return self.hu  # the regions are on one side already
        return mirrored_difference(self.latent) if target == "side" else self.latent


class FeatureCache:
    """Latent grid and pooled decoded HU of volumes, one .npz a volume under a key, so a rerun (more seeds, another
    prior) encodes and decodes nothing twice. Without a folder it keeps nothing."""

    def __init__(self, folder: Path | None, prior: AnatomyPrior) -> None:
        self.folder, self.prior = folder, prior
        if folder:
            folder.mkdir(parents=True, exist_ok=True)

    def get(self, key: str, make, keep_hu: bool = False) -> Features:
        """`make()` -> (latent grid, pooled HU), called only when `key` is not stored; `keep_hu`: Features.pooled."""
        path = self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz" if self.folder else None
        if path and path.is_file():
            with np.load(path) as stored:
                latent, hu = stored["latent"], stored["hu"]
        else:
            latent, hu = make()
            if path:
                def write(tmp: Path) -> None:
                    with open(tmp, "wb") as f:
                        np.savez(f, latent=latent, hu=hu)

                atomic_write(path, write, overwrite=True)
        return Features(latent, self.prior.features(hu), hu if keep_hu else None)


SIDE_REGIONS = {side: tuple(LOBES[label] for label in labels) for side, labels in SIDES.items()}
LOBE_REGIONS = {name: (name,) for name in LOBES.values()}
PLACES = {"side": SIDE_REGIONS, "lobe": LOBE_REGIONS}  # target -> the places "... (change)" chooses among
CHANGE_SLICES = 4 * LEVELS  # both volumes of a pair, resampled along the body to as many slices


def place_changes(prior: AnatomyPrior, asked: np.ndarray, negated: np.ndarray,
                  places: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """For each of `places` (name -> prior regions), how much a volume differs from its pair's there (same seed, the
    finding negated): mean |HU change| weighted by the prior. Needs no detector, so it cannot be blind where the
    probes are; but where the report changed the whole anatomy, that change is read as well."""
    def along_body(hu: np.ndarray) -> np.ndarray:
        return hu[((np.arange(CHANGE_SLICES) + 0.5) * len(hu) / CHANGE_SLICES).astype(int)].astype(np.float32)

    change = np.abs(along_body(asked) - along_body(negated))  # [CHANGE_SLICES, h, w]
    weights = np.repeat(prior.weights, CHANGE_SLICES // LEVELS, axis=1)  # [R, CHANGE_SLICES, h, w]
    return {name: float(sum((weights[prior.regions.index(r)] * change).sum() for r in regions) /
                        (sum(weights[prior.regions.index(r)].sum() for r in regions) + 1e-6))
            for name, regions in places.items()}


def relative_place(change: dict[str, float], usual: dict[str, float]) -> str:
    """The place whose change (place_changes) is largest over its usual change; one that usually does not change
    at all wins with any change."""
    return max(change, key=lambda name: change[name] / (usual[name] + 1e-6))


# ---------------------------------------------------------------- probes


@dataclasses.dataclass
class Probe:
    """Logistic regression on standardised features."""

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float

    def probability(self, features: np.ndarray) -> np.ndarray:
        z = ((features - self.mean) / self.scale) @ self.weight + self.bias
        return 1 / (1 + np.exp(-np.clip(z, -60, 60)))


def fit_probe(x: np.ndarray, y: np.ndarray, l2: float = 1.0, scale: np.ndarray | None = None) -> Probe:
    """Penalised maximum likelihood (L-BFGS); strong L2 because features outnumber patients. One class only: a
    constant probe. The features are standardised by their own spread unless `scale` is given."""
    mean, scale = x.mean(0), x.std(0) + 1e-6 if scale is None else scale
    if y.all() or not y.any():
        return Probe(mean, scale, np.zeros(x.shape[1]), 30.0 if y.all() else -30.0)
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


@dataclasses.dataclass
class Classifier:
    """Two classes: one probe for the second. More: one probe per class against the rest, normalised."""

    classes: tuple
    probes: list[Probe]

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """[n, len(classes)]"""
        if len(self.classes) == 2:
            p = self.probes[0].probability(x)
            return np.stack([1 - p, p], -1)
        p = np.stack([probe.probability(x) for probe in self.probes], -1) + 1e-12
        return p / p.sum(-1, keepdims=True)

    def predict(self, x: np.ndarray) -> list:
        return [self.classes[k] for k in self.probabilities(x).argmax(-1)]


def fit_classifier(x: np.ndarray, y: np.ndarray, classes: tuple) -> Classifier:
    targets = classes[1:] if len(classes) == 2 else classes
    return Classifier(classes, [fit_probe(x, y == c) for c in targets])


def folds_of(groups: list[str]) -> np.ndarray:
    """The fold of each volume: whole groups (a patient and his twins), so a twin never tests its pair."""
    fold_of = {name: number % FOLDS for number, name in enumerate(sorted(set(groups)))}
    return np.array([fold_of[g] for g in groups])


def cross_validated_probabilities(x: np.ndarray, y: np.ndarray, groups: list[str],
                                  classes: tuple = (False, True)) -> np.ndarray:
    """[n, len(classes)]: each volume read by the classifier fitted on the other folds."""
    folds = folds_of(groups)
    probabilities = np.zeros((len(y), len(classes)))
    for fold in range(FOLDS):
        test = folds == fold
        if test.any():
            probabilities[test] = fit_classifier(x[~test], y[~test], classes).probabilities(x[test])
    return probabilities


def fit_pair_probe(x: np.ndarray, pairs: list[tuple[int, int]]) -> Probe:
    """The probability that the first volume of a pair shows more of the finding than the second, from the
    difference of their features: fitted on (with, without) pairs and the same pairs reversed, so it is 0.5 for
    two equal volumes. Scaled by each feature's spread over all volumes, not over the pairs' differences: a feature
    twins share (the anatomy they are drawn from) would otherwise weigh most, and two generated volumes differ in
    it."""
    differences = np.stack([x[i] - x[j] for i, j in pairs])
    probe = fit_probe(np.concatenate([differences, -differences]), np.repeat([True, False], len(pairs)),
                      scale=x.std(0) + 1e-6)
    # Both ways round, the differences' mean and the bias are zero but for rounding: made exactly so, or two equal
    # volumes (a report drawn as another, pipeline.drawn_report) read a hair over or under 0.5 by chance.
    return dataclasses.replace(probe, mean=np.zeros_like(probe.mean), bias=0.0)


def cross_validated_pairs(x: np.ndarray, pairs: list[tuple[int, int]], groups: list[str]) -> np.ndarray:
    """[len(pairs)]: each (with, without) pair read by the pair probe fitted on the other folds' pairs."""
    folds = folds_of(groups)[[i for i, _ in pairs]]
    read = np.zeros(len(pairs))
    for fold in range(FOLDS):
        test = folds == fold
        if test.any() and not test.all():
            probe = fit_pair_probe(x, [p for p, t in zip(pairs, test) if not t])
            read[test] = probe.probability(np.stack([x[i] - x[j] for (i, j), t in zip(pairs, test) if t]))
    return read


def accuracy(probabilities: np.ndarray, y: np.ndarray, classes: tuple) -> float:
    """The share of volumes whose likeliest class is their own."""
    predicted = np.array([classes[k] for k in probabilities.argmax(-1)], dtype=y.dtype)
    return float((predicted == y).mean())


def twin_pairs(labels: list[dict], groups: list[str], finding: str) -> list[tuple[int, int]]:
    """(with, without) the finding: two volumes of one patient (a cohort patient and a twin of his) whose other
    findings a report describes alike: present or not, side, lobe. Their sizes and places may differ: the cohort
    draws them again around the flipped finding, as a model draws the rest again for another report."""
    def rest(n: int) -> str:
        return repr(sorted((name, bool(params["present"]), side(params), lobe(params))
                           for name, params in labels[n].items() if name != finding))

    with_it, without = {}, {}  # (patient, the other findings) -> volumes
    for n, findings in enumerate(labels):
        (with_it if findings[finding]["present"] else without).setdefault((groups[n], rest(n)), []).append(n)
    return [(i, j) for key, volumes in with_it.items() for i in volumes for j in without.get(key, [])]


def side(params: dict) -> str | None:
    """'right' or 'left' for a finding on one side (its side, or its lobe's); None when absent or on both."""
    if not params["present"]:
        return None
    where = params.get("side") or params.get("lobe", "").split(" ")[0]
    return where if where in SIDES else None


def lobe(params: dict) -> str | None:
    """The lobe a present finding lies in, as a report names it; None when it has none."""
    return params.get("lobe") if params["present"] else None


TARGETS = {"present": lambda p: bool(p["present"]), "side": side, "lobe": lobe}  # None: not a case of that target


@dataclasses.dataclass
class DetectorScore:
    """Cross-validated accuracy of both detectors of one finding and target."""

    finding: str
    target: str  # "present", "side" or "lobe"
    classes: list
    volumes: int  # volumes with a label for the target (for side and lobe: those with the finding there)
    patients: int
    chance: float  # accuracy of always guessing the commonest class: what a detector must beat
    latent: float  # cross-validated accuracy of the latent probe
    hu: float  # ... of the probe on decoded HU in the anatomy prior's regions
    used: str = ""  # the better of the two, which reads the generated volumes
    twin_pairs: int = 0  # the cohort's pairs of volumes that differ only in the finding (twin_pairs; side, lobe:
    # those with the finding at one place, counted where the volumes' pooled HU are at hand)
    twins_raised: int = 0  # present: ... in which the used detector, cross-validated, reads the one with it higher:
    # what "asking raised the probability" can reach for a model that draws the finding as the cohort does
    twins_placed: int = 0  # side, lobe: ... whose largest change lies at the finding's place (placed_by_change)
    paired_latent: int = 0  # ... read right by the pair probe on the latent grid, cross-validated
    paired_hu: int = 0  # ... on the HU in the anatomy prior
    paired_used: str = ""  # the pair probe that reads the generated pairs ("" without twin pairs)

    def __post_init__(self) -> None:
        self.used = self.used or ("hu" if self.hu > self.latent else "latent")


@dataclasses.dataclass
class Detector:
    score: DetectorScore
    classifier: Classifier
    pair_probe: Probe | None = None  # present: fit_pair_probe on the twins, in the view score.paired_used

    def probabilities(self, features: list[Features]) -> np.ndarray:
        x = np.stack([f.view(self.score.used, self.score.target) for f in features])
        return self.classifier.probabilities(x)

    def pair_probabilities(self, first: list[Features], second: list[Features]) -> list[float] | None:
        """Per pair: the probability that the first volume shows more of the finding than the second."""
        if self.pair_probe is None:
            return None
        kind = self.score.paired_used
        return self.pair_probe.probability(np.stack([a.view(kind, "present") - b.view(kind, "present")
                                                     for a, b in zip(first, second, strict=True)])).tolist()


def placed_by_change(prior: AnatomyPrior, features: list[Features], pairs: list[tuple[int, int]],
                     places: dict[str, tuple[str, ...]], expected: list[str]) -> int:
    """Of the (with, without) pairs, those whose largest change (place_changes) lies at the expected place: on the
    cohort's real twins, what "side (change)" and "lobe (change)" can read of a model that draws a finding as the
    cohort does, through the same registration-free prior."""
    def largest(i: int, j: int) -> str:
        change = place_changes(prior, features[i].pooled, features[j].pooled, places)
        return max(change, key=change.get)

    return sum(largest(i, j) == where for (i, j), where in zip(pairs, expected, strict=True))


def calibrate(features: list[Features], labels: list[dict], groups: list[str], log=lambda line: None,
              prior: AnatomyPrior | None = None):
    """Detectors of every studied finding and target the labels allow (each class seen in MIN_CLASS volumes),
    fitted on every volume; and what was left out, and why. With the `prior` and the volumes' pooled HU, the side's
    and lobe's ceiling by change on the real twins (placed_by_change) too."""
    detectors: dict[tuple[str, str], Detector] = {}
    skipped: dict[str, str] = {}
    for finding in STUDIED:
        for target, read in TARGETS.items():
            values = [read(findings[finding]) for findings in labels]
            y = np.array([v for v in values if v is not None])
            classes = tuple(sorted(c for c in set(y.tolist()) if (y == c).sum() >= MIN_CLASS))
            if len(classes) < 2:
                if target == "present" or len(set(y.tolist())) > 0:
                    skipped[f"{finding} {target}"] = f"fewer than {MIN_CLASS} volumes in each of two classes"
                continue
            keep = np.array([v is not None and v in classes for v in values])
            y = np.array([v for v, k in zip(values, keep) if k])
            kept = [f for f, k in zip(features, keep) if k]
            kept_groups = [g for g, k in zip(groups, keep) if k]
            views = {kind: np.stack([f.view(kind, target) for f in kept]) for kind in KINDS}
            held_out = {kind: cross_validated_probabilities(views[kind], y, kept_groups, classes) for kind in KINDS}
            counts = [(y == c).sum() for c in classes]
            score = DetectorScore(finding, target, list(classes), len(y), len(set(kept_groups)),
                                  round(max(counts) / len(y), 3), round(accuracy(held_out["latent"], y, classes), 3),
                                  round(accuracy(held_out["hu"], y, classes), 3))
            twins, pair_probe = "", None
            pairs = twin_pairs(labels, groups, finding) if target == "present" else []  # present keeps every volume
            if pairs:
                held = held_out[score.used][:, 1]
                score.twin_pairs, score.twins_raised = len(pairs), sum(int(held[i] > held[j]) for i, j in pairs)
                score.paired_latent, score.paired_hu = (int((cross_validated_pairs(views[kind], pairs, kept_groups) > 0.5)
                                                            .sum()) for kind in KINDS)
                score.paired_used = "hu" if score.paired_hu >= score.paired_latent else "latent"
                pair_probe = fit_pair_probe(views[score.paired_used], pairs)
                twins = (f", real twins: the one with it read higher in {score.twins_raised}/{score.twin_pairs}, "
                         f"by the pair probes latent {score.paired_latent}, HU {score.paired_hu}")
            elif target in PLACES and prior is not None and all(f.pooled is not None for f in features):
                placed = [(i, j) for i, j in twin_pairs(labels, groups, finding) if read(labels[i][finding])]
                expected = [read(labels[i][finding]) for i, _ in placed]
                score.twin_pairs = len(placed)
                score.twins_placed = placed_by_change(prior, features, placed, PLACES[target], expected)
                twins = f", real twins placed by change {score.twins_placed}/{score.twin_pairs}"
            detectors[finding, target] = Detector(score, fit_classifier(views[score.used], y, classes), pair_probe)
            log(f"detector {finding} {target}: latent {score.latent}, HU {score.hu}, chance {score.chance}{twins}")
    return detectors, skipped


# ---------------------------------------------------------------- the result


@dataclasses.dataclass
class Response:
    """One finding, one pair of reports: the detector's probability that it is there, per seed."""

    report_set: str  # "writer" (reports.py) or "heldout" (heldout_reports.json)
    case: str  # writer: the finding; held out: the case's name
    finding: str
    asked: list[float]  # report describing the finding
    negated: list[float]  # writer: the normal report; held out: the case's counterpart
    ranked_first: int | None = None  # writer: seeds whose own report gave the finding's probability the highest
    paired: list[float] | None = None  # the pair probe: probability that `asked` shows more of it than `negated`
    negated_over_normal: list[float] | None = None  # held out: ... that `negated` shows more than the normal report
    paired_first: int | None = None  # writer: seeds whose own report the pair probe read highest over the normal one
    # held out: the median, over the other held-out cases' negations (reports of no finding, in other words than the
    # writer's), of the pair probe's probability that one shows more of it than the normal report: what rewording
    # alone does, against which `negated_over_normal` is read
    reworded_over_normal: list[float] | None = None
    # held out, per seed: the pair probe's probability that each other held-out case's report (of another finding)
    # that negates this finding shows more of it than the normal report ("No pleural fluid." in a report of a nodule:
    # the goal's negation half inside a report of another finding); and the same of those that do not name it, which
    # the other finding's own words raise (the probes are not specific), against which the first is read
    negated_elsewhere_over_normal: list[list[float]] | None = None
    unnamed_elsewhere_over_normal: list[list[float]] | None = None

    @property
    def shown_when_asked(self) -> int:
        return sum(p > 0.5 for p in self.asked)

    @property
    def shown_when_negated(self) -> int:
        return sum(p > 0.5 for p in self.negated)

    @property
    def raised(self) -> int:
        return sum(a > n for a, n in zip(self.asked, self.negated))

    @property
    def raised_paired(self) -> int | None:
        return None if self.paired is None else sum(p > 0.5 for p in self.paired)

    @property
    def negated_above_normal(self) -> int | None:
        return None if self.negated_over_normal is None else sum(p > 0.5 for p in self.negated_over_normal)

    @property
    def reworded_above_normal(self) -> int | None:
        return None if self.reworded_over_normal is None else sum(p > 0.5 for p in self.reworded_over_normal)

    @property
    def negated_elsewhere_above_normal(self) -> str:
        return _share_over(self.negated_elsewhere_over_normal)

    @property
    def unnamed_elsewhere_above_normal(self) -> str:
        return _share_over(self.unnamed_elsewhere_over_normal)


def _share_over(per_seed: list[list[float]] | None) -> str:
    """'k/n (m reports, mean p)': of n readings (m reports x the seeds), k read over the normal report; their mean
    probability says by how much (a weak probe reads a real change barely over 0.5)."""
    if not per_seed or not per_seed[0]:
        return ""
    readings, reports = [p for seed in per_seed for p in seed], len(per_seed[0])
    return (f"{sum(p > 0.5 for p in readings)}/{len(readings)} ({reports} report{'s' * (reports != 1)}, "
            f"mean {np.mean(readings):.2f})")


@dataclasses.dataclass
class Placement:
    """Where a located report's volumes show the finding, per seed."""

    report_set: str
    case: str
    finding: str
    target: str  # "side" or "lobe"
    expected: str
    predicted: list[str]
    chance: float  # 1 / the detector's classes

    @property
    def hits(self) -> int:
        return sum(p == self.expected for p in self.predicted)


PER_SEED_RESPONSE = ("asked", "negated", "ranked_first", "paired", "negated_over_normal", "paired_first",
                     "reworded_over_normal", "negated_elsewhere_over_normal", "unnamed_elsewhere_over_normal")


def without(rows: list, fields: tuple[str, ...]) -> list[dict]:
    """The rows (responses or placements) as dicts without their per-seed fields: what a study's seeds share."""
    return [{k: v for k, v in dataclasses.asdict(row).items() if k not in fields} for row in rows]


@dataclasses.dataclass
class FindingStudy:
    model: str
    seeds: int
    seed: int
    steps: int
    guidance: float
    training: str  # what the detectors were fitted on
    anatomy: str  # how the HU detectors' regions were made
    detectors: list[DetectorScore]
    skipped: dict[str, str]  # detector -> why it was not fitted
    responses: list[Response]
    placements: list[Placement]
    reports: dict[str, str]  # every generated report: "writer/<name>" or "heldout/<case>[/negated]" -> text
    kind: str = "finding-study"
    side_guidance: float = 0.0  # as asked; applied to the reports that name a side (older studies: none)
    finding_guidance: float = 0.0  # as asked; applied to the reports that report a finding (older studies: none)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1) + "\n"

    @staticmethod
    def is_one(data: dict) -> bool:
        """Whether a JSON object is a finding study (an --evaluation file may hold other figures)."""
        return data.get("kind") == "finding-study"

    @classmethod
    def from_json(cls, text: str) -> "FindingStudy":
        data = json.loads(text)
        if not cls.is_one(data):
            raise CTFlowError("not the JSON of `ctflow-train finding-study`")
        return cls(**{**data, "detectors": [DetectorScore(**d) for d in data["detectors"]],
                      "responses": [Response(**r) for r in data["responses"]],
                      "placements": [Placement(**p) for p in data["placements"]]})

    @classmethod
    def combined(cls, studies: list["FindingStudy"]) -> "FindingStudy":
        """One study of studies of consecutive seeds that differ in nothing else (a study split over lanes, machines
        or days): per-seed figures concatenated, so every table reads as if the seeds had been run at once."""
        studies = sorted(studies, key=lambda s: s.seed)
        first = studies[0]
        same = ("model", "steps", "guidance", "side_guidance", "finding_guidance", "training", "anatomy", "detectors",
                "skipped", "reports")
        for before, study in zip(studies, studies[1:]):
            if study.seed != before.seed + before.seeds:
                raise CTFlowError(f"seeds {before.seed}-{before.seed + before.seeds - 1} and {study.seed}-"
                                  f"{study.seed + study.seeds - 1} are not consecutive (missing or overlapping)")
        for study in studies[1:]:
            differing = [name for name in same if getattr(study, name) != getattr(first, name)]
            differing += [name for name, per_seed in (("responses", PER_SEED_RESPONSE), ("placements", ("predicted",)))
                          if without(getattr(study, name), per_seed) != without(getattr(first, name), per_seed)]
            if differing:
                raise CTFlowError(f"the study of seed {study.seed} differs from that of seed {first.seed} in "
                                  f"{', '.join(differing)}: only studies that differ in their seeds combine")

        def total(group: tuple, field: str):
            return None if getattr(group[0], field) is None else sum((getattr(r, field) for r in group[1:]),
                                                                     getattr(group[0], field))

        responses = [dataclasses.replace(group[0], **{f: total(group, f) for f in PER_SEED_RESPONSE})
                     for group in zip(*(s.responses for s in studies))]
        placements = [dataclasses.replace(group[0], predicted=total(group, "predicted"))
                      for group in zip(*(s.placements for s in studies))]
        return dataclasses.replace(first, seeds=sum(s.seeds for s in studies), responses=responses,
                                   placements=placements)

    def both_sides(self) -> list[tuple[str, str, str, int]]:
        """Per writer finding with a right and a left report, per pair of them and per side reader: in how many
        seeds both reports land on their own side. A model that ignores the side puts the finding in one place for
        both, so one of the two is right at every seed and this is 0 (at random 1/4 of seeds); it also cannot be met
        by a reader's bias towards one side, which the per-report counts can. The pairs: the first patients' reports
        (which may differ in more than the side) and each of them with its mirror (the side alone)."""
        by_case = {(p.case, p.target): p for p in self.placements if p.report_set == "writer"}
        pairs = ((None, None, "the first patients' reports"), (None, "right", "the right one and its mirror"),
                 ("left", None, "the left one and its mirror"))
        rows = []
        for finding, target in dict.fromkeys((p.finding, p.target) for p in by_case.values()
                                             if p.target.startswith("side")):
            for right_of, left_of, label in pairs:
                right = by_case.get((sided_case(finding, "right", right_of), target))
                left = by_case.get((sided_case(finding, "left", left_of), target))
                if right and left:
                    rows.append((finding, label, target, sum(a == "right" and b == "left"
                                                             for a, b in zip(right.predicted, left.predicted))))
        return rows

    def detector(self, finding: str, target: str) -> DetectorScore | None:
        return next((d for d in self.detectors if (d.finding, d.target) == (finding, target)), None)

    def markdown(self) -> str:
        n = self.seeds
        side = f", side guidance {self.side_guidance:g}" if self.side_guidance else ""
        side += f", finding guidance {self.finding_guidance:g}" if self.finding_guidance else ""
        lines = [f"{n} seed(s) per report, {self.steps} sampling steps, guidance {self.guidance}{side}; "
                 f"model {self.model}.",
                 f"Detectors fitted on {self.training}; HU regions: {self.anatomy}.", "",
                 "| finding | target | volumes (patients) | always the commonest | latent probe | HU in anatomy prior | used "
                 "| real twins: the one with it read higher (side, lobe: the place that changed most) "
                 "| ... by the pair probes: latent, HU (used) |",
                 "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {d.finding} | {d.target} | {d.volumes} ({d.patients}) | {d.chance} | {d.latent} | {d.hu} | {d.used} "
                  f"| {f'{d.twins_placed if d.target in PLACES else d.twins_raised}/{d.twin_pairs}' if d.twin_pairs else ''} "
                  f"| {f'{d.paired_latent}, {d.paired_hu} ({d.paired_used})' if d.paired_used else ''} |"
                  for d in self.detectors]
        lines += [f"- not fitted: {name} ({why})" for name, why in self.skipped.items()]
        lines += ["", "| report set | case | present detector (always the commonest) | shown when asked | shown when negated | asking raised "
                  "the probability | own report ranked first | mean probability asked / negated | the pair probe: "
                  "asked over negated | ... own report ranked first | ... negated over the normal report | ... the other "
                  "held-out negations over it (median) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]

        def out_of(count: int | None) -> str:
            return "" if count is None else f"{count}/{n}"

        for r in self.responses:
            d = self.detector(r.finding, "present")
            lines.append(f"| {r.report_set} | {r.case} | {d.used} {max(d.latent, d.hu)} ({d.chance}) | "
                         f"{r.shown_when_asked}/{n} | "
                         f"{r.shown_when_negated}/{n} | {r.raised}/{n} | {out_of(r.ranked_first)} | "
                         f"{np.mean(r.asked):.3f} / {np.mean(r.negated):.3f} | {out_of(r.raised_paired)} | "
                         f"{out_of(r.paired_first)} | {out_of(r.negated_above_normal)} | "
                         f"{out_of(r.reworded_above_normal)} |")
        elsewhere: dict[str, Response] = {}  # a finding's first held-out case: its others are the same reports
        for r in self.responses:
            if r.negated_elsewhere_above_normal:
                elsewhere.setdefault(r.finding, r)
        if elsewhere:
            lines += ["", "| finding | negated in a held-out report of another finding: read over the normal report by "
                      "the pair probe (readings: reports x seeds) | in those of another finding that do not name it |",
                      "|---|---|---|"]
            lines += [f"| {finding} | {r.negated_elsewhere_above_normal} | {r.unnamed_elsewhere_above_normal} |"
                      for finding, r in elsewhere.items()]
        lines += ["", "| report set | case | where | expected | detector | at the expected place | chance |",
                  "|---|---|---|---|---|---|---|"]
        for p in self.placements:
            d = self.detector(p.finding, p.target)
            relative = " over its usual" if p.target == "side (relative change)" else ""
            reader = f"{d.used} {max(d.latent, d.hu)}" if d else f"largest change against the pair{relative}"
            lines.append(f"| {p.report_set} | {p.case} | {p.target} | {p.expected} | {reader} | {p.hits}/{n} | "
                         f"{p.chance:.2f} |")
        paired = self.both_sides()
        if paired:
            lines += ["", "| finding | reports | where | the right report on the right and the left one on the left, "
                      "same seed (a model blind to the side: 0; at random: a quarter) |", "|---|---|---|---|"]
            lines += [f"| {finding} | {label} | {target} | {both}/{n} |" for finding, label, target, both in paired]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- reports


@dataclasses.dataclass(frozen=True)
class Located:
    """A report that puts its finding somewhere: the side, and the lobe where it names one; and its pair."""

    name: str
    finding: str
    text: str
    side: str | None
    lobe: str | None
    negated: str  # the same report with the finding negated (writer: the normal report)


def writer_reports(data: Path, seed: int, studied: tuple[str, ...]) -> tuple[dict[str, str], list[Located]]:
    """'normal' (every finding negated) and, per finding of `studied`, a report describing that finding alone (its
    parameters from the first cohort patient with it, on one side where it takes one); and per finding that can lie
    on either side, its report with it on the right and on the left (from the first patient with it there), and each
    of those mirrored to the other side. The first patients' two may differ in more than the side (a 7 mm nodule on
    the right, 20 mm on the left); a report and its mirror differ in the side alone."""
    absent = {"present": False}
    labels = [json.loads((data / entry["labels"]).read_text(encoding="utf-8"))["findings"]
              for entry in read_index(data)]
    normal = {name: absent for name in labels[0]}

    def written(finding: str, params: dict) -> str:
        return compose_report({**normal, finding: params}, np.random.default_rng(seed)).text

    def describing(finding: str, wanted) -> tuple[str, dict] | None:
        params = next((findings[finding] for findings in labels if wanted(findings[finding])), None)
        return None if params is None else (written(finding, params), params)

    reports = {"normal": normal_report(seed).text}
    located = []
    for finding in studied:
        sided = {where: describing(finding, lambda p, where=where: side(p) == where) for where in SIDES}
        described = next((d for d in sided.values() if d), None) or describing(finding, lambda p: p["present"])
        if described is None:
            raise CTFlowError(f"no patient in {data} has {finding}: its report cannot be written")
        reports[finding] = described[0]
        located += [Located(sided_case(finding, where), finding, text, where, lobe(params), reports["normal"])
                    for where, (text, params) in ((w, d) for w, d in sided.items() if d)]
        for where, other in zip(SIDES, reversed(SIDES)):
            if sided[where]:
                text, params = sided[where][0], mirrored(sided[where][1])
                mirror = written(finding, params)
                if mirror not in (text, (sided[other] or ("",))[0]):  # words that name a side, not the other's
                    located.append(Located(sided_case(finding, other, where), finding, mirror, other,
                                           lobe(params), reports["normal"]))
    return reports, located


def sided_case(finding: str, where: str, mirror_of: str | None = None) -> str:
    """The name of a writer's report of a finding on one side: the first patient's there, or the mirror of the one
    on the side `mirror_of`."""
    return f"{finding} {where}" + (f" (mirror of {mirror_of})" if mirror_of else "")


def heldout_located(cases: list[HeldOutCase]) -> list[Located]:
    return [Located(c.name, c.finding, c.report, c.side, c.lobe, c.negated) for c in cases if c.side or c.lobe]


# ---------------------------------------------------------------- the study


def weights_hash(folder: Path) -> str:
    """One hash of the weights under a folder (a model folder: denoiser, autoencoder and a text encoder it ships; its
    vae/: the autoencoder alone): a feature cache key. Not the lobe prior: a volume's key states it where it acts
    (volume_key), so a model copied with one (`lobe-prior`) shares every other volume with the model it was copied
    from."""
    return hashlib.sha256(" ".join(sha256_file(p) for p in sorted(folder.rglob("*.safetensors"))
                                   if p.relative_to(folder).as_posix() != LOBE_FILE).encode()).hexdigest()


def training_set(pipe: CTFlowPipeline, folders: list[Path], stores: list[Path], cache: FeatureCache, autoencoder: str,
                 log):
    """Features, findings (label files) and patient of every volume of the latent stores, refused unless encoded by
    the model's autoencoder; the HU are the store's latents decoded by the model's decoder, the latents those HU
    encoded again, as a generated volume's are. Cached under the
    autoencoder's weights (`autoencoder`), so models that share it (a denoiser trained on) decode them once."""
    start = pipe.autoencoder.constant_latent(START_HU).cpu()
    features, labels, groups = [], [], []
    for folder, path in zip(folders, stores, strict=True):
        store = LatentStore(path)
        if not same_encoding(store.start, start):
            raise CTFlowError(f"{path} was not encoded by the model's autoencoder: probes trained on it would not "
                              "read the model's volumes")
        index = {entry["name"]: entry for entry in read_index(folder)}
        for number, name in enumerate(store.meta["names"]):
            def make(number=number):
                latents = store.window(number, 0, store.meta["content_slices"][number])[::EVERY].float()
                with torch.no_grad():
                    hu = pipe.autoencoder.decode(latents.to(pipe.device))
                    again = pipe.autoencoder.encode(hu)  # as a generated volume's latents are read (volume_features)
                return grid_features(again.cpu()), pooled(hu.cpu().numpy())

            features.append(cache.get(training_feature_key(autoencoder, store, number), make, keep_hu=True))
            labels.append(json.loads((folder / index[name]["labels"]).read_text(encoding="utf-8"))["findings"])
            groups.append(patient_of(name))
            if len(features) % 20 == 0:
                log(f"training volumes: {len(features)}")
    return features, labels, groups


def check_labelled(folders: list[Path], stores: list[Path]) -> None:
    """Before the model loads: each store's volumes have finding labels in the prepared folder given with it (a
    cohort's; CT-RATE's have none), so --data and --latents were given in the same order."""
    for folder, path in zip(folders, stores, strict=True):
        index = {entry["name"]: entry for entry in read_index(folder)}
        unlabelled = [name for name in LatentStore(path).names if not index.get(name, {}).get("labels")]
        if unlabelled:
            raise CTFlowError(f"{folder} has no finding labels for {len(unlabelled)} volumes of {path} (e.g. "
                              f"{unlabelled[0]}): give each store's prepared cohort folder, in the same order")


def training_feature_key(autoencoder: str, store: LatentStore, number: int) -> str:
    """A training volume's features hold for the same decoder and the same latents: its name alone would not tell
    apart a cohort made again."""
    return (f"store {autoencoder} {store.header.get('vae_sha256')} {store.names[number]} "
            f"{store.volume_sha256[number]} encoded again")


def volume_features(pipe: CTFlowPipeline, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A generated volume's latent grid (encoded by the model's VAE, as the cohort's volumes were) and pooled HU."""
    kept = hu[: max(1, real_slices(hu)) : EVERY]
    with torch.no_grad():
        latents = pipe.autoencoder.encode(torch.from_numpy(kept).to(pipe.device))
    return grid_features(latents.cpu()), pooled(kept.astype(np.float32))


def run_study(args: argparse.Namespace, log=lambda line: None) -> FindingStudy:
    set_threads(args.threads)
    if len(args.data) != len(args.latents):
        raise CTFlowError("give one --latents store per --data folder, in the same order")
    check_labelled(args.data, args.latents)
    cases = [c for c in load_heldout(args.heldout) if c.finding in args.findings]
    if args.heldout_per_finding:
        findings = [c.finding for c in cases]
        cases = [c for n, c in enumerate(cases) if findings[:n].count(c.finding) < args.heldout_per_finding]
    pipe = CTFlowPipeline.from_pretrained(args.model, device="cpu")
    prior = read_or_make_prior(args.prior, args.data[0], args.prior_patients, pipe.config, args.ct_cache, log)
    cache = FeatureCache(args.feature_cache, prior)
    model = f"{weights_hash(args.model)} {volume_config_hash(pipe.config)}"  # the config sets where volumes end
    features, labels, groups = training_set(pipe, args.data, args.latents, cache, weights_hash(args.model / VAE_FOLDER),
                                            log)
    detectors, skipped = calibrate(features, labels, groups, log, prior)
    studied = tuple(f for f in STUDIED if f in args.findings and (f, "present") in detectors)
    unseen = [f for f in STUDIED if f in args.findings and f not in studied]
    if unseen and set(args.findings) != set(STUDIED):  # asked by name, not by default
        raise CTFlowError(f"--findings {' '.join(unseen)}: the cohort's labels do not vary it enough for a detector")
    writer, writer_located = writer_reports(args.data[0], WORDING_SEED, studied)
    steps = args.steps or pipe.config.sampling.steps
    guidance = pipe.config.sampling.guidance if args.guidance is None else args.guidance
    side_guidance = pipe.config.sampling.side_guidance if args.side_guidance is None else args.side_guidance
    finding_guidance = (pipe.config.sampling.finding_guidance if args.finding_guidance is None
                        else args.finding_guidance)

    made: dict[str, list[Features]] = {}  # report text -> features per seed: a text is generated once

    def generate(text: str, seed: int):
        log(f"generating seed {seed}: {text[:70]!r}")
        volume, _ = generate_volume(pipe, text, seed, steps=steps, guidance=guidance, side_guidance=side_guidance,
                                    finding_guidance=finding_guidance)
        return volume_features(pipe, volume.hu)

    def generated(text: str) -> list[Features]:
        if text not in made:
            made[text] = [cache.get(volume_key(pipe, model, text, seed, steps, guidance, side_guidance,
                                               finding_guidance),
                                    lambda seed=seed: generate(text, seed), keep_hu=True)
                          for seed in range(args.seed, args.seed + args.seeds)]
        return made[text]

    def present(finding: str, text: str) -> list[float]:
        return detectors[finding, "present"].probabilities(generated(text))[:, 1].tolist()

    def more(finding: str, text: str, pair: str) -> list[float] | None:
        return detectors[finding, "present"].pair_probabilities(generated(text), generated(pair))

    def changes(text: str, pair: str, places: dict[str, tuple[str, ...]]) -> list[dict[str, float]]:
        """place_changes of each seed's pair of volumes."""
        return [place_changes(prior, a.pooled, b.pooled, places) for a, b in zip(generated(text), generated(pair))]

    unsided = [changes(text, writer["normal"], SIDE_REGIONS) for kind, text in writer.items()
               if kind != "normal" and not names_one_side(text)]
    usual = [{side: float(np.median([c[seed][side] for c in unsided])) for side in SIDE_REGIONS}
             for seed in range(args.seeds)] if unsided else None  # each lung's usual change, per seed
    responses, placements, reports = [], [], {f"writer/{k}": v for k, v in writer.items()}
    for finding in studied:
        every = {kind: present(finding, text) for kind, text in writer.items()}
        first = sum(max(every, key=lambda kind: every[kind][s]) == finding for s in range(args.seeds))
        over_normal = {kind: more(finding, text, writer["normal"]) for kind, text in writer.items() if kind != "normal"}
        paired_first = None if over_normal[finding] is None else sum(
            max(over_normal, key=lambda kind: over_normal[kind][s]) == finding for s in range(args.seeds))
        responses.append(Response("writer", finding, finding, every[finding], every["normal"], first,
                                  over_normal[finding], paired_first=paired_first))

    def read_over_normal(finding: str, texts: list[str]) -> list[list[float]] | None:
        """Per seed, the pair probe's reading of each text over the normal report (None without texts or probe)."""
        readings = [more(finding, text, writer["normal"]) for text in texts]
        return None if not readings or None in readings else [list(seed) for seed in zip(*readings)]

    parsed_as = {finding.name: finding.parsed_as for finding in FINDINGS}
    heldout = [case for case in cases if case.finding in studied]
    for case in heldout:
        others = [other for other in heldout if other.finding != case.finding]
        reworded = [more(case.finding, other.negated, writer["normal"]) for other in others]
        named = {other.report: findings_named(other.report).get(parsed_as[case.finding]) for other in others}
        responses.append(Response("heldout", case.name, case.finding, present(case.finding, case.report),
                                  present(case.finding, case.negated),
                                  paired=more(case.finding, case.report, case.negated),
                                  negated_over_normal=more(case.finding, case.negated, writer["normal"]),
                                  reworded_over_normal=np.median(reworded, axis=0).tolist()
                                  if reworded and None not in reworded else None,
                                  negated_elsewhere_over_normal=read_over_normal(  # True, False (negated), None
                                      case.finding, [text for text, n in named.items() if n is False]),
                                  unnamed_elsewhere_over_normal=read_over_normal(
                                      case.finding, [text for text, n in named.items() if n is None])))
        reports[f"heldout/{case.name}"], reports[f"heldout/{case.name}/negated"] = case.report, case.negated
    for report_set, located in (("writer", writer_located), ("heldout", heldout_located(cases))):
        for where in located:
            for target, expected in (("side", where.side), ("lobe", where.lobe)):
                detector = detectors.get((where.finding, target))
                if expected and detector and expected in detector.classifier.classes:
                    predicted = detector.classifier.predict(np.stack([f.view(detector.score.used, target)
                                                                      for f in generated(where.text)]))
                    placements.append(Placement(report_set, where.name, where.finding, target, expected,
                                                [str(p) for p in predicted], 1 / len(detector.classifier.classes)))
            for target, expected, places in (("side (change)", where.side, SIDE_REGIONS),
                                             ("lobe (change)", where.lobe, LOBE_REGIONS)):
                if expected:
                    placements.append(Placement(report_set, where.name, where.finding, target, expected,
                                                [max(c, key=c.get) for c in changes(where.text, where.negated, places)],
                                                1 / len(places)))
            if where.side and usual:
                relative = [relative_place(c, usual[seed])
                            for seed, c in enumerate(changes(where.text, where.negated, SIDE_REGIONS))]
                placements.append(Placement(report_set, where.name, where.finding, "side (relative change)",
                                            where.side, relative, 1 / len(SIDE_REGIONS)))
            reports[f"{report_set}/{where.name}"] = where.text  # a held-out case read by its change alone too
            if report_set == "heldout":
                reports[f"heldout/{where.name}/negated"] = where.negated
    volumes = len(features)
    training = (f"{volumes} volumes of {len(set(groups))} patients ({', '.join(str(d) for d in args.data)}), "
                "cross-validated with each patient and his twins in one fold")
    anatomy = (f"the mean label maps of {prior.patients} cohort patients in the model's grid (levels by fraction of "
               "the real slices), no registration")
    return FindingStudy(str(args.model), args.seeds, args.seed, steps, guidance, training, anatomy,
                        [d.score for d in detectors.values()], skipped, responses, placements, reports,
                        side_guidance=side_guidance, finding_guidance=finding_guidance)


def volume_key(pipe: CTFlowPipeline, model: str, text: str, seed: int, steps: int, guidance: float,
               side_guidance: float, finding_guidance: float = 0.0) -> str:
    """The feature cache's key of a generated volume: what makes it. A report that names no side alone is made as
    without side guidance, so it keeps its volumes (and key); one that does states the halves it is guided by
    (report.half_reports), which the prompt is rendered from, and with a lobe prior what each lobe reads; for a
    denoiser that reads report.denoiser_code, the code of each row (of each block's, for a lobe_map one), which a
    change of how reports are read changes while the text stays. A report without findings is made as without
    finding guidance, so it keeps its volumes (and key); one with states the report it guides away from
    (report.without_findings) and how the guidance eases in (sampling.FINDING_ONSET). A report that reports no
    finding is keyed as the model's normal report it is drawn from (pipeline.drawn_report)."""
    given = parse_report(text)
    report = pipe.drawn_report(given)
    text = text if report == given else report.text  # a report of no finding: the model's normal report's volume
    right, left = half_reports(report)
    side = f" side halves {side_guidance} {right.text!r} {left.text!r}" if side_guidance and right != left else ""
    if side_guidance and pipe.lobe_prior:
        places = Places.of(report, lambda part: part.text, pipe.lobe_prior)
        if any(len(set(rows.values())) > 1 for rows in places.rows):  # the lobes of a half read different texts
            shares = pipe.lobe_prior.shares
            prior = hashlib.sha256(b"".join(shares[name].numpy().tobytes() for name in sorted(shares))).hexdigest()
            side += f" lobes {prior} {places.texts!r}"
    reference = without_findings(report)
    finding = (f" finding {finding_guidance} onset {FINDING_ONSET} {reference.text!r}"
               if finding_guidance and reference != report else "")
    key = f"generated {model} {steps} {guidance}{side}{finding} {seed} {text}"
    denoiser = pipe.config.denoiser
    if denoiser.reads_code:
        request = GenerationRequest(text, seed=seed, steps=steps, guidance=guidance, side_guidance=side_guidance,
                                    finding_guidance=finding_guidance)
        rows = pipe.plan(request).code_texts
        firsts = range(0, pipe.config.max_slices, denoiser.block_slices) if denoiser.lobe_map_slices else [0]
        key += " codes " + " ".join(str(denoiser_codes(rows, denoiser, first).int().tolist()) for first in firsts)
    return key


# The study's own settings: a volume's key states them as used.
KEYED_SAMPLING = ("steps", "guidance", "side_guidance", "finding_guidance")


def volume_config_hash(config: ModelConfig) -> str:
    """SHA-256 of the config as a model folder holds it, but for the sampling defaults a volume's key states as used
    (KEYED_SAMPLING; side guidance only for a report that names a side): models that differ in those defaults alone
    share volumes. The rest (where volumes end, the sampler, the time shift) makes the volume."""
    defaults = SamplingConfig()
    sampling = dataclasses.replace(config.sampling, **{name: getattr(defaults, name) for name in KEYED_SAMPLING})
    keyed = dataclasses.replace(config, sampling=sampling, normal_report="")  # volume_key states the report drawn
    return hashlib.sha256(keyed.to_json().encode()).hexdigest()


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--data", type=Path, nargs="+", required=True,
                        help="cohort folder(s) whose labels train the detectors (the first also gives the reports)")
    parser.add_argument("--latents", type=Path, nargs="+", required=True, help="the latent store of each --data folder")
    parser.add_argument("--prior", type=Path, required=True,
                        help="anatomy prior .npz: read, or made from the first --data cohort's patients and written")
    parser.add_argument("--prior-patients", type=positive(int), default=12, help="cohort patients the prior is made from")
    add_ct_cache_option(parser)
    parser.add_argument("--feature-cache", type=Path,
                        help="folder keeping each volume's features, so a rerun generates only what is new")
    parser.add_argument("--heldout", type=Path, default=HELDOUT, help="held-out report phrasings (JSON)")
    parser.add_argument("--findings", nargs="+", choices=STUDIED, default=list(STUDIED), metavar="FINDING",
                        help="study only these findings (default: every one the cohort's labels vary; the own "
                             f"report's rank is then among these findings' reports): {', '.join(STUDIED)}")
    parser.add_argument("--heldout-per-finding", type=count, default=0,
                        help="study only the first N held-out cases of each finding (0: all)")
    parser.add_argument("--seeds", type=positive(int), default=10, help="generations per report")
    parser.add_argument("--seed", type=seed, default=0)
    add_guidance_options(parser)
    add_threads_option(parser)
    parser.add_argument("--out", type=Path, required=True, help="JSON to write (and its tables beside it, .md)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out and its tables if they exist")


def run(args: argparse.Namespace) -> int:
    check_free(args.out, args.overwrite)
    return write_study(run_study(args, lambda line: print(line, file=sys.stderr, flush=True)), args.out)


def configure_combine(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("studies", type=Path, nargs="+", help="finding-study JSON files of consecutive seeds")
    parser.add_argument("--out", type=Path, required=True, help="JSON to write (and its tables beside it, .md)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out and its tables if they exist")


def run_combine(args: argparse.Namespace) -> int:
    check_free(args.out, args.overwrite)
    studies = []
    for path in args.studies:
        try:
            studies.append(FindingStudy.from_json(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as error:
            raise CTFlowError(f"{path}: cannot read a finding study ({error})") from error
        except CTFlowError as error:
            raise CTFlowError(f"{path}: {error}") from error
    return write_study(FindingStudy.combined(studies), args.out)


def check_free(out: Path, overwrite: bool) -> None:
    table = out.with_suffix(".md")
    if not overwrite and (out.exists() or table.exists()):
        raise CTFlowError(f"{out} or {table.name} exists: give another --out, or --overwrite")


def write_study(study: FindingStudy, out: Path) -> int:
    """The study's JSON and its tables beside it (.md), and the tables on stdout."""
    atomic_write(out, lambda tmp: tmp.write_text(study.to_json(), encoding="utf-8"), overwrite=True)
    atomic_write(out.with_suffix(".md"), lambda tmp: tmp.write_text(study.markdown(), encoding="utf-8"), overwrite=True)
    print(study.markdown())
    return 0
