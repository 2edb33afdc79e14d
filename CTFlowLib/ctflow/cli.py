"""The `ctflow` command: generate a synthetic CT from a report, or describe a model.

Bad input ends with one line on stderr and a non-zero exit; no traceback, no partial file.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from . import __version__
from .errors import CTFlowError, ReportError
from .io import check_output_path, write_volume
from .pipeline import Block, CTFlowPipeline, GenerationRequest
from .volume import SYNTHETIC_NOTICE

EXIT_ERROR, EXIT_CANCELLED = 1, 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_third_party_logs()
    try:
        return args.run(args)
    except CTFlowError as exc:
        print(f"ctflow: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\nctflow: cancelled; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    except OSError as exc:  # disk full, permission denied while writing, ...
        print(f"ctflow: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctflow", description="Synthetic chest CT from a radiology report (CTFlow).")
    parser.add_argument("--version", action="version", version=f"ctflow {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate a synthetic CT volume from a report")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--report", help="report text (Findings: ... Impressions: ...)")
    source.add_argument("--report-file", type=Path, help="UTF-8 text file holding the report")
    generate.add_argument("--out", required=True, type=Path, help="output volume: .nii.gz, .nii or .nrrd")
    generate.add_argument("--slices", type=int, help="exact slice count (default: the model decides where to end)")
    generate.add_argument("--seed", type=int, help="random seed (default: a fresh one, recorded in the file)")
    generate.add_argument("--steps", type=int, help="sampling steps per block (default: the model's)")
    generate.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = none)")
    generate.add_argument("--sampler", choices=("euler", "heun"), help="ODE solver (default: the model's)")
    generate.add_argument("--shift", type=float, help="time shift of the sampling schedule (default: the model's)")
    add_model_arguments(generate)
    generate.add_argument("--preview", type=Path, help="also write a PNG of the mid-planes in lung and soft-tissue windows")
    generate.add_argument("--overwrite", action="store_true", help="replace existing output files")
    generate.set_defaults(run=run_generate)

    info = commands.add_parser("info", help="print the model card, parameter counts and device")
    add_model_arguments(info)
    info.set_defaults(run=run_info)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder or hub id org/name (default: the bundled demo model)")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit) when --model is a hub id")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run (default: auto)")


def run_generate(args: argparse.Namespace) -> int:
    check_output_path(args.out, args.overwrite)  # fail before minutes of work, not after
    if args.preview:
        check_output_path(args.preview, args.overwrite, suffixes=(".png",))
    report = read_report_file(args.report_file) if args.report_file else args.report
    pipeline = CTFlowPipeline.from_pretrained(args.model, revision=args.revision, device=args.device)
    plan = pipeline.plan(GenerationRequest(
        report, slices=args.slices, seed=args.seed, steps=args.steps, guidance=args.guidance,
        sampler=args.sampler, shift=args.shift,
    ))
    for notice in plan.notices:
        print(f"ctflow: note: {notice}", file=sys.stderr)
    request = plan.request
    print(
        f"ctflow: {pipeline.model_id} on {pipeline.device}, seed {request.seed}, {request.steps} {request.sampler} "
        f"steps, guidance {request.guidance:g}", file=sys.stderr,
    )
    progress = ProgressBar()
    volume = pipeline.generate(plan, cancel=threading.Event(), on_block=progress.update)
    progress.close()
    write_volume(volume, args.out, overwrite=args.overwrite)
    if args.preview:
        from .preview import write_preview

        write_preview(volume, args.preview, overwrite=args.overwrite)
    k, j, i = volume.shape
    spacing = "x".join(f"{s:g}" for s in volume.geometry.spacing)
    print(f"wrote {args.out} ({k} slices of {j}x{i}, {spacing} mm, {progress.elapsed:.1f} s) - {SYNTHETIC_NOTICE}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    pipeline = CTFlowPipeline.from_pretrained(args.model, revision=args.revision, device=args.device)
    print(pipeline.card.rstrip() + "\n")
    print(json.dumps(pipeline.info(), indent=2))
    return 0


def read_report_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ReportError(f"report file {path} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise ReportError(f"report file {path} is not UTF-8 text") from exc
    except OSError as exc:
        raise ReportError(f"cannot read report file {path}: {exc.strerror}") from exc


class ProgressBar:
    """One line per update on stderr: blocks done, slices, elapsed time and ETA."""

    def __init__(self, width: int = 24) -> None:
        self.width = width
        self.started = time.perf_counter()
        self.interactive = sys.stderr.isatty()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def update(self, block: Block) -> None:
        filled = round(self.width * block.blocks_done / max(block.blocks_expected, 1))
        line = (
            f"block {block.blocks_done}/{block.blocks_expected} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{block.stop} slices, {block.elapsed_s:.1f} s, ETA {block.eta_s:.0f} s"
        )
        print(f"\r{line}" if self.interactive else line, end="" if self.interactive else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.interactive:
            print(file=sys.stderr)


def quiet_third_party_logs() -> None:
    """transformers/diffusers print load progress bars and advice that mean nothing to a ctflow user."""
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
