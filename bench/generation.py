"""Generation benchmark: the reference sampler and this project's default, side by side in one run.

Per setting: time to first block (report in, first decoded block out), total time, slices per second,
peak memory, model calls per block; and the quality cost against the first setting (the reference):
the HU difference from the reference volume of the same seed (same noise, same model: in the first
block all of it comes from taking fewer steps; later blocks add what the autoregression compounds),
and the QA measures (seams, detail over depth,
HU histogram). Not a test: the numbers go to docs/BENCHMARKS.md with the device they were measured on.

    python bench/generation.py --preset cpu --slices 64            # reference (Euler, 200 steps) vs default
    python bench/generation.py --model Resources/Models/ctflow-demo --slices 128 --setting ab2=ab2:10:1
    python bench/generation.py --model Resources/Models/ctflow-demo --slices 128 --no-reference \
        --report-file Resources/SampleReports/right_pleural_effusion.txt   # side guidance's third row
    python bench/generation.py --preset L --device cuda --compile   # CTFlow-L size on a GPU
    python bench/generation.py --preset L --project                # too slow to run here: per-call timing

A setting is NAME (the model's defaults), or NAME=SAMPLER:STEPS:GUIDANCE[:SHIFT]; a trailing +ahead
turns on decode-ahead (block k decoded while block k + 1 is sampled) for it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

import ctflow
from ctflow import qa
from ctflow.errors import CTFlowError
from ctflow.io import atomic_write, check_output_path
from ctflow.pipeline import check_options
from ctflow.report import parse_report, read_report_file
from ctflow.sampling import block_velocity, denoiser_codes
from ctflow.testing import create_random_model
from ctflow_train.options import positive

REPORT = "Findings: Trachea and main bronchi are patent. No nodule, consolidation or pleural effusion. " \
         "Heart size is normal. Impressions: Normal chest CT."
REFERENCE = "reference=euler:200:1"  # the released CTFlow code: Euler, 200 steps per block, no guidance
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_setting(text: str) -> tuple[str, dict, bool]:
    """(name, request options, decode ahead) from NAME[=SAMPLER:STEPS:GUIDANCE[:SHIFT]][+ahead]."""
    ahead = text.endswith("+ahead")
    text = text.removesuffix("+ahead")
    name, _, spec = text.partition("=")
    if not spec:
        return name + ("+ahead" if ahead else ""), {}, ahead
    sampler, steps, guidance, *shift = spec.split(":")
    options = {"sampler": sampler, "steps": int(steps), "guidance": float(guidance),
               "shift": float(shift[0]) if shift else None}
    return name + ("+ahead" if ahead else ""), options, ahead


def setting(text: str) -> str:
    """argparse type: a setting checked when the command starts (its sampler and numbers too), not minutes later."""
    try:
        _, options, _ = parse_setting(text)
        check_options(ctflow.GenerationRequest("Findings: x.", **options))
    except (ValueError, CTFlowError) as exc:  # a ReportError or RequestError is a ValueError too
        raise argparse.ArgumentTypeError(f"{text!r}: {exc} (NAME[=SAMPLER:STEPS:GUIDANCE[:SHIFT]][+ahead])") from exc
    return text


def report_file(path: str) -> str:
    """argparse type: a report file's text, read and parsed as `ctflow generate --report-file` does, when the command
    starts."""
    try:
        text = read_report_file(path)
        parse_report(text)
    except CTFlowError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def add_results_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


def run_bench(script: str, run, args: argparse.Namespace) -> None:
    """run(args) after the results file and thread count are checked and set; a CTFlowError (a bad model folder, a
    results file that exists) ends the script in one line."""
    try:
        json_output(args.json, args.overwrite)
        if args.threads:
            torch.set_num_threads(args.threads)
        run(args)
    except CTFlowError as exc:
        raise SystemExit(f"{script}: {exc}") from exc


def json_output(path: Path | None, overwrite: bool) -> None:
    """Refuse, before any work, a results file that exists (unless --overwrite) or whose folder does not."""
    if path is not None:
        check_output_path(path, overwrite, suffixes=(".json",))


def write_json(path: Path | None, data, overwrite: bool) -> None:
    """The results file, written whole or not at all."""
    if path is not None:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"), overwrite=overwrite)


def model_calls(sampler: str, steps: int, guidance: float) -> int:
    """Denoiser forwards per block (a guided call runs both halves in one batched forward)."""
    return 2 * steps - 1 if sampler == "heun" else steps


class PeakMemory:
    """Peak memory while a setting runs: CUDA's allocator peak, or the process RSS sampled every 10 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()

    @property
    def mb(self) -> int:
        return round(self.peak / 2**20)


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the process's peak so far
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_setting(pipeline, options: dict, ahead: bool, slices: int, seed: int,
                report: str = REPORT) -> tuple[dict, ctflow.Volume]:
    """Time one generation from report to last block; returns the timings and the volume."""
    synchronize(pipeline.device)
    with PeakMemory(pipeline.device) as memory:
        started = time.perf_counter()
        plan = pipeline.plan(ctflow.GenerationRequest(report, slices=slices, seed=seed, **options))
        blocks = []
        for block in pipeline.stream(plan, decode_ahead=ahead):
            if not blocks:
                first = time.perf_counter() - started
            blocks.append(block)
        synchronize(pipeline.device)
        total = time.perf_counter() - started
    req = plan.request
    volume = ctflow.Volume(np.concatenate([b.hu for b in blocks]), blocks[0].geometry, blocks[0].provenance)
    return {
        "sampler": req.sampler, "steps": req.steps, "guidance": req.guidance, "shift": req.shift,
        "side_guidance": plan.guidance.side,  # model rows a call: plan.guidance.branches
        "finding_guidance": plan.guidance.finding,
        "calls_per_block": model_calls(req.sampler, req.steps, req.guidance), "slices": volume.shape[0],
        "first_block_s": first, "total_s": total, "slices_per_s": volume.shape[0] / total, "peak_memory_mb": memory.mb,
    }, volume


