"""Measure a trained model the way a user meets it: through ctflow's pipeline.

    ctflow-train evaluate --model Resources/Models/ctflow-demo --data cache/cohort --out cache/eval.json

- seam continuity: mean |HU difference| between consecutive slices across block boundaries vs inside blocks
  (real slices only), for generated volumes and, as the reference, for the cohort's own volumes;
- length: where the model ends a volume by itself, against the cohort's typical length and the length of the
  patient whose report was used; and, with "Length: N slices" in the prompt but the end left to the model,
  how far its end lies from N;
- time: seconds per generated volume on this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ctflow import CTFlowPipeline, GenerationRequest
from ctflow.pipeline import first_white_slice
from ctflow.qa import seam_continuity

from .training_data import list_cases, load_case


def real_slices(hu: np.ndarray) -> int:
    """Slices before the first (near-)white one."""
    white = first_white_slice(hu)
    return len(hu) if white is None else white


def seam_jump(hu: np.ndarray, block: int) -> dict:
    """Mean |HU difference| of consecutive real slices at block boundaries and inside blocks (ctflow's QA measure)."""
    seams = seam_continuity(hu[: real_slices(hu)], block)
    return {"boundary_hu": seams["across_hu"], "inside_hu": seams["inside_hu"]} if seams["ratio"] is not None else {}


def summarise(seams: list[dict]) -> dict:
    seams = [s for s in seams if s]
    boundary = statistics.mean(s["boundary_hu"] for s in seams)
    inside = statistics.mean(s["inside_hu"] for s in seams)
    return {"boundary_hu": round(boundary, 1), "inside_hu": round(inside, 1), "ratio": round(boundary / inside, 2),
            "volumes": len(seams)}


def generate(pipe: CTFlowPipeline, report: str, seed: int, prompt_slices: int | None = None):
    """(HU volume, seconds). With prompt_slices the prompt says "Length: N slices" but the model still ends it."""
    plan = pipe.plan(GenerationRequest(report, slices=prompt_slices, seed=seed))
    plan = dataclasses.replace(plan, request=dataclasses.replace(plan.request, slices=None))
    started = time.perf_counter()
    volume = pipe.generate(plan)
    return volume.hu, time.perf_counter() - started


def evaluate(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = CTFlowPipeline.from_pretrained(args.model, device="cpu")
    block = pipe.config.denoiser.block_slices
    _, held = list_cases(args.data, args.holdout)
    cases = [load_case(args.data, entry) for entry in held]
    typical = pipe.config.typical_slices
    free, asked, seams, seconds = [], [], [], []
    for number, case in enumerate(cases):
        seed = args.seed + number
        hu, took = generate(pipe, case.report.text, seed)
        free.append({"patient": case.name, "real": case.content_slices, "generated": real_slices(hu), "seconds": round(took, 1)})
        seams.append(seam_jump(hu, block))
        seconds.append(took / max(1, len(hu)))
        for requested in args.requested:
            hu, took = generate(pipe, case.report.text, seed, requested)
            asked.append({"patient": case.name, "requested": requested, "generated": real_slices(hu)})
            seams.append(seam_jump(hu, block))
            seconds.append(took / max(1, len(hu)))
        print(json.dumps(free[-1]), json.dumps(asked[-len(args.requested):]), flush=True)
    return {
        "seam_continuity_generated": summarise(seams),
        "seam_continuity_cohort": summarise([seam_jump(case.hu, block) for case in cases]),
        "length_unrequested": {
            "typical": typical,
            "mean_abs_error_vs_typical": round(statistics.mean(abs(f["generated"] - typical) for f in free), 1),
            "mean_abs_error_vs_patient": round(statistics.mean(abs(f["generated"] - f["real"]) for f in free), 1),
            "volumes": free,
        },
        "length_requested_in_prompt": {
            "mean_abs_error": round(statistics.mean(abs(a["generated"] - a["requested"]) for a in asked), 1) if asked else None,
            "volumes": asked,
        },
        "seconds_per_128_slices": round(128 * statistics.mean(seconds), 1),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
    }


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--data", type=Path, required=True, help="prepared folder the model was trained from")
    parser.add_argument("--holdout", type=int, default=4, help="its last N patients (not trained on) give the reports")
    parser.add_argument("--requested", type=int, nargs="*", default=[96, 160], help="lengths to put in the prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, required=True, help="JSON to write")


def run(args: argparse.Namespace) -> int:
    result = evaluate(args)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("length_unrequested", "length_requested_in_prompt")}))
    return 0
