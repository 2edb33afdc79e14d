"""The `ctflow` command: generate a synthetic CT from a report, describe a model, make and check sets of them.

Bad input ends with one line on stderr and a non-zero exit; no traceback, no partial file.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from . import __version__
from .config import MAX_SLICES
from .conventions import SYNTHETIC_NOTICE
from .devices import DEVICES, select_device
from .entry import EXIT_CANCELLED, quiet_third_party_logs
from .errors import CTFlowError
from .io import DICOM, StagedWrites, atomic_write, check_output_path, check_volume_output, stage_volume
from .pipeline import CTFlowPipeline, DecodedBlock, GenerationRequest, check_request, local_config
from .report import read_report_file
from .sampling import METHODS

EXIT_ERROR, EXIT_TERMINATED = 1, 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a job scheduler, a closing session): unwinds like Ctrl-C, so temporary files are removed."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_third_party_logs(downloads=args.run is run_import_released)  # before transformers or diffusers load
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return args.run(args)
    except CTFlowError as exc:
        print(f"ctflow: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        print(f"\nctflow: {stopped(exc)}; nothing was written", file=sys.stderr)
        return exit_code(exc)
    except OSError as exc:  # disk full, permission denied while writing, ...
        print(f"ctflow: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_ERROR
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def stopped(interrupt: KeyboardInterrupt) -> str:
    return "terminated" if isinstance(interrupt, Terminated) else "cancelled"


def exit_code(interrupt: KeyboardInterrupt) -> int:
    return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_CANCELLED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctflow", description="Synthetic chest CT from a radiology report (CTFlow).")
    parser.add_argument("--version", action="version", version=f"ctflow {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate a synthetic CT volume from a report")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--report", help="report text (Findings: ... Impressions: ...)")
    source.add_argument("--report-file", type=Path, help="UTF-8 text file holding the report")
    source.add_argument("--embedding", type=Path,
                        help="precomputed report embedding .safetensors/.npy (one-vector models)")
    generate.add_argument("--out", required=True, help="output volume: .nii.gz, .nii, .nrrd or .mha, or a DICOM "
                          "series folder (.dcm or ending in /)")
    generate.add_argument("--format", choices=(DICOM,), help="write a DICOM series folder whatever --out is named")
    generate.add_argument("--seed", type=int, help="random seed (default: a fresh one, recorded in the file)")
    add_sampling_arguments(generate)
    add_model_arguments(generate)
    add_precision_argument(generate)
    generate.add_argument("--preview", type=Path, help="also write a PNG of the mid-planes in lung and soft-tissue windows")
    generate.add_argument("--overwrite", action="store_true", help="replace existing output files")
    generate.set_defaults(run=run_generate)

    info = commands.add_parser("info", help="print the model card, parameter counts and device")
    add_model_arguments(info)
    info.set_defaults(run=run_info)

    batch = commands.add_parser("batch", help="one volume per report and seed, resumable, sharded over torchrun ranks")
    batch.add_argument("reports", type=Path, help="reports table: .csv, .jsonl or .json (report or "
                       "findings/impressions, id; or the VLM3D challenge's input_image_name and report)")
    batch.add_argument("--out", required=True, type=Path, help="output folder (created; a rerun resumes it)")
    batch.add_argument("--seeds", type=int, default=1, help="volumes per report (default: 1)")
    batch.add_argument("--seed", type=int, default=0, help="first seed; report r gets seeds S ... S+K-1 (default: 0)")
    add_sampling_arguments(batch)
    add_model_arguments(batch)
    add_precision_argument(batch)
    batch.add_argument("--format", choices=(".nii.gz", ".nrrd", ".mha", DICOM), default=".nii.gz",
                       help="volume file type, or dicom: a series folder per item, one study per report "
                            "(default: .nii.gz)")
    batch.add_argument("--compile", action="store_true", help="torch.compile the denoiser (pays on a GPU over many items)")
    batch.add_argument("--merge-only", action="store_true", help="only write manifest.csv/json from the finished items")
    batch.set_defaults(run=run_batch)

    qa = commands.add_parser("qa", help="quality report per volume: seams, detail over depth, HU, length, diversity")
    qa.add_argument("volumes", type=Path, help="a volume, or a folder of volumes (e.g. a batch output)")
    qa.add_argument("--out", type=Path, help="report folder (default: qa/ beside the volumes)")
    qa.add_argument("--block-slices", type=int, help="slices per generated block (default: from each volume's provenance)")
    qa.add_argument("--reference", type=Path, help="reference CT volume, or a qa.json, for the HU statistics")
    qa.add_argument("--overwrite", action="store_true", help="replace existing reports")
    qa.set_defaults(run=run_qa)

    metrics = commands.add_parser("metrics", help="2.5D FID against real CTs; text alignment of requested findings")
    metrics.add_argument("generated", type=Path, help="folder of generated volumes (a batch output for --labels)")
    metrics.add_argument("--reference", type=Path, help="folder of real CT volumes: computes the 2.5D FID")
    metrics.add_argument("--features", default="random", help="random[:SEED] (offline default) or resnet50:WEIGHTS.safetensors")
    metrics.add_argument("--slices-per-axis", type=int, default=16, help="slices per plane and volume (default: 16)")
    metrics.add_argument("--size", type=int, default=256, help="slices are resized to size x size (default: 256)")
    metrics.add_argument("--labels", type=Path, help="requested findings per report id (.csv or .jsonl): text alignment")
    metrics.add_argument("--detector", help="finding detector package.module:function (volume -> probabilities)")
    metrics.add_argument("--device", default="auto", help=f"where features run: {DEVICES} (default: auto)")
    metrics.add_argument("--out", type=Path, help="also write the results to this JSON file")
    metrics.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    metrics.set_defaults(run=run_metrics)
    add_released_commands(commands)

    worker = commands.add_parser("worker", help="serve generation to a front end over JSON lines (see ctflow.worker)")
    worker.set_defaults(run=run_worker)
    return parser


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slices", type=int, help="exact slice count (default: the model decides where to end)")
    parser.add_argument("--steps", type=int, help="sampling steps per block (default: the model's)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = none; default: the "
                        "model's, or 1 with --embedding)")
    parser.add_argument("--side-guidance", type=float,
                        help="side guidance: each half of the volume guided by the report without what it puts on "
                             "the other side only (with a model's lobe prior, each lobe by what lies there), above 1 "
                             "also away from it (0 = none; default: the model's)")
    parser.add_argument("--finding-guidance", type=float,
                        help="finding guidance: also away from the report without its findings, so that what the "
                             "findings' words change is amplified (0 = none; default: the model's)")
    parser.add_argument("--sampler", choices=METHODS, help="ODE solver (default: the model's)")
    parser.add_argument("--shift", type=float, help="time shift of the sampling schedule (default: the model's)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder or hub id org/name (default: the bundled demo model)")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit) when --model is a hub id")
    parser.add_argument("--device", default="auto", help=f"where to run: {DEVICES} (default: auto)")


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="denoiser precision (default: auto, bfloat16 on a GPU; float32 reproduces the original "
                             "CTFlow)")


def precision(args: argparse.Namespace) -> torch.dtype | None:
    return None if args.dtype == "auto" else getattr(torch, args.dtype)


def run_generate(args: argparse.Namespace) -> int:
    check_volume_output(args.out, args.overwrite, args.format)  # fail before minutes of work, not after
    if args.preview:
        check_output_path(args.preview, args.overwrite, suffixes=(".png",))
    select_device(args.device)
    report = read_report_file(args.report_file) if args.report_file else args.report
    embedding = None
    if args.embedding:
        from .checksums import sha256_file
        from .text_encoder import read_embedding

        embedding = read_embedding(args.embedding)
        report = f"(precomputed report embedding {args.embedding.name}, sha256 {sha256_file(args.embedding)})"
    request = GenerationRequest(report, slices=args.slices, seed=args.seed, steps=args.steps, guidance=args.guidance,
                                side_guidance=args.side_guidance, finding_guidance=args.finding_guidance,
                                sampler=args.sampler, shift=args.shift, embedding=embedding)
    check_request(request, local_config(args.model, args.revision))  # seconds, before the model loads
    pipeline = load_pipeline(args, args.device, precision(args))
    plan = pipeline.plan(request)
    for notice in plan.notices:
        print(f"ctflow: note: {notice}", file=sys.stderr)
    if plan.reading:
        print(f"ctflow: the report reads as: {plan.reading}", file=sys.stderr)
    request = plan.request
    print(
        f"ctflow: {pipeline.model_id} on {pipeline.device}, seed {request.seed}, {request.steps} {request.sampler} "
        f"steps, guidance {request.guidance:g}, side guidance {plan.guidance.side:g}, finding guidance "
        f"{plan.guidance.finding:g}", file=sys.stderr,
    )
    progress = ProgressBar()
    volume = pipeline.generate(plan, on_block=progress.update)  # Ctrl-C ends it (exit 130)
    progress.finish()
    with StagedWrites(args.overwrite) as staged:  # the volume and its preview, or neither
        if args.preview:
            from .preview import preview_writer

            staged.add(args.preview, preview_writer(volume))  # rendered first: its failure leaves no volume
        stage_volume(staged, volume, args.out, args.format)
        staged.commit()
    k, j, i = volume.shape
    spacing = "x".join(f"{s:g}" for s in volume.geometry.spacing)
    print(f"wrote {args.out} ({k} slices of {j}x{i}, {spacing} mm, {progress.elapsed:.1f} s) - {SYNTHETIC_NOTICE}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    local_config(args.model, args.revision)
    pipeline = load_pipeline(args, args.device)
    print(pipeline.card.rstrip() + "\n")
    print(json.dumps(pipeline.info(), indent=2))
    return 0


def run_batch(args: argparse.Namespace) -> int:
    from . import batch

    items = batch.plan_items(batch.read_reports(args.reports), args.seeds, args.seed)
    if args.merge_only:
        batch.check_out_folder(args.out, started=True)
        rows = batch.merge_manifest(args.out, items)
        print(f"wrote {args.out / batch.MANIFEST_CSV}: {len(rows)} of {len(items)} items finished")
        return 0
    batch.check_out_folder(args.out)
    options = GenerationRequest("", slices=args.slices, steps=args.steps, guidance=args.guidance,
                                side_guidance=args.side_guidance, finding_guidance=args.finding_guidance,
                                sampler=args.sampler, shift=args.shift)
    out = batch.BatchFolder(args.out, args.format)
    sampling = batch.sampling_settings(options, local_config(args.model, args.revision), out.suffix)
    out.check_settings(sampling, batch.SAMPLING_SETTINGS)  # a resume with other options: refused before the load
    out.check_resume(items, args.slices)
    rank, world, local_rank = batch.rank_and_world()
    device = args.device
    if local_rank is not None and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{local_rank}"  # torchrun: one GPU per rank
    pipeline = load_pipeline(args, device, precision(args))
    if args.compile:
        pipeline.compile()
    mine = len(batch.shard(items, rank, world))
    print(f"ctflow: rank {rank}/{world}: {mine} of {len(items)} items on {pipeline.device} -> {args.out}", file=sys.stderr)
    progress = ProgressBar()

    def on_item(item, status, result) -> None:
        done = len(result.made) + len(result.skipped) + len(result.failed)
        eta = progress.elapsed / max(len(result.made), 1) * (mine - done) if result.made else 0.0
        progress.show("item", done, mine, f"{item.name} {status}, {progress.elapsed:.0f} s, ETA {eta:.0f} s")

    try:
        result = batch.run_batch(pipeline, items, out, options, rank, world, on_item=on_item)
    except KeyboardInterrupt as exc:
        progress.close()
        print(f"\nctflow: {stopped(exc)}; finished items are kept, run the same command again to resume",
              file=sys.stderr)
        return exit_code(exc)
    progress.close()
    for name, message in result.failed.items():
        print(f"ctflow: error: {name}: {message}", file=sys.stderr)
    merged = f"manifest {args.out / batch.MANIFEST_CSV}" if result.merged else \
        f"nothing written ({args.out} removed again)" if not args.out.exists() else \
        "manifest not merged: run the same command again to retry the failed items, or with --merge-only" \
        if result.failed else "manifest not merged yet: the last process to finish writes it (or run with --merge-only)"
    busy = f", left {len(result.busy)} to another process" if result.busy else ""
    print(f"made {len(result.made)}, skipped {len(result.skipped)} finished{busy}, failed {len(result.failed)}; "
          f"{merged} - {SYNTHETIC_NOTICE}")
    return EXIT_ERROR if result.failed else 0


def run_qa(args: argparse.Namespace) -> int:
    from . import qa

    if args.block_slices is not None and not 1 <= args.block_slices <= MAX_SLICES:
        raise CTFlowError(f"--block-slices must be a whole number from 1 to {MAX_SLICES}, not {args.block_slices}")
    files = qa.volume_files(args.volumes)
    volumes = qa.series_of(args.volumes)  # a file of a DICOM series: its reports go beside the series' folder
    single = volumes.is_file() or qa.is_dicom_folder(volumes)
    folder = args.out or (volumes.parent if single else volumes) / "qa"
    reference = qa.load_reference(args.reference) if args.reference else None
    progress, done = ProgressBar(), itertools.count(1)

    def on_volume(name: str, result: dict) -> None:
        progress.show("volume", next(done), len(files), f"{name}, {progress.elapsed:.0f} s")

    document = qa.run_qa(files, folder, args.block_slices, reference, args.overwrite, on_volume)
    progress.close()
    for name, message in document["failed"].items():
        print(f"ctflow: error: {name}: {message}", file=sys.stderr)
    print(json.dumps({"summary": document["summary"], "diversity": {k: v for k, v in document["diversity"].items()
                                                                    if k != "per_report"}}, indent=2))
    print(f"wrote {folder}/qa.json and a .qa.json and .qa.png per volume read")
    return EXIT_ERROR if document["failed"] else 0


def run_metrics(args: argparse.Namespace) -> int:
    from . import batch, metrics, qa

    select_device(args.device)  # a wrong --device fails now, not after the features of the first set
    if not args.reference and not args.labels:
        raise CTFlowError("nothing to compute: give --reference (FID) and/or --labels with --detector (text alignment)")
    if args.labels and not args.detector:
        raise CTFlowError("--labels needs --detector package.module:function")
    if not 1 <= args.slices_per_axis <= metrics.MAX_SLICES_PER_AXIS:
        raise CTFlowError(
            f"--slices-per-axis must be from 1 to {metrics.MAX_SLICES_PER_AXIS}, not {args.slices_per_axis}")
    if not metrics.MIN_SIZE <= args.size <= metrics.MAX_SIZE:
        raise CTFlowError(f"--size must be from {metrics.MIN_SIZE} to {metrics.MAX_SIZE} pixels, not {args.size}")
    if args.out:
        check_output_path(args.out, args.overwrite, suffixes=(".json",))
    # every input is found and read before the first feature is computed (a large set takes hours)
    generated_files = qa.volume_files(args.generated)
    reference_files = qa.volume_files(args.reference) if args.reference else []
    if args.labels:
        labels, detector = metrics.read_labels(args.labels), metrics.load_detector(args.detector)
        batch.read_manifest(args.generated)
    results: dict = {}
    if args.reference:
        extractor = metrics.load_feature_extractor(args.features)
        device = select_device(args.device)
        options = dict(per_axis=args.slices_per_axis, size=args.size, device=device)
        real = metrics.set_features(reference_files, extractor, **options)
        generated = metrics.set_features(generated_files, extractor, **options)
        results["fid_2_5d"] = {**metrics.fid_2_5d(real, generated), "features": getattr(extractor, "name", args.features),
                               "slices": {"reference": len(real["axial"]), "generated": len(generated["axial"])}}
    if args.labels:
        results["text_alignment"] = metrics.batch_alignment(args.generated, labels, detector)
    text = json.dumps(results, indent=2)
    if args.out:
        atomic_write(args.out, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"), overwrite=args.overwrite)
    print(text)
    return 0


# -- the published CTFlow checkpoint (docs/released_model.md) ------------------------------------------------

def add_released_commands(commands) -> None:
    released = commands.add_parser("import-released", help="make a model folder of the published CTFlow checkpoint")
    released.add_argument("--denoiser", required=True,
                          help="FOLDER or hub id, e.g. EnyaWoooo/CTFlow/checkpoint-680000/denoiser_ema[@REV]")
    released.add_argument("--vae", required=True,
                          help="FOLDER or hub id, e.g. black-forest-labs/FLUX.1-schnell/vae[@REV]")
    released.add_argument("--text-encoder", required=True, type=Path, help="folder made by `ctflow convert-ct-clip`")
    released.add_argument("--out", required=True, type=Path, help="model folder to create")
    released.add_argument("--spacing", type=float, nargs=3, metavar=("I", "J", "K"),
                          help="voxel spacing in mm (default: inferred)")
    released.add_argument("--pixel-range", type=float, nargs=2, metavar=("LOW", "HIGH"), default=(0.0, 1.0),
                          help="VAE image values of HU -1000 and +1000 (default: 0 1, inferred)")
    released.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    released.set_defaults(run=run_import_released)
    convert = commands.add_parser("convert-ct-clip",
                                  help="CT-CLIP checkpoint -> text-encoder folder (BERT, safetensors)")
    convert.add_argument("checkpoint", type=Path,
                         help="CT-CLIP checkpoint (.pt; read with torch.load(weights_only=True))")
    convert.add_argument("--tokenizer", required=True,
                         help="CXR-BERT tokenizer folder or hub id (microsoft/BiomedVLP-CXR-BERT-specialized)")
    convert.add_argument("--out", required=True, type=Path, help="text-encoder folder to create")
    convert.add_argument("--heads", type=int, help="attention heads (default: hidden size / 64, as CXR-BERT)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    convert.set_defaults(run=run_convert_ct_clip)


def run_import_released(args: argparse.Namespace) -> int:
    from .released import RELEASED_SPACING, import_released

    folder = import_released(args.denoiser, args.vae, args.text_encoder, args.out, args.overwrite,
                             tuple(args.spacing) if args.spacing else RELEASED_SPACING, tuple(args.pixel_range))
    print(f"wrote {folder}: run it with `ctflow generate --model {folder} --report-file REPORT.txt --out ct.nii.gz`")
    return 0


def run_convert_ct_clip(args: argparse.Namespace) -> int:
    from .ct_clip import convert_ct_clip_text
    from .released import resolve_source

    tokenizer, _ = resolve_source(args.tokenizer, "--tokenizer", ("*.json", "*.txt"))
    folder = convert_ct_clip_text(args.checkpoint, tokenizer, args.out, args.heads, args.overwrite)
    print(f"wrote {folder}: pass it to `ctflow import-released --text-encoder {folder}`")
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from .worker import main as serve

    return serve([])


class ProgressBar:
    """One line per update on stderr: blocks done, slices, elapsed time and ETA."""

    def __init__(self, width: int = 24) -> None:
        self.width = width
        self.started = time.perf_counter()
        self.interactive = sys.stderr.isatty()
        self.last: DecodedBlock | None = None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def update(self, block: DecodedBlock) -> None:
        self.last = block
        self.show("block", block.blocks_done, block.blocks_expected,
                  f"{block.stop} slices, {block.elapsed_s:.1f} s, ETA {block.eta_s:.0f} s")

    def show(self, unit: str, done: int, total: int, detail: str) -> None:
        filled = round(self.width * done / max(total, 1))
        line = f"{unit} {done}/{total} [{'#' * filled}{'.' * (self.width - filled)}] {detail}"
        print(f"\r{line}" if self.interactive else line, end="" if self.interactive else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.interactive:
            print(file=sys.stderr)

    def finish(self) -> None:
        """The run is complete: the block count was an estimate (a volume may end where a block would start)."""
        if self.last is not None and self.last.blocks_expected != self.last.blocks_done:
            self.update(dataclasses.replace(self.last, blocks_expected=self.last.blocks_done, eta_s=0.0))
        self.close()


def load_pipeline(args: argparse.Namespace, device: str, dtype: torch.dtype | None = None) -> CTFlowPipeline:
    """The model of --model/--revision; only now are transformers and diffusers imported (seconds a refused
    request does not wait for)."""
    return CTFlowPipeline.from_pretrained(args.model, revision=args.revision, device=device, dtype=dtype)


if __name__ == "__main__":
    sys.exit(main())
