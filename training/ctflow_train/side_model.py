"""`ctflow-train side-model`: a model folder with a second denoiser beside its own, whose sides guide its sided
reports (ctflow.sampling.guided). A model trained on side twins tells left from right where the bundle does not,
and loses findings the bundle keeps; weight averages of the two kept one at the other's cost (docs/training.md).
Here each keeps its part: the model's denoiser makes every volume, and where side guidance acts the side model's
own half against the other half is added at `--weight`.

The model's files stay byte for byte; the side model's denoiser is copied whole; the config gains
`sampling.side_model_guidance`, so the model hash changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

from ctflow import CTFlowPipeline
from ctflow.checksums import sha256_file, write_checksums
from ctflow.errors import CTFlowError
from ctflow.io import atomic_folder
from ctflow.model_folder import (CARD, CONFIG, SIDE_WEIGHTS, WEIGHTS, copy_model_files, read_config,
                                 verify_model_folder)

from .options import config_rule, print_json

CARD_PARAGRAPH = f"Side model ({SIDE_WEIGHTS}, `ctflow-train side-model`):"


def write_side_model(model: Path, side: Path, weight: float, out: Path, overwrite: bool) -> dict:
    """`model`'s files with `side`'s denoiser as SIDE_WEIGHTS and the weight in its config, written whole into
    `out`."""
    checksums, side_checksums = verify_model_folder(model), verify_model_folder(side)
    config, side_config = read_config(model), read_config(side)
    for part in ("denoiser", "text"):
        if getattr(config, part) != getattr(side_config, part):
            raise CTFlowError(f"--side {side}'s {part} config differs from --model {model}'s: the side model must "
                              "read the same rows (text encoder) with a denoiser of the same shape")
    sampling = dataclasses.replace(config.sampling, side_model_guidance=weight)
    config = dataclasses.replace(config, sampling=sampling)

    def fill(staging: Path) -> None:
        copy_model_files(model, {k: v for k, v in checksums.items() if k != SIDE_WEIGHTS}, staging)
        shutil.copyfile(side / WEIGHTS, staging / SIDE_WEIGHTS)
        if sha256_file(staging / SIDE_WEIGHTS) != side_checksums[WEIGHTS]:
            raise CTFlowError(f"{side / WEIGHTS} changed while it was copied; nothing is written")
        (staging / CONFIG).write_text(config.to_json(), encoding="utf-8")
        card = staging / CARD
        if card.is_file():
            paragraphs = card.read_text(encoding="utf-8").rstrip("\n").split("\n\n")
            kept = [text for text in paragraphs if not text.startswith(CARD_PARAGRAPH)]  # a side model it had
            card.write_text("\n\n".join(kept) + "\n\n" + (
                f"{CARD_PARAGRAPH} the denoiser of `{side.name}` (sha256 "
                f"{side_checksums[WEIGHTS]}) at weight {weight:g}: where side guidance acts, the volume is guided by "
                "this model's own half against the other half as well (`ctflow.sampling.guided`); a report that "
                "names no side is made by this folder's own denoiser alone.\n"), encoding="utf-8")
        write_checksums(staging)
        CTFlowPipeline.from_pretrained(staging, device="cpu")  # as a user will load it

    if out.exists() and not overwrite:
        raise CTFlowError(f"{out} exists: give another --out, or --overwrite")
    atomic_folder(out, fill, overwrite=True)
    return {"model": str(out), "side_model": side_checksums[WEIGHTS], "side_model_guidance": weight}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model folder to copy with the side model")
    parser.add_argument("--side", type=Path, required=True,
                        help="model folder whose denoiser guides the sides (same denoiser and text config)")
    parser.add_argument("--weight", type=config_rule("sampling.side_model_guidance", float), required=True,
                        help="side model guidance: the side model's own half against the other, added (above 0)")
    parser.add_argument("--out", type=Path, required=True, help="model folder to write (may be --model itself)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    model, side, out = args.model.resolve(), args.side.resolve(), args.out.resolve()
    for name, folder in (("--model", model), ("--side", side)):
        if folder != out and (out.is_relative_to(folder) or folder.is_relative_to(out)):
            raise CTFlowError(f"--out {args.out} and {name} {folder} lie one inside the other: give another --out")
    if side == out:
        raise CTFlowError("--out is the --side folder: give another --out")
    if args.weight == 0:
        raise CTFlowError("--weight 0 adds nothing: leave the side model out")
    return print_json(write_side_model(args.model, args.side, args.weight, args.out, args.overwrite))
