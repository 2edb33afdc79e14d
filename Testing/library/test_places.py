"""Where each text of a report applies: the halves, and with a model's lobe prior each lobe of a half (places.py);
the prior read from a model folder, checked as hostile input; a lobar report's finding asked for in its lobe alone."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ctflow
from ctflow.checksums import write_checksums
from ctflow.errors import CorruptModelError
from ctflow.places import HALF_LOBES, LOBE_FILE, OUTSIDE, LobePrior, Places
from ctflow.report import half_reports, lobe_report, parse_report

LOBAR = "Findings: Consolidation in the right lower lobe. Small left pleural effusion.\nImpressions: Pneumonia."
SIZE = 8  # the tiny model's latents


def shares(levels: int = 4, size: int = SIZE) -> dict[str, torch.Tensor]:
    """A lobe prior as a cohort could give it: the upper lobes in the front rows of their half at the upper levels
    (with the middle lobe's share), the lower ones in the back rows from the second level; no lobe at the last."""
    prior = {name: torch.zeros(levels, size, size) for half in HALF_LOBES.values() for name in half}
    right, left, front, back = slice(0, size // 2), slice(size // 2, None), slice(0, size // 2), slice(size // 2, None)
    prior["right upper lobe"][: levels // 2, front, right] = 0.9
    prior["right middle lobe"][levels // 4: levels // 2, front, right] = 0.1
    prior["right lower lobe"][levels // 4: levels - 1, back, right] = 0.8
    prior["left upper lobe"][: levels // 2, front, left] = 0.7
    prior["left lower lobe"][levels // 4: levels - 1, back, left] = 0.6
    return prior


def with_prior(model, folder, prior: dict[str, torch.Tensor]):
    copy = shutil.copytree(model, folder)
    save_file(prior, copy / LOBE_FILE)
    write_checksums(copy)
    return copy


def test_a_lobe_report_keeps_what_lies_in_its_lobes():
    report = parse_report(LOBAR)
    lower, upper = lobe_report(report, frozenset({"lower"})), lobe_report(report, frozenset({"upper"}))
    assert "Consolidation in the right lower lobe." in lower.findings and "Pneumonia." in lower.impressions
    assert "onsolidation" not in upper.findings and "left pleural effusion" in upper.findings
    assert lobe_report(report, frozenset()) == upper  # outside every lobe: what names no lobe
    # a part without a lobe goes with the lobe the report gives its finding
    report = parse_report("Findings: Atelectasis in the left lower lobe.\nImpressions: Dependent atelectasis.")
    assert lobe_report(report, frozenset({"upper"})).impressions == ""
    assert lobe_report(report, frozenset({"lower"})).impressions == "Dependent atelectasis."


def test_without_a_prior_each_half_reads_its_half_of_the_report():
    report = parse_report(LOBAR)
    places = Places.of(report, lambda part: part.text)
    assert places.texts == tuple(half.text for half in half_reports(report))
    weights = places.weights(0, torch.Size((2, 3, 4)))
    assert torch.equal(weights[0], torch.tensor([1.0, 1, 0, 0]).expand(2, 3, 4))
    assert torch.equal(weights[1], 1 - weights[0])


def test_with_a_prior_a_lobe_s_finding_is_read_in_that_lobe_alone():
    report = parse_report(LOBAR)
    prior = LobePrior(shares())
    places = Places.of(report, lambda part: part.text, prior, slices=16)  # 4 levels of 4 slices
    right, left = places.rows
    assert "right lower lobe" in places.texts[right["right lower lobe"]]
    assert all("onsolidation" not in places.texts[row] for region, row in right.items() if region != "right lower lobe")
    assert all("onsolidation" not in places.texts[row] for row in left.values())
    assert len(places.texts) == 3  # the right lower lobe's, the rest of the right half's, the left half's
    for first in (0, 4, 8, 12):
        weights = places.weights(first, torch.Size((4, SIZE, SIZE)))
        assert torch.allclose(weights.sum(0), torch.ones(4, SIZE, SIZE))
        lower = weights[right["right lower lobe"]]
        expected = torch.zeros(4, SIZE, SIZE)
        if first in (4, 8):  # levels 1-2: the right lower lobe's share in its quarter
            expected[:, SIZE // 2:, : SIZE // 2] = 0.8
        assert torch.allclose(lower, expected)
        assert torch.equal(weights[right[OUTSIDE]][..., SIZE // 2:], torch.zeros(4, SIZE, SIZE // 2))
    # slices past the expected body read the last level's shares (no lobe there)
    assert torch.equal(places.weights(40, torch.Size((4, SIZE, SIZE)))[right["right lower lobe"]],
                       torch.zeros(4, SIZE, SIZE))
    unlobed = Places.of(parse_report("Findings: Right pleural effusion."), lambda part: part.text, prior, 16)
    assert unlobed.texts == Places.of(parse_report("Findings: Right pleural effusion."), lambda part: part.text).texts
    assert torch.allclose(unlobed.weights(4, torch.Size((4, SIZE, SIZE))),
                          Places.of(parse_report("Findings: Right pleural effusion."),
                                    lambda part: part.text).weights(4, torch.Size((4, SIZE, SIZE))))


@pytest.mark.parametrize("damage, message", [
    (lambda p: {k: v for k, v in p.items() if k != "left lower lobe"}, "one tensor per lobe"),
    (lambda p: {**p, "extra": torch.zeros(4, SIZE, SIZE)}, "one tensor per lobe"),
    (lambda p: {**p, "right upper lobe": torch.zeros(4, SIZE, SIZE + 1)}, "not float32"),
    (lambda p: {**p, "right upper lobe": torch.zeros(4, SIZE, SIZE, dtype=torch.float64)}, "not float32"),
    (lambda p: {**p, "right upper lobe": torch.zeros(0, SIZE, SIZE)}, "not float32"),
    (lambda p: {**p, "right upper lobe": torch.full((4, SIZE, SIZE), float("nan"))}, "outside 0-1"),
    (lambda p: {**p, "right upper lobe": torch.full((4, SIZE, SIZE), 1.5)}, "outside 0-1"),
    (lambda p: {**p, "right upper lobe": torch.full((4, SIZE, SIZE), 0.9),
                "right lower lobe": torch.full((4, SIZE, SIZE), 0.9)}, "add up to more than 1"),
    (lambda p: {**p, "right upper lobe": torch.zeros(2, SIZE, SIZE)}, "differ in shape"),
])
def test_a_damaged_lobe_prior_is_refused_in_one_line(tmp_path, damage, message):
    save_file(damage(shares()), tmp_path / LOBE_FILE)
    with pytest.raises(CorruptModelError, match=message) as error:
        LobePrior.load(tmp_path, SIZE)
    assert "\n" not in str(error.value)
    (tmp_path / LOBE_FILE).write_bytes(b"not safetensors")
    with pytest.raises(CorruptModelError, match="cannot read"):
        LobePrior.load(tmp_path, SIZE)


def test_a_model_with_a_lobe_prior_asks_for_a_lobe_s_finding_in_that_lobe(tiny_model, tiny_pipeline, tmp_path):
    folder = with_prior(tiny_model, tmp_path / "lobes", shares())
    pipe = ctflow.CTFlowPipeline.from_pretrained(folder, device="cpu")
    assert pipe.lobe_prior is not None and pipe.model_sha256 != tiny_pipeline.model_sha256
    assert pipe.info()["lobe_prior"] and not tiny_pipeline.info()["lobe_prior"]
    plan = pipe.plan(ctflow.GenerationRequest(LOBAR, slices=16, side_guidance=1.0))
    places = plan.guidance.places
    assert plan.guidance.branches == 3 and plan.code_texts == places.texts  # rendered as the prompt
    assert "right lower lobe" in places.texts[places.rows[0]["right lower lobe"]]
    assert "right lower lobe" not in places.texts[places.rows[0]["right upper lobe"]]
    assert places.slices == 16  # the levels are fractions of the length asked for (else the typical one)
    assert pipe.plan(ctflow.GenerationRequest(LOBAR, side_guidance=1.0)).guidance.places.slices == pipe.config.typical_slices

    def volume(pipeline, text):
        return pipeline.generate(ctflow.GenerationRequest(text, slices=8, seed=1, steps=2, side_guidance=1.0)).hu

    assert not np.array_equal(volume(pipe, LOBAR), volume(tiny_pipeline, LOBAR))
    unlobed = "Findings: Right pleural effusion."  # names no lobe: every lobe of a half reads the half's text
    assert np.array_equal(volume(pipe, unlobed), volume(tiny_pipeline, unlobed))
    lower = "Findings: Atelectasis in both lower lobes."  # no side, but a lobe: the places differ, side guidance acts
    assert pipe.plan(ctflow.GenerationRequest(lower, side_guidance=1.0)).guidance.side == 1.0
    assert tiny_pipeline.plan(ctflow.GenerationRequest(lower, side_guidance=1.0)).guidance.side == 0.0


def test_a_lobe_file_the_checksums_do_not_list_or_that_is_damaged_is_refused(tiny_model, tmp_path):
    folder = shutil.copytree(tiny_model, tmp_path / "unlisted")
    save_file(shares(), folder / LOBE_FILE)
    with pytest.raises(CorruptModelError, match="not listed"):
        ctflow.CTFlowPipeline.from_pretrained(folder, device="cpu")
    listed = with_prior(tiny_model, tmp_path / "damaged", shares())
    save_file({**shares(), "right upper lobe": torch.full((4, SIZE, SIZE), 2.0)}, listed / LOBE_FILE)
    write_checksums(listed)
    with pytest.raises(CorruptModelError, match="outside 0-1"):
        ctflow.CTFlowPipeline.from_pretrained(listed, device="cpu")
