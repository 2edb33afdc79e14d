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

from .dataset import patient_of, read_index


@dataclass(frozen=True)
class Case:
    name: str
    hu: np.ndarray  # int16 [S, H, W], slice 0 most superior, white end slices included
    report: Report
    content_slices: int  # slices before the white end marker
    spacing: tuple[float, float, float]  # (i, j, k) mm
    finding_mask: np.ndarray | None = None  # uint8 [content_slices, H, W] findings.CODES, when asked for and written


def list_cases(folder: str | Path, holdout: int = 0, limit: int = 0) -> tuple[list[dict], list[dict]]:
    """(training entries, held-out entries) of a prepared folder's index: the last `holdout` patients of the index
    are held out with every volume of theirs (a cohort twin, a CT-RATE patient's other scans), so no volume of a
    held-out patient is trained on; with `limit`, only the first `limit` training patients are trained on, again
    with every volume of theirs, so a twin is never cut from its patient."""
    entries = read_index(folder)
    patients = list(dict.fromkeys(patient_of(entry["name"]) for entry in entries))  # in the order of the index
    if holdout < 0 or holdout >= len(patients):
        raise CTFlowError(f"holdout {holdout} must leave at least one of the {len(patients)} patients for training")
    trained = set(patients[:len(patients) - holdout][:limit or None])
    held = set(patients[len(patients) - holdout:])
    return ([entry for entry in entries if patient_of(entry["name"]) in trained],
            [entry for entry in entries if patient_of(entry["name"]) in held])


def load_case(folder: str | Path, entry: dict, masks: bool = False) -> Case:
    """One case; with `masks`, its finding mask too, which the cohort writes and CT-RATE does not have."""
    volume = read_volume(Path(folder) / entry["volume"])
    report = Report(findings=entry["findings"], impressions=entry["impressions"])
    mask = None
    if masks:
        if not entry.get("mask"):
            raise CTFlowError(f"{entry['name']} in {folder} has no finding mask (masks/ is written by "
                              "ctflow-train cohort since 2026-11-30; make the cohort again)")
        mask = read_volume(Path(folder) / entry["mask"]).hu.astype(np.uint8)
    return Case(entry["name"], volume.hu, report, int(entry["slices"]), tuple(entry["spacing"]), mask)


def load_cases(folder: str | Path, entries: list[dict], masks: bool = False) -> list[Case]:
    return [load_case(folder, entry, masks) for entry in entries]
