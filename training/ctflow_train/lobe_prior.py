"""`ctflow-train lobe-prior`: a model folder with the cohort's lobe prior beside its weights (ctflow.places), so that
side guidance asks for a finding the report puts in a lobe inside that lobe, and not over the whole half.

The prior is finding-study's anatomy prior (the mean label maps of a cohort's first patients, in the model's grid,
levels by fraction of the real slices), its lobes averaged over each latent cell. The weights stay byte for byte;
the model hash changes (the prior is one of the folder's files).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ctflow.checksums import write_checksums
from ctflow.errors import CTFlowError
from ctflow.io import atomic_folder
from ctflow.model_folder import CARD, copy_model_files, read_config, verify_model_folder
from ctflow.places import HALF_LOBES, LOBE_FILE, LobePrior

from .finding_study import LEVELS, POOL, AnatomyPrior, read_or_make_prior
from .options import add_ct_cache_option, positive, print_json


def lobe_shares(prior: AnatomyPrior, latent_size: int) -> dict[str, torch.Tensor]:
    """Each lobe of places.HALF_LOBES: [levels, latent, latent], the prior's shares averaged over each latent cell."""
    shares = {}
    for lobe in (name for half in HALF_LOBES.values() for name in half):
        if lobe not in prior.regions:
            raise CTFlowError(f"the anatomy prior has no region {lobe!r}: make it again with this version")
        weights = torch.from_numpy(prior.weights[prior.regions.index(lobe)]).float()  # [levels, H, W]
        levels, height, width = weights.shape
        if height != width or height % latent_size:
            raise CTFlowError(f"the anatomy prior is {height}x{width} a slice, which {latent_size}x{latent_size} "
                              "latent cells do not divide: it was made for another model")
        cell = height // latent_size
        shares[lobe] = weights.reshape(levels, latent_size, cell, latent_size, cell).mean((2, 4)).contiguous()
    return shares


def write_lobe_prior(model: Path, prior: AnatomyPrior, out: Path, overwrite: bool) -> dict:
    """`model`'s files (those its checksums list) with LOBE_FILE beside them, written whole into `out`."""
    checksums = verify_model_folder(model)
    config = read_config(model)
    if prior.weights.shape[-1] * POOL != config.autoencoder.image_size:
        raise CTFlowError(f"the anatomy prior was made for slices of {prior.weights.shape[-1] * POOL} pixels, the "
                          f"model makes {config.autoencoder.image_size}: make it again for this model")
    shares = lobe_shares(prior, config.denoiser.latent_size)

    def fill(staging: Path) -> None:
        copy_model_files(model, checksums, staging)
        save_file(shares, staging / LOBE_FILE)
        LobePrior.load(staging, config.denoiser.latent_size)  # as a pipeline will read it
        card = staging / CARD
        if card.is_file():
            card.write_text(card.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + (
                f"Lobe prior ({LOBE_FILE}, `ctflow-train lobe-prior`): where each lung lobe lies in the latent grid, "
                f"{LEVELS} levels of the body, from the label maps of {prior.patients} cohort patients; side guidance "
                "asks for a finding the report puts in a lobe inside that lobe.\n"), encoding="utf-8")
        write_checksums(staging)

    if out.exists() and not overwrite:
        raise CTFlowError(f"{out} exists: give another --out, or --overwrite")
    atomic_folder(out, fill, overwrite=True)
    return {"model": str(out), "lobes": {name: round(float(share.sum()), 1) for name, share in shares.items()}}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model folder to copy with the lobe prior")
    parser.add_argument("--prior", type=Path, required=True,
                        help="anatomy prior .npz (finding-study's): read, or made from --data's patients and written")
    parser.add_argument("--data", type=Path, help="cohort folder whose first patients make the prior if it is absent")
    parser.add_argument("--prior-patients", type=positive(int), default=12, help="cohort patients the prior is made from")
    add_ct_cache_option(parser)
    parser.add_argument("--out", type=Path, required=True, help="model folder to write (may be --model itself)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    model, out = args.model.resolve(), args.out.resolve()
    if model != out and (out.is_relative_to(model) or model.is_relative_to(out)):
        raise CTFlowError(f"--out {args.out} and --model {args.model} lie one inside the other: give another --out")
    if args.out.exists() and not args.overwrite:  # before the prior is made (minutes)
        raise CTFlowError(f"{args.out} exists: give another --out, or --overwrite")
    prior = read_or_make_prior(args.prior, args.data, args.prior_patients, read_config(args.model), args.ct_cache,
                               lambda line: print(line, file=sys.stderr, flush=True))
    return print_json(write_lobe_prior(args.model, prior, args.out, args.overwrite))
