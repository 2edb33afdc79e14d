"""Metrics over sets of volumes: 2.5D FID against real CTs, and text alignment of requested findings.

2.5D FID: feature vectors of axial, coronal and sagittal slices, one Fréchet distance per plane between
the real and the generated set, and their mean. The field's standard features come from
RadImageNet-ResNet50 (`load_resnet50`, weights as a safetensors file fetched on a connected machine).
Offline, no pretrained medical network exists, so the default is `RandomFeatures`: a convolutional
network with fixed random weights (the same on every machine). Its distances rank sets sensibly but
are only comparable with other numbers made with the same extractor, slice count and size.

Text alignment: for volumes made from reports whose findings are known (CT-RATE's labels, the training
cohort's), how often a detector finds each finding when the report asked for it vs when it negated it.
"""

from __future__ import annotations

import importlib
import math
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .batch import read_manifest
from .conventions import HU_WINDOW
from .errors import CTFlowError
from .io import read_json_object, read_volume
from .tables import ID_KEYS, read_table, row_id
from .volume import Volume

PLANES = ("axial", "coronal", "sagittal")
RADIMAGENET_MEAN = (0.406, 0.456, 0.485)  # Keras-trained RadImageNet: BGR means on [0, 1] input, no scaling
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MIN_SIZE, MAX_SIZE = 32, 1024  # slice size in pixels: ResNet-50 needs 32 to keep a feature map
MAX_SLICES_PER_AXIS = 256

Detector = Callable[[Volume], dict[str, float]]  # volume -> finding -> probability that it is present


# -- slices and features -----------------------------------------------------------------------------------------


