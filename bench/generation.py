"""Generation benchmark: time to first block, total time, slices per second and peak memory, per sampler setting.

Runs each setting in one process, side by side, on one device. Not a test: the numbers go to
docs/BENCHMARKS.md with the device they were measured on.

    python bench/generation.py --preset cpu --slices 64 --setting reference=euler:200:1 --setting default
    python bench/generation.py --model Resources/Models/ctflow-demo --slices 128 --setting default
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

import ctflow
from ctflow.pipeline import select_device

REPORT = "Findings: Trachea and main bronchi are patent. No nodule, consolidation or pleural effusion. " \
         "Heart size is normal. Impressions: Normal chest CT."


def parse_setting(text: str) -> tuple[str, dict]:
    """'name' (the model's defaults) or 'name=sampler:steps:guidance[:shift]'."""
    name, _, spec = text.partition("=")
    if not spec:
        return name, {}
    sampler, steps, guidance, *shift = spec.split(":")
    return name, {"sampler": sampler, "steps": int(steps), "guidance": float(guidance),
                  "shift": float(shift[0]) if shift else None}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def run_setting(pipeline, name: str, options: dict, slices: int, seed: int) -> dict:
    if pipeline.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipeline.device)
    request = ctflow.GenerationRequest(REPORT, slices=slices, seed=seed, **options)
    plan = pipeline.plan(request)
    started = time.perf_counter()
    blocks = []
    for block in pipeline.stream(plan):
        blocks.append(block)
    total = time.perf_counter() - started
    return {
        "setting": name, "sampler": plan.request.sampler, "steps": plan.request.steps,
        "guidance": plan.request.guidance, "shift": plan.request.shift, "slices": blocks[-1].stop,
        "first_block_s": round(blocks[0].elapsed_s, 3), "total_s": round(total, 3),
        "per_block_s": round(total / len(blocks), 3), "slices_per_s": round(blocks[-1].stop / total, 3),
        "peak_memory_mb": round(peak_memory_mb(pipeline.device)),
    }


def markdown(results: list[dict], device: str) -> str:
    columns = ["setting", "sampler", "steps", "guidance", "slices", "first_block_s", "total_s", "per_block_s",
               "slices_per_s", "peak_memory_mb"]
    lines = [f"Device: {device}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in results]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model folder or hub id")
    source.add_argument("--preset", choices=sorted(ctflow.DENOISER_PRESETS), help="random weights of a preset size")
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--setting", action="append", default=[], help="name[=sampler:steps:guidance[:shift]]")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()

    model = args.model
    if args.preset:
        model = ctflow.create_random_model(Path(tempfile.mkdtemp()) / args.preset, args.preset)
    pipeline = ctflow.CTFlowPipeline.from_pretrained(model, device=args.device)
    device = select_device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    results = [run_setting(pipeline, *parse_setting(s), args.slices, args.seed) for s in (args.setting or ["default"])]
    report = {"device": device_name, "model": pipeline.model_id, "torch": torch.__version__, "results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(results, f"{device_name}, model {pipeline.model_id}, torch {torch.__version__}"))


if __name__ == "__main__":
    sys.exit(main())
