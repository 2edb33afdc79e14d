"""The held-out report phrasings: well-formed, and out of the cohort writer's reach."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest

from ctflow.errors import CTFlowError
from ctflow.report import parse_report
from ctflow_train import findings, paraphrase, reports
from ctflow_train.heldout import load_heldout

SENTENCE_END = re.compile(r"(?<=[.;:])\s+|\n")
NUMBERED = re.compile(r"^\d+\.\s*")


def sentences(text: str) -> set[str]:
    """A report's sentences, without section headers or list numbers, lower case."""
    text = re.sub(r"(Findings|Impressions):", " ", text)
    return {NUMBERED.sub("", s).strip().lower() for s in SENTENCE_END.split(text) if s.strip()}


def parameter_pools(numbers: list[float]) -> dict[str, dict[str, list]]:
    """Finding -> parameter -> every value it can take: the categorical ones, and the given measurements."""
    lobes, sides = list(findings.LOBES.values()), ["right", "left", "bilateral"]
    grades, severities = list(findings.GRADES), ["mild", "moderate", "severe", "extensive"]
    nodes = [[{"station": s, "short_axis_mm": n}] for s in findings.NODE_STATIONS for n in numbers]
    return {  # parameter -> values, for the keys each finding's phrases read
        "cardiomegaly": {"cardiothoracic_ratio": [r / 100 for r in range(30, 100)]},
        "pericardial_effusion": {"grade": grades, "thickness_mm": numbers},
        "arterial_calcification": {"severity": severities},
        "lymphadenopathy": {"nodes": nodes},
        "medical_material": {"device": ["pacemaker", "port"], "side": sides},
        "emphysema": {"severity": severities},
        "nodule": {"diameter_mm": numbers, "lobe": lobes},
        "consolidation": {"lobe": lobes, "air_bronchogram": [True, False]},
        "ground_glass": {"lobe": lobes},
        "atelectasis": {"kind": ["linear", "dependent"], "lobe": lobes, "side": sides},
        "pleural_effusion": {"grade": grades, "side": sides},
    }


def writer_sentences(numbers: list[float]) -> set[str]:
    """Every sentence reports.py can write, for every categorical value and for the given measurements."""
    pools = parameter_pools(numbers)
    assert set(pools) == set(reports.FINDINGS) == set(reports.IMPRESSIONS), "a finding the test does not enumerate"
    written = set(itertools.chain(*reports.ROUTINE.values(), reports.NORMAL_IMPRESSIONS))
    for name, pool in pools.items():
        present, absent = reports.FINDINGS[name]
        written.update(absent)
        for values in itertools.product(*pool.values()):
            params = dict(zip(pool, values))
            written.update(present(params))
            written.add(reports.IMPRESSIONS[name](params) + ".")
    return {s for text in written for s in sentences(text)}


def test_cases_cover_the_study():
    cases = load_heldout()
    covered = {case.finding for case in cases}
    assert len(covered) >= 8, covered
    for finding in findings.SIDED:  # a sided finding is asked for on both sides
        assert {case.side for case in cases if case.finding == finding} >= {"right", "left"}, finding
    assert sum(case.lobe is not None for case in cases) >= 6
    for case in cases:
        for text in (case.report, case.negated):
            parsed = parse_report(text)
            assert parsed.impressions, case.name  # both sections, as in CT-RATE
        assert len(case.report.split()) < 120, case.name  # far inside the text encoder's 256 tokens


def test_the_writer_cannot_write_them():
    cases = load_heldout()
    numbers = sorted({float(n) for case in cases for n in re.findall(r"\d+(?:\.\d+)?", case.report + case.negated)})
    written = writer_sentences(numbers + list(range(1, 61)))
    assert {"no pleural effusion.", "cardiomegaly is noted."} <= written  # the enumeration reaches the writer
    for case in cases:
        for text in (case.report, case.negated):
            shared = sentences(text) & written
            assert not shared, f"{case.name} shares {shared} with reports.py"
    rng = np.random.default_rng(0)  # and whole reports the writer draws, with the cases' findings present or absent
    absent = {name: {"present": False} for name in reports.FINDINGS}
    drawn = [reports.compose_report(absent, rng).text for _ in range(50)]
    assert not {text for case in cases for text in (case.report, case.negated)} & set(drawn)


def test_the_report_variants_do_not_write_them_either():
    """The variants flow training may read (paraphrase.py) are drawn, not enumerable: 3000 reports of random
    findings, each present or absent, with the cases' own measurements among the values."""
    cases = load_heldout()
    numbers = sorted({float(n) for case in cases for n in re.findall(r"\d+(?:\.\d+)?", case.report + case.negated)})
    pools, rng = parameter_pools(numbers + list(range(1, 61))), np.random.default_rng(1)
    held_out = {s for case in cases for text in (case.report, case.negated) for s in sentences(text)}
    written = set()
    for _ in range(3000):
        drawn = {name: {"present": bool(rng.random() < 0.5),
                        **{key: values[rng.integers(len(values))] for key, values in pool.items()}}
                 for name, pool in pools.items()}
        written |= sentences(paraphrase.paraphrase(drawn, rng).text)
    assert {"no pleural effusion.", "rll consolidation."} & written == {"no pleural effusion."}  # reached, not all
    assert len(written) > 2000
    assert not held_out & written, sorted(held_out & written)


@pytest.mark.parametrize("change, message", [
    ({"finding": "pneumothorax"}, "unknown finding"),
    ({"side": "both"}, "side"),
    ({"side": "left", "lobe": "right lower lobe"}, "not a lobe of its side"),
    ({"negated": None}, "different negated"),
])
def test_bad_cases_are_refused(tmp_path, change, message):
    case = json.loads(load_heldout.__globals__["DEFAULT"].read_text())["cases"][3]
    case = {**case, **change}
    if case["negated"] is None:
        case["negated"] = case["report"]
    path = tmp_path / "cases.json"
    path.write_text(json.dumps({"cases": [case]}))
    with pytest.raises(CTFlowError, match=message):
        load_heldout(path)


def test_a_file_that_is_not_one_is_refused(tmp_path):
    path = tmp_path / "cases.json"
    path.write_text("[1, 2]")
    with pytest.raises(CTFlowError, match="not a held-out report file"):
        load_heldout(path)