def plane_slices(hu: np.ndarray, per_axis: int, size: int) -> dict[str, torch.Tensor]:
    """`per_axis` evenly spaced slices of each plane (the outer 10 % skipped), windowed to [0, 1] and resized
    to size x size: {plane: [n, 1, size, size]}."""
    low, high = HU_WINDOW
    volume = torch.from_numpy(np.clip((hu.astype(np.float32) - low) / (high - low), 0, 1))
    planes = {}
    for axis, plane in enumerate(PLANES):
        index = np.unique(np.round(np.linspace(0.1, 0.9, per_axis) * (hu.shape[axis] - 1)).astype(int))
        stack = volume.index_select(axis, torch.from_numpy(index)).movedim(axis, 0).unsqueeze(1)
        planes[plane] = F.interpolate(stack, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return planes


@torch.no_grad()
def set_features(
    volumes: Iterable[Volume | str | os.PathLike], extractor: nn.Module, per_axis: int = 16, size: int = 256,
    device: str | torch.device = "cpu", chunk: int = 32,
) -> dict[str, np.ndarray]:
    """{plane: [slices of all volumes, features]} for a set of volumes or volume files."""
    extractor = extractor.to(device).eval()
    features: dict[str, list[np.ndarray]] = {plane: [] for plane in PLANES}
    for item in volumes:
        volume = (item if isinstance(item, Volume) else read_volume(item)).head_first()  # one orientation for all
        for plane, images in plane_slices(volume.hu, per_axis, size).items():
            for part in images.split(chunk):
                features[plane].append(extractor(part.to(device)).float().cpu().numpy())
    if not features["axial"]:
        raise CTFlowError("no volumes to compute features of")
    return {plane: np.concatenate(parts).astype(np.float64) for plane, parts in features.items()}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [n, d] (n >= 2 each).

    tr sqrt(Ca Cb) is taken as the sum of square roots of the eigenvalues of sqrt(Ca) Cb sqrt(Ca), a
    symmetric PSD matrix: stable without scipy and without complex parts.
    """
    if len(a) < 2 or len(b) < 2:
        raise CTFlowError("FID needs at least two samples in each set")
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    mean_term = float(((a.mean(0) - b.mean(0)) ** 2).sum())
    return max(0.0, mean_term + float(np.trace(cov_a) + np.trace(cov_b)) - 2 * float(np.sqrt(np.clip(cross, 0, None)).sum()))


def fid_2_5d(real: dict[str, np.ndarray], generated: dict[str, np.ndarray]) -> dict[str, float]:
    """FID per plane from set_features of both sets, and their mean."""
    scores = {plane: frechet_distance(real[plane], generated[plane]) for plane in PLANES}
    return {**scores, "mean": float(np.mean(list(scores.values())))}


# -- feature extractors ------------------------------------------------------------------------------------------


class RandomFeatures(nn.Module):
    """Offline default: four stride-2 3x3 convolutions with ReLU and fixed random (He-scaled) weights; the
    features are the spatial means of every stage (32 + 64 + 128 + 256 = 480 values), fine to coarse.

    Weights come from numpy's legacy RandomState, whose stream numpy keeps frozen: every machine and version
    builds the same network.
    """

    def __init__(self, seed: int = 0, widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        rng = np.random.RandomState(seed)
        self.stages = nn.ModuleList()
        channels = 1
        for width in widths:
            conv = nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False)
            weight = rng.standard_normal((width, channels, 3, 3)) * math.sqrt(2 / (channels * 9))
            conv.weight.data = torch.tensor(weight, dtype=torch.float32)
            self.stages.append(conv)
            channels = width
        self.requires_grad_(False)
        self.name = f"random-cnn(seed={seed})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 2 - 1
        pooled = []
        for conv in self.stages:
            x = F.relu(conv(x))
            pooled.append(x.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck; `keras` places the stride on the first 1x1 convolution and gives convolutions biases."""

    def __init__(self, channels: int, width: int, stride: int, keras: bool) -> None:
        super().__init__()
        out, eps = 4 * width, 1.001e-5 if keras else 1e-5
        self.conv1 = nn.Conv2d(channels, width, 1, stride=stride if keras else 1, bias=keras)
        self.bn1 = nn.BatchNorm2d(width, eps=eps)
        self.conv2 = nn.Conv2d(width, width, 3, stride=1 if keras else stride, padding=1, bias=keras)
        self.bn2 = nn.BatchNorm2d(width, eps=eps)
        self.conv3 = nn.Conv2d(width, out, 1, bias=keras)
        self.bn3 = nn.BatchNorm2d(out, eps=eps)
        self.downsample = None
        if stride != 1 or channels != out:
            self.downsample = nn.Sequential(nn.Conv2d(channels, out, 1, stride=stride, bias=keras), nn.BatchNorm2d(out, eps=eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """ResNet-50 trunk with torchvision's parameter names, ending in a spatial mean: [N, 3, H, W] -> [N, 2048].

    keras=True matches weights converted from Keras, as RadImageNet released them.
    """

    STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride)

    def __init__(self, keras: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=keras)
        self.bn1 = nn.BatchNorm2d(64, eps=1.001e-5 if keras else 1e-5)
        channels = 64
        for number, (width, blocks, stride) in enumerate(self.STAGES, start=1):
            layer = []
            for block in range(blocks):
                layer.append(Bottleneck(channels, width, stride if block == 0 else 1, keras))
                channels = 4 * width
            setattr(self, f"layer{number}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        for number in range(1, 5):
            x = getattr(self, f"layer{number}")(x)
        return x.mean(dim=(2, 3))


class GreyToRGB(nn.Module):
    """[0, 1] grey slices -> the three normalised channels a network pretrained on natural-image layout expects."""

    def __init__(self, network: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], name: str) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network((x.expand(-1, 3, -1, -1) - self.mean) / self.std)


def load_resnet50(path: str | os.PathLike) -> GreyToRGB:
    """RadImageNet-ResNet50 (or any ResNet-50) from a safetensors state dict in torchvision's names.

    Keras-converted weights (convolution biases present) get RadImageNet's input convention (BGR means,
    no scaling); torchvision-trained weights get ImageNet's mean and std. A classifier head is ignored.
    """
    from safetensors.torch import load_file

    try:
        state = {key: value for key, value in load_file(str(path)).items() if not key.startswith("fc.")}
    except Exception as exc:  # safetensors raises several types for missing or damaged files
        raise CTFlowError(f"cannot read feature weights {path}: {exc}") from exc
    keras = "conv1.bias" in state
    network = ResNet50(keras=keras)
    missing, unexpected = network.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CTFlowError(f"{path} is not a ResNet-50 state dict (missing {missing[:3]}, unexpected {unexpected[:3]})")
    mean, std = (RADIMAGENET_MEAN, (1.0, 1.0, 1.0)) if keras else (IMAGENET_MEAN, IMAGENET_STD)
    return GreyToRGB(network.eval().requires_grad_(False), mean, std, f"resnet50({Path(path).name})")


def load_feature_extractor(spec: str) -> nn.Module:
    """"random", "random:SEED" or "resnet50:WEIGHTS.safetensors"."""
    kind, _, argument = spec.partition(":")
    if kind == "random" and (argument or "0").isdigit():
        return RandomFeatures(int(argument or 0))
    if kind == "resnet50" and argument:
        return load_resnet50(argument)
    raise CTFlowError(f"unknown feature extractor {spec!r}: use random, random:SEED or resnet50:WEIGHTS.safetensors")


# -- text alignment ----------------------------------------------------------------------------------------------


def read_labels(path: str | os.PathLike) -> dict[str, dict[str, bool]]:
    """Requested findings per report id from a table: 0/1 columns (CT-RATE's label CSV), a `ctrate_labels`
    object, or a `labels` path to a JSON holding one (the training cohort's index.jsonl)."""
    path = Path(path)
    labels = {}
    for order, row in enumerate(read_table(path)):
        found = _row_labels(row, path.parent)
        if found:
            labels[row_id(row, order)] = found
    if not labels:
        raise CTFlowError(f"{path} holds no finding labels")
    return labels


def _row_labels(row: dict, base: Path) -> dict[str, bool]:
    if isinstance(row.get("ctrate_labels"), dict):
        source = row["ctrate_labels"]
    elif isinstance(row.get("labels"), str) and row["labels"].endswith(".json"):
        source = read_json_object(base / row["labels"]).get("ctrate_labels", {})
    else:
        source = {key: value for key, value in row.items() if key not in ID_KEYS and _is_flag(value)}
    return {name: str(value).strip().lower() in ("1", "true") for name, value in source.items()}


def _is_flag(value) -> bool:
    return str(value).strip().lower() in ("0", "1", "true", "false")


def load_detector(spec: str) -> Detector:
    """A detector named "package.module:function" (your own code: a classifier wrapped as volume -> probabilities)."""
    module_name, _, function = spec.partition(":")
    try:
        detector = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError, ValueError) as exc:
        raise CTFlowError(f"cannot load detector {spec!r}: {exc}") from exc
    if not callable(detector):
        raise CTFlowError(f"detector {spec!r} is not callable")
    return detector


def text_alignment(
    cases: Iterable[tuple[dict[str, bool], dict[str, float]]], threshold: float = 0.5,
) -> dict[str, dict]:
    """Per finding: detection rate when the report asked for it vs when it negated it, from (requested, detected)
    pairs. A model that follows the text shows a large gap; one that ignores it, none."""
    counts: dict[str, np.ndarray] = {}  # finding -> [requested, detected | requested, negated, detected | negated]
    for requested, detected in cases:
        for finding, present in requested.items():
            if finding not in detected:
                continue
            hit = detected[finding] >= threshold
            tally = counts.setdefault(finding, np.zeros(4, int))
            tally += (present, present and hit, not present, (not present) and hit)
    return {finding: _rates(*tally) for finding, tally in sorted(counts.items())}


def _rates(requested: int, hit_requested: int, negated: int, hit_negated: int) -> dict:
    when_requested = hit_requested / requested if requested else None
    when_negated = hit_negated / negated if negated else None
    gap = when_requested - when_negated if when_requested is not None and when_negated is not None else None
    return {"requested": int(requested), "detected_when_requested": when_requested, "negated": int(negated),
            "detected_when_negated": when_negated, "gap": gap}


def batch_alignment(folder: str | os.PathLike, labels: dict[str, dict[str, bool]], detector: Detector) -> dict:
    """text_alignment over a batch folder: its manifest ties each volume to the report id the labels use."""
    folder = Path(folder)
    cases = ((labels[row["report_id"]], detector(read_volume(folder / row["file"])))
             for row in read_manifest(folder) if row["report_id"] in labels)
    return text_alignment(cases)