def quality(volume: ctflow.Volume, reference: ctflow.Volume, truth: ctflow.Volume | None) -> dict:
    """QA measures of `volume` and its mean absolute HU distance from the reference volume of the same seed, over
    the first block (the same conditioning for every setting: only the solver differs) and over the volume (later
    blocks are conditioned on earlier ones, so differences compound); and, given a near-exact first block (`truth`),
    the first block's distance from it: the error itself, which the reference has too."""
    result = qa.assess(volume, reference=qa.hu_statistics(reference.hu))
    hu, reference_hu = volume.hu.astype(np.float32), reference.hu.astype(np.float32)
    first = volume.provenance.block_slices
    errors = {"first_block_error_vs_truth": qa.volume_distance(hu[:first], truth.hu)} if truth is not None else {}
    return {
        **errors,
        "first_block_hu_error": qa.volume_distance(hu[:first], reference_hu[:first]),
        "hu_error_vs_reference": qa.volume_distance(hu, reference_hu),
        "seam_ratio": result["seams"].get("ratio"),
        "detail_percent_per_block": result["detail"].get("percent_per_block"),
        "histogram_distance_hu": result["hu_difference"]["histogram_distance_hu"],
    }


def measure(pipeline, settings: list[str], slices: int, seeds: list[int], truth: str | None,
            report: str) -> list[dict]:
    """Every setting for every seed; timings and quality averaged over seeds."""
    runs: dict[str, list[tuple[dict, dict]]] = {}
    for seed in seeds:
        exact = None
        if truth:
            block = pipeline.config.denoiser.block_slices
            exact = run_setting(pipeline, parse_setting(f"truth={truth}")[1], False, block, seed, report)[1]
        references = None
        for text in settings:
            name, options, ahead = parse_setting(text)
            timing, volume = run_setting(pipeline, options, ahead, slices, seed, report)
            if references is None:
                references = volume
            runs.setdefault(name, []).append((timing, quality(volume, references, exact)))
            print(f"  {name} seed {seed}: {timing['total_s']:.1f} s", file=sys.stderr, flush=True)
    return [summarise(name, results) for name, results in runs.items()]


def summarise(name: str, results: list[tuple[dict, dict]]) -> dict:
    def mean(values):
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    timing = {key: mean(r[0][key] for r in results) if isinstance(results[0][0][key], (int, float)) else
              results[0][0][key] for key in results[0][0]}
    return {"setting": name, **timing, **{key: mean(r[1][key] for r in results) for key in results[0][1]},
            "seeds": len(results)}


