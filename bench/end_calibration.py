"""End detection at other sampling step counts: `ctflow-train export`'s calibration, made on a model folder's weights.

For each --steps, the block holding the end of each of the first --cases volumes of a latent store is generated from
the real block before it, as export calibrates (export.end_distances), and the frames the decoder draws white are set
against the latent end test: how many are white, the highest white frame's distance, the lowest other one's, the
tolerance export would choose, and how many frames the folder's own end_tolerance gets right. A folder's default
steps can change without a new export when its tolerance still separates the frames (docs/training.md, "Sixteen
sampling steps").

  python bench/end_calibration.py --model Resources/Models/ctflow-demo --latents cache/latents16v --steps 32 16
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
from ctflow.conventions import START_HU  # noqa: E402
from ctflow.errors import CTFlowError  # noqa: E402
from ctflow.pipeline import CTFlowPipeline  # noqa: E402
from ctflow_train.export import choose_tolerance, end_distances  # noqa: E402
from ctflow_train.latent_store import LatentStore, same_encoding  # noqa: E402
from ctflow_train.options import positive, seed  # noqa: E402
from generation import add_results_options, markdown, run_bench, write_json  # noqa: E402


def calibrate(pipe: CTFlowPipeline, store: LatentStore, steps: int, cases: int, seed: int) -> dict:
    """One row: the end blocks at `steps`, their white and other frames, and both tolerances' hits."""
    sampling = dataclasses.replace(pipe.config.sampling, steps=steps)
    found = end_distances(pipe.denoiser, pipe.autoencoder, store, sampling, cases, seed)
    white, other = found["white"], found["content"]
    chosen = choose_tolerance(found)
    own = pipe.config.end_tolerance
    return {"steps": steps, "frames": len(white) + len(other), "white": len(white),
            "highest_white": max(white, default=None), "lowest_other": min(other, default=None),
            "chosen_tolerance": chosen["tolerance"], "chosen_accuracy": chosen["accuracy"],
            "folder_tolerance": own, "folder_white_hits": sum(d < own for d in white),
            "folder_other_hits": sum(d >= own for d in other)}


def run(args: argparse.Namespace) -> None:
    store = LatentStore(args.latents)  # a missing or half-made store fails before the model loads
    pipe = CTFlowPipeline.from_pretrained(args.model, device="cpu")
    if not same_encoding(store.start, pipe.autoencoder.constant_latent(START_HU).cpu()):
        raise CTFlowError(f"{args.latents} was not encoded by the autoencoder of {args.model}")
    rows = [calibrate(pipe, store, steps, args.cases, args.seed) for steps in args.steps]
    print(markdown(rows, f"End calibration of {args.model} on {args.cases} volumes of {args.latents}, seed {args.seed}"))
    write_json(args.json, {"model": str(args.model), "latents": str(args.latents), "cases": args.cases,
                           "seed": args.seed, "results": rows}, args.overwrite)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--latents", type=Path, required=True, help="latent store encoded by the folder's autoencoder")
    parser.add_argument("--steps", type=positive(int), nargs="+", required=True, help="step counts to calibrate at")
    parser.add_argument("--cases", type=positive(int), default=8, help="volumes (export's --calibration-cases)")
    parser.add_argument("--seed", type=seed, default=0, help="noise seed (export's --seed)")
    parser.add_argument("--threads", type=positive(int), help="torch CPU threads (default: torch's choice)")
    add_results_options(parser)
    run_bench("end_calibration", run, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
