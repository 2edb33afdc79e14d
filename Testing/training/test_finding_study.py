"""The finding study: latent grid features, probes, mirrored differences, sides, and the study on a tiny model."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from ctflow_train import export, finding_study, train_flow

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def test_grid_features_are_the_mean_and_spread_of_each_cell():
    latents = torch.zeros(16, 4, 8, 8)
    latents[:8, 2] = 1.0  # channel 2 bright in the upper half of the body
    latents[:, 1, :, 0] = 3.0  # channel 1: a bright column in every slice, spread within the cells that hold it
    mean, spread = finding_study.grid_features(latents).reshape(2, 4, *finding_study.GRID)
    assert np.all(mean[2, :4] == 1.0) and np.all(mean[2, 4:] == 0.0) and np.all(spread[2] == 0.0)
    assert np.all(spread[1, :, 0] == 0.0) and mean[1].sum() == 3.0 * 8 * 8


def test_probe_learns_a_finding_and_cross_validation_keeps_twins_apart():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(80, 200)), rng.random(80) < 0.5
    x[np.ix_(y, np.arange(20))] += 0.8  # the finding shifts a region's averages a little
    groups = [f"p{i // 2}" for i in range(80)]
    assert finding_study.cross_validated_accuracy(x, y, groups) > 0.8
    probe = finding_study.fit_probe(x, y)
    assert ((probe.probability(x) > 0.5) == y).mean() > 0.9
    # a patient and his twin are near copies with one label: only a split that keeps them together is honest
    noise, labels = rng.normal(size=(40, 200)), rng.random(40) < 0.5
    twins = np.repeat(noise, 2, axis=0) + 0.05 * rng.normal(size=(80, 200))
    together = finding_study.cross_validated_accuracy(twins, np.repeat(labels, 2), groups)
    apart = finding_study.cross_validated_accuracy(twins, np.repeat(labels, 2), [str(i) for i in range(80)])
    assert together < 0.75 and apart > 0.9


def test_mirrored_difference_is_the_features_minus_those_of_the_mirrored_volume():
    latents = torch.from_numpy(np.random.default_rng(0).normal(size=(16, 4, 16, 16))).float()
    features = finding_study.grid_features(latents)
    expected = features - finding_study.grid_features(latents.flip(-1))
    assert np.allclose(finding_study.mirrored_difference(features), expected, atol=1e-6)
    assert np.allclose(finding_study.mirrored_difference(np.stack([features, features]))[1], expected, atol=1e-6)
    symmetric = torch.cat([latents[..., :8], latents[..., :8].flip(-1)], -1)
    assert np.abs(finding_study.mirrored_difference(finding_study.grid_features(symmetric))).max() < 1e-6


def test_a_finding_is_on_one_side_by_its_side_or_its_lobe():
    assert finding_study.side({"present": True, "side": "left", "grade": "small"}) == "left"
    assert finding_study.side({"present": True, "side": "bilateral"}) is None
    assert finding_study.side({"present": True, "lobe": "right middle lobe"}) == "right"
    assert finding_study.side({"present": False, "side": "left"}) is None
    assert finding_study.side({"present": True, "scale": 1.2}) is None


def test_finding_study_probes_the_cohort_and_counts_generated_volumes(tiny, data, vae_run, cache, tmp_path):
    flow = tmp_path / "flow"
    train_flow.train(tiny.flow_run(cache, flow, steps=2))
    parser = argparse.ArgumentParser()
    export.configure(parser)
    args = parser.parse_args(["--flow", str(flow), "--vae", str(vae_run[0]), "--cache", str(cache),
                              "--out", str(tmp_path / "model"), "--steps", "2", "--calibration-cases", "2"])
    export.export(export.ExportRun.from_args(args))
    parser = argparse.ArgumentParser()
    finding_study.configure(parser)
    args = parser.parse_args(["--model", str(tmp_path / "model"), "--data", str(data), str(data),
                              "--latents", str(cache), str(cache), "--seeds", "2", "--steps", "2",
                              "--out", str(tmp_path / "findings.json")])
    assert finding_study.run(args) == 0
    result = json.loads((tmp_path / "findings.json").read_text())
    studied = set(finding_study.STUDIED)
    assert all(d["volumes"] == 6 and d["patients"] == 3 and d["with_finding"] in (2, 4)
               for d in result["detectors"].values())
    for key in ("shown_when_asked", "shown_when_negated", "asking_raised_probability", "own_report_ranked_first"):
        assert set(result[key]) == studied and all(0 <= n <= 2 for n in result[key].values())
    values = result["values"]
    for finding in studied:  # recount two of them from the stored probabilities
        asked, negated = values[finding], values["normal"]
        raised = sum(a[finding] > n[finding] for a, n in zip(asked, negated))
        assert result["asking_raised_probability"][finding] == raised
        firsts = sum(max(values, key=lambda kind: values[kind][s][finding]) == finding for s in range(2))
        assert result["own_report_ranked_first"][finding] == firsts
    assert set(result["values"]) == studied | {"normal"} and len(result["values"]["normal"]) == 2
    # sides: the cache holds patients 0-2, so pleural effusion (patients 1, 3) is seen on the right only
    assert result["detectors"]["pleural_effusion"]["side"] == {"skipped": "the cached volumes show it on one side only"}
    side = result["detectors"]["consolidation"]["side"]
    assert side["right"] == 2 and side["left"] == 2 and side["always_the_commoner_side"] == 0.5
    sided = result["sided_reports"]
    assert set(sided) == set(result["at_reported_side"]) == set(result["side_values"]) == {"consolidation"}
    assert "right lower lobe" in sided["consolidation"]["right"] and "left lower lobe" in sided["consolidation"]["left"]
    # its first patient has it on the right
    assert result["reports"]["consolidation"] == sided["consolidation"]["right"]
    right = result["side_values"]["consolidation"]
    assert result["at_reported_side"]["consolidation"] == {"right": sum(p > 0.5 for p in right["right"]),
                                                           "left": sum(p < 0.5 for p in right["left"])}
    more_right = sum(a > b for a, b in zip(right["right"], right["left"]))
    assert result["right_report_more_right"]["consolidation"] == more_right
    assert all(0 <= p <= 1 for ps in result["values"].values() for v in ps for p in v.values())
    assert "No emphysema" in result["reports"]["normal"] or "emphysema" in result["reports"]["normal"].lower()
    assert "pleural effusion" in result["reports"]["pleural_effusion"].lower()
    args.latents = args.latents[:1]
    with pytest.raises(ValueError, match="one --latents cache per --data folder"):
        finding_study.run_study(args)
    args.data, args.latents = [data], [tiny.store_of_another_vae(cache, tmp_path)]
    with pytest.raises(ValueError, match="not encoded by the model's autoencoder"):
        finding_study.run_study(args)