def project(pipeline, settings: list[str], report: str, repeats: int = 3) -> list[dict]:
    """For models too slow to run whole here: time one denoiser call (median of `repeats`, per batch size: guidance
    doubles it) and one block decode, then project per-block time = calls per block x call time + decode time."""
    config = pipeline.config.denoiser
    latent = pipeline.autoencoder.constant_latent(-1000.0)
    block = latent[:, None].expand(-1, config.block_slices, -1, -1)[None].to(pipeline.device)
    decode_s = timed(lambda: pipeline._decode(block[0]), pipeline.device, repeats)
    call_s: dict[int, float] = {}
    rows = []
    for text in settings:
        name, options, _ = parse_setting(text)
        plan = pipeline.plan(ctflow.GenerationRequest(report, seed=0, **options))
        req, batch = plan.request, plan.text.shape[0]
        if batch not in call_s:
            velocity = block_velocity(pipeline.denoiser, block, plan.text, plan.text_mask, 0, plan.guidance,
                                      denoiser_codes(plan.code_texts, config, 0))
            with torch.no_grad():
                t = torch.tensor(0.5, device=pipeline.device)
                call_s[batch] = timed(lambda: velocity(block, t), pipeline.device, repeats)
        calls = model_calls(req.sampler, req.steps, req.guidance)
        per_block = calls * call_s[batch] + decode_s
        rows.append({"setting": name, "sampler": req.sampler, "steps": req.steps, "guidance": req.guidance,
                     "shift": req.shift, "calls_per_block": calls, "call_s": call_s[batch], "decode_s": decode_s,
                     "projected_block_s": per_block, "projected_slices_per_s": config.block_slices / per_block})
    return rows


def timed(function, device: torch.device, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def describe_device(pipeline) -> str:
    device = pipeline.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    dtype = str(next(pipeline.denoiser.parameters()).dtype).removeprefix("torch.")
    return f"{name}; denoiser {dtype}"


def markdown(rows: list[dict], header: str) -> str:
    if not rows:
        return header
    columns = list(rows[0])
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def format_cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model folder or hub id")
    source.add_argument("--preset", choices=sorted(ctflow.DENOISER_PRESETS), help="random weights of a preset size")
    parser.add_argument("--report-file", type=report_file, dest="report",
                        help="the report to generate from (default: a normal chest; one that names a side pays for "
                             "side guidance's third row)")
    parser.add_argument("--slices", type=positive(int), default=64)
    parser.add_argument("--seeds", type=positive(int), default=1,
                        help="seeds per setting (timings and quality averaged)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="denoiser dtype (auto: bf16 on a GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the denoiser (compiled in the warm-up)")
    parser.add_argument("--threads", type=positive(int), help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--setting", action="append", type=setting, default=[],
                        help="extra setting after reference and default")
    parser.add_argument("--no-reference", action="store_true", help="skip the 200-step reference")
    parser.add_argument("--truth", type=lambda text: setting(f"truth={text}") and text,
                        help="SAMPLER:STEPS:GUIDANCE of a near-exact first block to score errors against (heun:500:1)")
    parser.add_argument("--project", action="store_true", help="project per-block time from per-call timings")
    add_results_options(parser)
    run_bench("generation", run, parser.parse_args())


def run(args: argparse.Namespace) -> None:
    report = args.report or REPORT
    with tempfile.TemporaryDirectory() as scratch:  # random weights are loaded, then their folder goes
        model = args.model or create_random_model(Path(scratch) / args.preset, args.preset)
        pipeline = ctflow.CTFlowPipeline.from_pretrained(model, device=args.device, dtype=DTYPES[args.dtype])
    if args.compile:
        pipeline.compile()
    settings = ([] if args.no_reference else [REFERENCE]) + ["default"] + args.setting
    load_before = os.getloadavg()
    started = time.perf_counter()
    if args.project:
        rows, kind = project(pipeline, settings, report), "projected from per-call timings"
    else:
        block = pipeline.config.denoiser.block_slices
        run_setting(pipeline, {"steps": 2}, False, block, 0, report)  # warm-up (and compile) at the report's rows
        rows, kind = measure(pipeline, settings, args.slices, list(range(args.seeds)), args.truth, report), "measured"
    facts = {
        "device": describe_device(pipeline), "model": pipeline.model_id, "torch": torch.__version__,
        "compile": args.compile, "kind": kind, "slices": args.slices, "report": report,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "wall_s": round(time.perf_counter() - started), "date": datetime.date.today().isoformat(),
    }
    header = (f"Device: {facts['device']}; model {facts['model']}; torch {facts['torch']}; compile {args.compile}; "
              f"{kind}; load average {facts['load_average_before_after'][0]} -> {facts['load_average_before_after'][1]}")
    print(markdown(rows, header))
    write_json(args.json, {**facts, "results": rows}, args.overwrite)


if __name__ == "__main__":
    sys.exit(main())
