"""Which HU mapping did the released CTFlow model learn? Compare latent statistics, for a user with CT-RATE data.

The released code documents no HU window: it writes clamp(306 x image, 0, 255) PNGs. A model that learned slices
mapped one way generates first blocks whose latents have that mapping's statistics. This script encodes the top
block of real chest CTs under each candidate mapping (HU window -> VAE image range) with the model's VAE, generates
first blocks with the model, and prints how far each candidate's per-channel latent mean and spread lie from the
generated ones: the smallest distance is the mapping most consistent with what the model draws.

    python bench/released_hu_check.py --model models/ctflow-released-L --ct valid_1_a_1.nii.gz valid_2_a_1.nii.gz \
        --reports reports.txt --seeds 4 --device cuda

CT-RATE volumes (https://huggingface.co/datasets/ibrahimhamamci/CT-RATE, gated, CC BY-NC-SA 4.0) are read with
ctflow.read_volume (NIfTI with a valid header; early releases kept spacing only in a metadata CSV). Not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import ctflow
from ctflow.autoencoder import SliceAutoencoder
from ctflow.errors import CTFlowError
from ctflow_train.options import positive

# name -> (HU window, VAE image range). "[0, 1]" is the model folder's setting (docs/released_model.md).
CANDIDATES = {
    "HU -1000..1000 -> 0..1 (setting)": ((-1000.0, 1000.0), (0.0, 1.0)),
    "HU -1000..1000 -> 0..255/306 (PNG/306)": ((-1000.0, 1000.0), (0.0, 255 / 306)),
    "HU -1000..1000 -> -1..1": ((-1000.0, 1000.0), (-1.0, 1.0)),
    "HU -1024..3071 -> 0..1 (full range)": ((-1024.0, 3071.0), (0.0, 1.0)),
    "HU -1350..150 -> 0..1 (lung window)": ((-1350.0, 150.0), (0.0, 1.0)),
}
DEFAULT_REPORT = "Findings: Trachea and both main bronchi are open. No mass or effusion. Impressions: Normal chest CT."


def channel_statistics(latents: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] latents -> [2, C]: per-channel mean and standard deviation."""
    flat = latents.transpose(0, 1).reshape(latents.shape[1], -1).float()
    return torch.stack([flat.mean(1), flat.std(1)])


def real_top_block(path: Path, slices: int, size: int) -> torch.Tensor:
    """The first (most superior) `slices` axial slices of a CT, resized to size x size: [slices, size, size] HU."""
    hu = torch.from_numpy(ctflow.read_volume(path).hu[:slices].astype("float32"))
    return F.interpolate(hu[:, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[:, 0]


def generated_first_blocks(pipeline, reports: list[str], seeds: int) -> torch.Tensor:
    """[N, C, h, w] latents of the model's first generated blocks (before decoding)."""
    blocks = []
    for report in reports:
        for seed in range(seeds):
            request = ctflow.GenerationRequest(report, seed=seed, slices=pipeline.config.denoiser.block_slices)
            plan = pipeline.plan(request)
            start, _ = pipeline._markers(plan.request.seed)
            _, latents = next(pipeline._sample_blocks(plan, start, lambda: False))  # the first block, clean
            blocks.append(latents.transpose(0, 1).cpu())  # [T, C, h, w]
    return torch.cat(blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder made by `ctflow import-released`")
    parser.add_argument("--ct", type=Path, nargs="+", required=True, help="real chest CT volumes (.nii.gz, .nrrd)")
    parser.add_argument("--reports", type=Path, help="one report per line (default: a normal chest CT report)")
    parser.add_argument("--seeds", type=positive(int), default=4, help="generated first blocks per report")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    pipeline = ctflow.CTFlowPipeline.from_pretrained(args.model, device=args.device, dtype=torch.float32)
    lines = args.reports.read_text().splitlines() if args.reports else [DEFAULT_REPORT]
    reports = [line for line in lines if line.strip()]
    generated = channel_statistics(generated_first_blocks(pipeline, reports, args.seeds))
    size, block = pipeline.autoencoder.config.image_size, pipeline.config.denoiser.block_slices
    real = torch.cat([real_top_block(path, block, size) for path in args.ct])  # [N, size, size] HU
    print(f"{len(args.ct)} CTs x {block} slices vs {len(reports)} reports x {args.seeds} seeds of first blocks")
    print("| mapping | mean distance | spread distance |\n|---|---|---|")
    for name, (window, pixels) in CANDIDATES.items():
        config = dataclasses.replace(pipeline.autoencoder.config, hu_window=window, pixel_range=pixels)
        encoded = channel_statistics(SliceAutoencoder(pipeline.autoencoder.vae, config).encode(real).cpu())
        mean_distance, spread_distance = (encoded - generated).abs().mean(1).tolist()
        print(f"| {name} | {mean_distance:.4f} | {spread_distance:.4f} |")


if __name__ == "__main__":
    try:  # a missing or corrupt input is one line
        sys.exit(main())
    except CTFlowError as exc:
        raise SystemExit(f"released_hu_check: {exc}") from exc
