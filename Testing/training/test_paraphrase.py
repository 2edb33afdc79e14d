"""Report variants: the same findings in other words, varied, and the same words for a patient's twins."""

from __future__ import annotations

import re

import pytest

from ctflow.report import parse_report, without_findings
from ctflow_train.paraphrase import ABBREVIATIONS, OTHER_ROUTINE, paraphrase, variant_rng

DRAWN = {  # a cohort patient's findings as its label file gives them
    "cardiomegaly": {"present": True, "scale": 1.16, "cardiothoracic_ratio": 0.608},
    "pericardial_effusion": {"present": False},
    "pleural_effusion": {"present": True, "grade": "moderate", "side": "left", "depth_mm": 20.0},
    "atelectasis": {"present": False},
    "consolidation": {"present": True, "lobe": "right lower lobe", "air_bronchogram": True},
    "ground_glass": {"present": False},
    "nodule": {"present": True, "lobe": "left upper lobe", "diameter_mm": 7.0},
    "emphysema": {"present": False},
    "lymphadenopathy": {"present": False},
    "arterial_calcification": {"present": True, "severity": "moderate"},
    "medical_material": {"present": False},
}
SENTENCE = re.compile(r"(?<=\.)\s+(?=[A-Z0-9])")


def sentences(text: str) -> set[str]:
    return {s.strip() for s in SENTENCE.split(text.replace("Impressions:", "").replace("Findings:", "")) if s.strip()}


def test_variants_say_the_drawn_facts_in_many_ways():
    texts = [paraphrase(DRAWN, variant_rng("synth_0_00001", k)).text for k in range(40)]
    assert len(set(texts)) == 40
    for text in texts:
        report = parse_report(text)
        assert report.findings and report.impressions  # both sections, as the pipeline reads them
        assert re.search(r"\bleft\b", text, re.I) and not re.search(r"\bright\b[^.]*(effusion|hydrothorax|pleural)", text, re.I)
        assert re.search(r"right lower lobe|RLL|lower lobe of the right lung", text, re.I)  # the lobe, in some style
        assert re.search(r"left upper lobe|LUL|upper lobe of the left lung", text, re.I)
        assert re.search(r"7 mm|0\.7 cm", text)
        negated = re.search(r"(no|negative for|without)[^.]*emphysema", text, re.I)
        assert "emphysema" not in text.lower() or negated  # absent: negated or unsaid
    joined = " ".join(texts)
    assert "RLL" in joined and "right lower lobe" in joined.lower() and "0.7 cm" in joined and "7 mm" in joined
    assert "No evidence of" in joined and "1. " in joined  # negations and Impressions lists of several kinds
    assert any("Findings: " in t and not re.search(r"nodule", t.split("Impressions:")[0], re.I) for t in texts)  # in
    # the Impressions alone in some variants


@pytest.mark.parametrize("finding, flipped", [
    ("emphysema", {"present": True, "severity": "mild"}),
    ("pleural_effusion", {"present": True, "grade": "moderate", "side": "right"}),  # moved to the other side
    ("consolidation", {"present": False}),
])
def test_a_twins_variant_differs_in_the_flipped_findings_words_alone(finding, flipped):
    twin = {**DRAWN, finding: flipped}
    words = {"emphysema": "emphysema", "pleural_effusion": "pleural|hydrothorax",
             "consolidation": "consolidat"}[finding]
    for k in range(20):
        a = paraphrase(DRAWN, variant_rng("synth_0_00001", k)).text
        b = paraphrase(twin, variant_rng(f"synth_0_00001_with_{finding}", k)).text
        assert a != b
        changed = sentences(a) ^ sentences(b)
        assert all(re.search(words, s, re.I) or re.match(r"\d+\.", s) for s in changed), changed


def test_a_normal_heart_s_ratio_is_stated_in_some_variants_and_never_read_as_cardiomegaly():
    measured = {**DRAWN, "cardiomegaly": {"present": False, "cardiothoracic_ratio": 0.471}}
    texts = [paraphrase(measured, variant_rng("synth_0_00002", k)).text for k in range(60)]
    stated = [text for text in texts if "cardiothoracic ratio" in text.lower()]
    assert 5 < len(stated) < 50 and all("0.47" in text for text in stated)
    assert not any(re.search(r"cardiomegaly|heart is enlarged|cardiac enlargement|enlarged cardiac", text, re.I)
                   for text in stated)
    unmeasured = [paraphrase({**DRAWN, "cardiomegaly": {"present": False}}, variant_rng("synth_0_00002", k)).text
                  for k in range(60)]  # a cohort made before the ratio was recorded: never a ratio
    assert not any("cardiothoracic" in text.lower() for text in unmeasured)


def test_brief_variants_negate_a_few_findings_and_every_negation_reads_as_none():
    normal = {topic: {"present": False} for topic in DRAWN}
    reports = [paraphrase(normal, variant_rng("synth_0_00004", k)) for k in range(100)]
    routine = {sentence for options in OTHER_ROUTINE.values() for sentence in options}
    brief = [r for r in reports if not any(sentence in r.findings for sentence in routine)]
    assert 20 <= len(brief) <= 60  # about a third, and a few long ones that drew no routine sentence
    assert any(2 <= len(sentences(r.findings)) <= 6 for r in brief)  # a short report of a few negations
    assert any(" without " in r.findings for r in reports) and any("Negative for" in r.findings for r in reports)
    for report in reports:  # the parser reads each form as a negation: finding guidance leaves every part in
        assert without_findings(report) == report, report.text


def test_abbreviations_name_every_lobe_the_cohort_draws():
    from ctflow_train.findings import LOBES

    assert set(ABBREVIATIONS) == set(LOBES.values())
    assert variant_rng("synth_0_00003", 1).random() != variant_rng("synth_0_00003", 2).random()
    assert variant_rng("synth_0_00003_without_nodule", 1).random() == variant_rng("synth_0_00003", 1).random()
