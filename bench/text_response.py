"""Does a report in other words move a model's denoiser the way the cohort writer's report of the same finding does?

For each held-out case (training/ctflow_train/heldout_reports.json) with a finding the writer's reports cover, the
denoiser's clean-block prediction from the case's report minus that from its negated counterpart is compared with
the prediction from the writer's report of that finding minus that from the writer's normal report, on the same
real blocks, noise and flow times (10 volumes of a latent store x 2 offsets x 3 times):
  own   cosine of the two changes (1: the held-out words act exactly as the writer's)
  rank  where the writer's own finding ranks among the 11 writer findings by that cosine (1: the best match)
  ratio the change's size over the writer's (far above 1: the words move much more than the finding)
A quick proxy read on the denoiser, no generation; the finding study is the measure of record.

  python bench/text_response.py --model Resources/Models/ctflow-demo --latents cache/latents16v \
      --data cache/cohort --out cache/text_response.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
from ctflow.errors import CTFlowError  # noqa: E402
from ctflow.pipeline import CTFlowPipeline, GenerationRequest  # noqa: E402
from ctflow.sampling import denoiser_codes  # noqa: E402
from ctflow_train.finding_study import STUDIED, WORDING_SEED, writer_reports  # noqa: E402
from ctflow_train.heldout import load_heldout  # noqa: E402
from ctflow_train.latent_store import LatentStore  # noqa: E402
from ctflow_train.options import positive  # noqa: E402
from generation import json_output, write_json  # noqa: E402  (bench/, the script's folder)

TIMES = (0.9, 0.6, 0.3)
OFFSETS = (32, 64)  # first slices of the blocks: the second and third block of a volume
VOLUMES = range(0, 60, 6)


def blocks(store: LatentStore, block: int) -> list[tuple]:
    """(previous block, noisy block, time, first slice) of each volume, offset and time; noise from seed 0."""
    rng = np.random.default_rng(0)
    made = []
    for volume in VOLUMES:
        latents = store.latents(volume)  # [S, C, h, w]
        for first in OFFSETS:
            for t in TIMES:
                clean = latents[first:first + block].permute(1, 0, 2, 3)[None]  # [1, C, T, h, w]
                previous = latents[first - block:first].permute(1, 0, 2, 3)[None]
                noise = torch.from_numpy(rng.standard_normal(clean.shape).astype("float32"))
                made.append((previous, (1 - t) * clean + t * noise, torch.tensor([t]), first))
    return made


@torch.no_grad()
def prediction(pipe: CTFlowPipeline, report: str, samples: list[tuple]) -> torch.Tensor:
    """The denoiser's clean-block predictions over every sample, from the report as the pipeline embeds it."""
    plan = pipe.plan(GenerationRequest(report=report, seed=0, side_guidance=0.0))  # row 0: the whole report
    text, mask, rows = plan.text[:1], plan.text_mask[:1], plan.code_texts[:1]  # the conditional branch
    denoiser = pipe.denoiser
    return torch.cat([denoiser.predict(z, t, denoiser.prepare(previous, text, mask, torch.tensor(float(first)),
                                                              denoiser_codes(rows, denoiser.config, first))).flatten()
                      for previous, z, t, first in samples])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--latents", type=Path, required=True, help="latent store the blocks are taken from")
    parser.add_argument("--data", type=Path, required=True, help="cohort folder whose labels give the writer's reports")
    parser.add_argument("--threads", type=positive(int), default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args()
    try:
        json_output(args.out, args.overwrite)
    except CTFlowError as exc:
        raise SystemExit(f"text_response: {exc}") from exc
    torch.set_num_threads(args.threads)
    pipe = CTFlowPipeline.from_pretrained(args.model, device="cpu")
    samples = blocks(LatentStore(args.latents), pipe.config.denoiser.block_slices)
    writer, _ = writer_reports(args.data, WORDING_SEED, STUDIED)
    normal = prediction(pipe, writer["normal"], samples)
    writer_change = {f: prediction(pipe, text, samples) - normal for f, text in writer.items() if f != "normal"}
    rows = []
    for case in load_heldout():
        if case.finding not in writer_change:
            continue
        change = prediction(pipe, case.report, samples) - prediction(pipe, case.negated, samples)
        scores = {f: cosine(change, w) for f, w in writer_change.items()}
        own = scores[case.finding]
        rows.append({"case": case.name, "own": own, "rank": 1 + sum(s > own for s in scores.values()),
                     "ratio": float(change.norm() / writer_change[case.finding].norm())})
        print(f"{case.name:42s} own {own:+.2f} rank {rows[-1]['rank']:2d} ratio {rows[-1]['ratio']:.2f}", flush=True)
    summary = {"model": str(args.model), "cases": len(rows), "mean_own": float(np.mean([r["own"] for r in rows])),
               "ranked_first": sum(r["rank"] == 1 for r in rows),
               "mean_ratio": float(np.mean([r["ratio"] for r in rows])), "rows": rows}
    write_json(args.out, summary, args.overwrite)
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
