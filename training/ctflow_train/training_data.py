"""Prepared cases (a `cohort` or `prepare-ctrate` folder) as the trainers need them.

The last `holdout` cases of the index are kept out of training, so the autoencoder metrics are measured
on patients it never saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctflow.errors import CTFlowError
from ctflow.io import read_volume
from ctflow.report import Report

from .dataset import read_index


@dataclass(frozen=True)
class Case:
    name: str
    hu: np.ndarray  # int16 [S, H, W], slice 0 most superior, white end slices included
    report: Report
    content_slices: int  # slices before the white end marker
    spacing: tuple[float, float, float]  # (i, j, k) mm


def list_cases(folder: str | Path, holdout: int = 0) -> tuple[list[dict], list[dict]]:
    """(training entries, held-out entries) of a prepared folder's index."""
    entries = read_index(folder)
    if holdout < 0 or holdout >= len(entries):
        raise CTFlowError(f"holdout {holdout} must leave at least one of the {len(entries)} cases for training")
    return entries[: len(entries) - holdout], entries[len(entries) - holdout :]


def load_case(folder: str | Path, entry: dict) -> Case:
    volume = read_volume(Path(folder) / entry["volume"])
    report = Report(findings=entry["findings"], impressions=entry["impressions"])
    return Case(entry["name"], volume.hu, report, int(entry["slices"]), tuple(entry["spacing"]))


def load_cases(folder: str | Path, entries: list[dict]) -> list[Case]:
    return [load_case(folder, entry) for entry in entries]
