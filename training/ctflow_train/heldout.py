"""Held-out report phrasings: the finding study's second report set, in a radiologist's own words.

The cohort's report writer (reports.py) words every report from a few templates, and a model trained on them may
follow those templates and nothing else. A user writes otherwise: synonyms (hydrothorax, airspace opacity,
adenopathy), radiologists' abbreviations (RLL, LUL, GGO), measurements in mm or cm, "no evidence of", "resolved",
the finding in the Impressions alone, the Impressions first. heldout_reports.json holds such cases, each with its
counterpart (the same report with that finding negated or resolved) and the labels a detector should read from
each. No training data may use them; they share no sentence with the writer (Testing/training/test_heldout.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ctflow.errors import CTFlowError

from .findings import CODES, LOBES, SIDES

DEFAULT = Path(__file__).with_name("heldout_reports.json")


@dataclass(frozen=True)
class HeldOutCase:
    name: str
    finding: str  # a findings.CODES name
    side: str | None  # "right" | "left" where the report puts it on one side
    lobe: str | None  # as reports name a lobe ("right lower lobe"), where the report names one
    report: str  # describes the finding
    negated: str  # the same report with the finding negated or resolved: the finding absent


def load_heldout(path: str | Path = DEFAULT) -> list[HeldOutCase]:
    """The cases of a held-out file, checked: known findings, sides and lobes, and a lobe on its own side."""
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))["cases"]
        cases = [HeldOutCase(**row) for row in rows]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CTFlowError(f"{path} is not a held-out report file: {exc}") from exc
    for case in cases:
        if case.finding not in CODES:
            raise CTFlowError(f"{path}: case {case.name} names an unknown finding {case.finding!r}")
        if case.side not in (None, *SIDES):
            raise CTFlowError(f"{path}: case {case.name} has side {case.side!r}, not right, left or null")
        if case.lobe is not None and (case.lobe not in LOBES.values() or case.side != case.lobe.split(" ")[0]):
            raise CTFlowError(f"{path}: case {case.name} has lobe {case.lobe!r}, not a lobe of its side {case.side!r}")
        if not case.report.strip() or case.report == case.negated:
            raise CTFlowError(f"{path}: case {case.name} needs a report and a different negated counterpart")
    if len({case.name for case in cases}) != len(cases):
        raise CTFlowError(f"{path}: two cases share a name")
    return cases
