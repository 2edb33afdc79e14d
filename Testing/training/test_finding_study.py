"""finding-study: latent grid features, probes and classifiers, the anatomy prior's HU features, the choice between
latent and HU detectors, the reports it generates, its typed result, and the study on a tiny model."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ctflow import CTFlowPipeline
from ctflow import config as config_module
from ctflow.checksums import write_checksums
from ctflow.errors import CTFlowError
from ctflow.places import HALF_LOBES, LOBE_FILE
from ctflow.report import SIDE_CODE_SIZE, names_one_side, parse_report, reports_no_finding
from ctflow.sampling import FINDING_ONSET
from ctflow_train import export, train_flow
from ctflow_train.cli import main
from ctflow_train import finding_study as fs
from ctflow_train.findings import FINDINGS, LOBES
from ctflow_train.latent_store import LatentStore
from ctflow_train.reports import normal_report

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

NAMES = {"lung_upper_lobe_right": 1, "lung_middle_lobe_right": 2, "lung_lower_lobe_right": 3,
         "lung_upper_lobe_left": 4, "lung_lower_lobe_left": 5, "heart": 6, "aorta": 7, "trachea": 8, "esophagus": 9}


def test_grid_features_are_the_mean_and_spread_of_each_cell():
    latents = torch.zeros(16, 4, 8, 8)
    latents[:8, 2] = 1.0  # channel 2 bright in the upper half of the body
    latents[:, 1, :, 0] = 3.0  # channel 1: a bright column in every slice, spread within the cells that hold it
    mean, spread = fs.grid_features(latents).reshape(2, 4, *fs.GRID)
    assert np.all(mean[2, :4] == 1.0) and np.all(mean[2, 4:] == 0.0) and np.all(spread[2] == 0.0)
    assert np.all(spread[1, :, 0] == 0.0) and mean[1].sum() == 3.0 * 8 * 8


def held_out_accuracy(x, y, groups, classes=(False, True)) -> float:
    return fs.accuracy(fs.cross_validated_probabilities(x, y, groups, classes), y, classes)


def test_probe_learns_a_finding_and_cross_validation_keeps_twins_apart():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(80, 200)), rng.random(80) < 0.5
    x[np.ix_(y, np.arange(20))] += 0.8  # the finding shifts a region's averages a little
    groups = [f"p{i // 2}" for i in range(80)]
    assert held_out_accuracy(x, y, groups) > 0.8
    probe = fs.fit_probe(x, y)
    assert ((probe.probability(x) > 0.5) == y).mean() > 0.9
    # a patient and his twin are near copies with one label: only a split that keeps them together is honest
    noise, labels = rng.normal(size=(40, 200)), rng.random(40) < 0.5
    twins = np.repeat(noise, 2, axis=0) + 0.05 * rng.normal(size=(80, 200))
    together = held_out_accuracy(twins, np.repeat(labels, 2), groups)
    apart = held_out_accuracy(twins, np.repeat(labels, 2), [str(i) for i in range(80)])
    assert together < 0.75 and apart > 0.9


def test_mirrored_difference_is_the_features_minus_those_of_the_mirrored_volume():
    latents = torch.from_numpy(np.random.default_rng(0).normal(size=(16, 4, 16, 16))).float()
    features = fs.grid_features(latents)
    expected = features - fs.grid_features(latents.flip(-1))
    assert np.allclose(fs.mirrored_difference(features), expected, atol=1e-6)
    assert np.allclose(fs.mirrored_difference(np.stack([features, features]))[1], expected, atol=1e-6)
    symmetric = torch.cat([latents[..., :8], latents[..., :8].flip(-1)], -1)
    assert np.abs(fs.mirrored_difference(fs.grid_features(symmetric))).max() < 1e-6


def test_a_finding_is_on_one_side_by_its_side_or_its_lobe():
    assert fs.side({"present": True, "side": "left", "grade": "small"}) == "left"
    assert fs.side({"present": True, "side": "bilateral"}) is None
    assert fs.side({"present": True, "lobe": "right middle lobe"}) == "right"
    assert fs.side({"present": False, "side": "left"}) is None
    assert fs.side({"present": True, "scale": 1.2}) is None


def label_map(slices: int, size: int = 16) -> np.ndarray:
    """Right lung in the image's left columns (radiological view), left lung on the other side, a heart between;
    upper lobes in the top half of the slices, lower lobes below (the middle lobe in front of the right lower)."""
    labels = np.zeros((slices, size, size), np.uint8)
    top = slices // 2
    labels[:top, 4:12, 2:6], labels[:top, 4:12, 10:14] = NAMES["lung_upper_lobe_right"], NAMES["lung_upper_lobe_left"]
    labels[top:, 8:12, 2:6], labels[top:, 4:8, 2:6] = NAMES["lung_lower_lobe_right"], NAMES["lung_middle_lobe_right"]
    labels[top:, 4:12, 10:14] = NAMES["lung_lower_lobe_left"]
    labels[top:, 6:10, 6:10] = NAMES["heart"]
    return labels


def test_the_prior_reads_each_region_in_its_own_hu_bins(tmp_path):
    prior = fs.AnatomyPrior.from_label_maps([label_map(16), label_map(24)], NAMES)
    assert prior.weights.shape == (len(fs.REGIONS) + 1, fs.LEVELS, 8, 8) and prior.patients == 2
    rll = prior.regions.index("right lower lobe")
    assert prior.weights[rll, :4].max() == 0 and prior.weights[rll, 4:].max() == 1  # lower half of each body
    hu = np.full((20, 16, 16), -850.0)  # aerated lung everywhere
    fluid = hu.copy()
    fluid[10:, 8:12, 2:6] = 10  # fluid in the right lower lobe: its fluid bin fills, the left lower lobe's does not
    bins = len(fs.HU_EDGES) + 1
    before = prior.features(fs.pooled(hu)).reshape(len(prior.regions), fs.LEVELS, bins)
    after = prior.features(fs.pooled(fluid)).reshape(len(prior.regions), fs.LEVELS, bins)
    fluid_bin = int(np.digitize(10, fs.HU_EDGES))
    assert after[rll, 6, fluid_bin] > 0.9 and before[rll, 6, fluid_bin] == 0
    assert after[prior.regions.index("left lower lobe"), 6, fluid_bin] == 0
    prior.save(tmp_path / "prior.npz")
    again = fs.AnatomyPrior.load(tmp_path / "prior.npz")
    assert again.regions == prior.regions and np.array_equal(again.weights, prior.weights)
    with pytest.raises(CTFlowError, match="a slice"):
        prior.features(np.zeros((4, 16, 16), np.int16))  # not pooled: another grid


def test_the_place_that_changed_most_is_where_the_pair_differs():
    prior = fs.AnatomyPrior.from_label_maps([label_map(16), label_map(24)], NAMES)
    negated = np.full((20, 8, 8), -850, np.int16)  # pooled HU of a pair: 20 real slices
    asked = negated.copy()
    asked[12:, 4:6, 1:3] = 0  # a change low in the right lung's back: the right lower lobe
    lobes = fs.LOBE_REGIONS

    def most(asked, places):
        changes = fs.place_changes(prior, asked, negated, places)
        assert set(changes) == set(places) and all(value >= 0 for value in changes.values())
        return max(changes, key=changes.get)

    assert most(asked, fs.SIDE_REGIONS) == "right" and most(asked, lobes) == "right lower lobe"
    longer = np.concatenate([asked, asked[-4:]])  # another length: compared by fraction of the body
    longer[:, 4:6, 1:3] = -850
    longer[:, 2:4, 5:7] = 0  # now in the left lung, upper and lower
    assert most(longer, fs.SIDE_REGIONS) == "left"
    assert fs.place_changes(prior, negated, negated, fs.SIDE_REGIONS) == {"right": 0.0, "left": 0.0}


def test_the_relative_place_is_the_largest_change_over_the_usual_one():
    assert fs.relative_place({"right": 2.0, "left": 3.0}, {"right": 1.0, "left": 3.0}) == "right"
    assert fs.relative_place({"right": 2.0, "left": 3.0}, {"right": 1.0, "left": 1.0}) == "left"
    assert fs.relative_place({"right": 0.5, "left": 3.0}, {"right": 0.0, "left": 1.0}) == "right"  # usually still


def test_levels_split_any_body_into_the_same_fractions():
    assert fs.levels(8).tolist() == list(range(8))
    assert fs.levels(16).tolist() == [k // 2 for k in range(16)]
    assert fs.levels(3).tolist() == [1, 4, 6]


def test_a_lobe_classifier_beats_chance_and_one_class_gives_a_constant_probe():
    rng = np.random.default_rng(0)
    lobes = np.array(list(LOBES.values()))[rng.integers(0, 5, 100)]
    x = rng.normal(size=(100, 30))
    for k, name in enumerate(LOBES.values()):
        x[lobes == name, k] += 2.5
    classes = tuple(sorted(set(lobes)))
    accuracy = held_out_accuracy(x, lobes, [f"p{i // 2}" for i in range(100)], classes)
    assert accuracy > 0.4  # chance: about 0.2 (the strong L2 keeps the probes near the base rate)
    classifier = fs.fit_classifier(x, lobes, classes)
    assert np.allclose(classifier.probabilities(x).sum(1), 1)
    assert (np.array(classifier.predict(x)) == lobes).mean() > 0.5
    constant = fs.fit_probe(x, np.ones(100, bool))
    assert np.all(constant.probability(x) > 0.99)


def labelled(n: int, rng: np.random.Generator):
    """n volumes: cardiomegaly seen only in the HU features, pleural effusion's side only in the latents; the other
    findings absent (so not studied)."""
    features, labels = [], []
    for k in range(n):
        findings = {f.name: {"present": False} for f in FINDINGS}
        enlarged, where = k % 2 == 0, ("right", "left")[k // 2 % 2]
        findings["cardiomegaly"] = {"present": enlarged, "scale": 1.2}
        findings["pleural_effusion"] = {"present": True, "side": where, "grade": "small"}
        latent, hu = rng.normal(size=2 * 4 * 8 * 8 * 8), rng.normal(size=60)
        hu[:5] += 2.0 if enlarged else 0.0
        cells = latent.reshape(2 * 4 * 8 * 8, 8)
        cells[:40, 0] += 2.0 if where == "right" else -2.0  # an asymmetry across the columns
        features.append(fs.Features(latent, hu))
        labels.append(findings)
    return features, labels


def test_calibrate_chooses_the_detector_that_sees_the_finding():
    features, labels = labelled(40, np.random.default_rng(1))
    detectors, skipped = fs.calibrate(features, labels, [f"p{k}" for k in range(40)])
    cardiomegaly = detectors["cardiomegaly", "present"].score
    assert cardiomegaly.used == "hu" and cardiomegaly.hu > 0.9 and cardiomegaly.latent < 0.8
    assert cardiomegaly.chance == 0.5 and cardiomegaly.volumes == 40 and cardiomegaly.classes == [False, True]
    effusion_side = detectors["pleural_effusion", "side"].score
    assert effusion_side.used == "latent" and effusion_side.latent > 0.9 and effusion_side.classes == ["left", "right"]
    assert ("pleural_effusion", "present") not in detectors  # every volume has it: nothing to tell apart
    assert "pleural_effusion present" in skipped and "emphysema present" in skipped
    assert ("cardiomegaly", "side") not in detectors and "cardiomegaly side" not in skipped  # it has no side
    probabilities = detectors["cardiomegaly", "present"].probabilities(features[:4])
    assert probabilities.shape == (4, 2) and probabilities[0, 1] > 0.5 > probabilities[1, 1]


def test_twin_pairs_are_a_patients_volumes_that_differ_in_that_finding_alone():
    def volume(**present):
        findings = {f.name: {"present": False} for f in FINDINGS}
        findings.update({name: {"present": True, "side": where} for name, where in present.items()})
        return findings

    labels = [volume(), volume(pleural_effusion="right"), volume(nodule="left"),  # p0 and his twins
              volume(pleural_effusion="right"), volume(), volume(pleural_effusion="left"),  # p1: a twin, a side twin
              volume(pleural_effusion="right", nodule="left")]  # p2: like p0's twins together, another patient
    groups = ["p0", "p0", "p0", "p1", "p1", "p1", "p2"]
    assert fs.twin_pairs(labels, groups, "pleural_effusion") == [(1, 0), (3, 4), (5, 4)]
    assert fs.twin_pairs(labels, groups, "nodule") == [(2, 0)]  # not (6, 1): two patients
    assert fs.twin_pairs(labels, groups, "emphysema") == []
    labels[1]["nodule"] = labels[0]["nodule"] = {"present": True, "lobe": "right upper lobe", "diameter_mm": 8}
    labels[0]["nodule"] = {**labels[0]["nodule"], "diameter_mm": 12}  # drawn again: the report reads the same
    assert fs.twin_pairs(labels, groups, "pleural_effusion")[0] == (1, 0)
    labels[0]["nodule"] = {**labels[0]["nodule"], "lobe": "right lower lobe"}  # elsewhere: another report
    assert fs.twin_pairs(labels, groups, "pleural_effusion")[0] == (3, 4)


def test_calibrate_counts_the_real_twins_the_detector_reads_higher_with_the_finding():
    features, labels = labelled(40, np.random.default_rng(1))
    groups = [f"p{k // 2}" for k in range(40)]  # 2m (enlarged heart) and 2m + 1: the same but for the heart
    cardiomegaly = fs.calibrate(features, labels, groups)[0]["cardiomegaly", "present"].score
    assert cardiomegaly.twin_pairs == 20 and cardiomegaly.twins_raised >= 18
    blind = [features[k + 1] if k % 2 == 0 else f for k, f in enumerate(features)]  # each twin drawn as his pair
    detectors = fs.calibrate(blind, labels, groups)[0]
    blinded = detectors["cardiomegaly", "present"].score
    assert (blinded.twin_pairs, blinded.twins_raised) == (20, 0)
    assert detectors["pleural_effusion", "side"].score.twin_pairs == 0  # the ceiling is the present target's


def test_calibrate_counts_the_real_twins_whose_change_lies_at_the_findings_place():
    """Side and lobe read by change have a ceiling too: the cohort's twins, read through the same prior."""
    prior = fs.AnatomyPrior.from_label_maps([label_map(16), label_map(24)], NAMES)
    features, labels, groups = [], [], []
    for patient in range(12):
        lung = ("right", "left")[patient % 2]
        for present in (False, True):
            findings = {f.name: {"present": False} for f in FINDINGS}
            hu = np.full((20, 8, 8), -850, np.int16)  # pooled HU of 20 real slices
            if present:
                findings["consolidation"] = {"present": True, "lobe": f"{lung} lower lobe"}
                hu[12:, 4:6, (1, 5)[patient % 2]:(3, 7)[patient % 2]] = 0  # low and at the back of that lung
            features.append(fs.Features(np.zeros(2 * 4 * 8 * 8 * 8), prior.features(hu), hu))
            labels.append(findings)
            groups.append(f"p{patient}")
    for k in (4, 10):  # two patients' changes drawn in the other lung
        features[2 * k + 1] = features[2 * k + 3] if k % 2 == 0 else features[2 * k - 1]
    detectors = fs.calibrate(features, labels, groups, prior=prior)[0]
    for target in ("side", "lobe"):
        score = detectors["consolidation", target].score
        assert (score.twin_pairs, score.twins_placed, score.twins_raised) == (12, 10, 0)
    without_hu = [fs.Features(f.latent, f.hu) for f in features]  # no pooled HU: no ceiling to read
    assert fs.calibrate(without_hu, labels, groups, prior=prior)[0]["consolidation", "lobe"].score.twin_pairs == 0
    table = fs.FindingStudy("m", 1, 0, 16, 3.0, "t", "a", [d.score for d in detectors.values()], {}, [], [], {})
    assert "| consolidation | lobe | 12 (12) | 0.5 |" in table.markdown() and "| 10/12 |" in table.markdown()


def test_the_pair_probe_reads_a_finding_that_the_differences_between_patients_swamp():
    """Each patient's own HU vary far more than the finding moves them: the presence probe, which must tell volumes
    of different patients apart, is near chance; the pair probe reads the difference a patient's twins share."""
    rng = np.random.default_rng(3)
    features, labels, groups = [], [], []
    for patient in range(30):
        own = rng.normal(0, 5.0, 60)
        for present in (False, True):
            findings = {f.name: {"present": False} for f in FINDINGS}
            findings["lymphadenopathy"] = {"present": present, "short_axis_mm": 15}
            hu = own + rng.normal(0, 0.1, 60)
            hu[:3] += 0.8 if present else 0.0
            features.append(fs.Features(rng.normal(size=2 * 4 * 8 * 8 * 8), hu))
            labels.append(findings)
            groups.append(f"p{patient}")
    detector = fs.calibrate(features, labels, groups)[0]["lymphadenopathy", "present"]
    score = detector.score
    assert score.twin_pairs == 30 and score.hu < 0.7  # the presence probe: near chance
    assert score.paired_used == "hu" and score.paired_hu >= 28 and score.paired_latent <= 22
    read = detector.pair_probabilities(features[1::2], features[0::2])  # with it over without, and the reverse
    assert sum(p > 0.5 for p in read) >= 28
    assert sum(p > 0.5 for p in detector.pair_probabilities(features[0::2], features[1::2])) <= 2
    assert detector.pair_probabilities(features[:2], features[:2]) == [0.5, 0.5]  # equal volumes: neither shows more
    assert detector.pair_probe.bias == 0 and not detector.pair_probe.mean.any()  # not by the rounding of one fit
    unpaired = fs.calibrate(features, labels, [f"v{k}" for k in range(60)])[0]["lymphadenopathy", "present"]
    assert unpaired.pair_probe is None and unpaired.pair_probabilities(features[:1], features[1:2]) is None
    assert (unpaired.score.twin_pairs, unpaired.score.paired_used) == (0, "")


def test_writer_reports_describe_one_finding_each_and_both_sides(tmp_path):
    from ctflow.volume import Geometry, Volume
    from ctflow.report import Report
    from ctflow_train.dataset import DatasetWriter

    rows = [("consolidation", {"lobe": "right lower lobe", "air_bronchogram": False, "volume_ml": 30}),
            ("consolidation", {"lobe": "left upper lobe", "air_bronchogram": True, "volume_ml": 40}),
            ("emphysema", {"severity": "mild", "low_attenuation_fraction": 0.1})]
    with DatasetWriter(tmp_path) as writer:
        for k, (name, params) in enumerate(rows):
            findings = {f.name: {"present": False} for f in FINDINGS}
            findings[name] = {"present": True, **params}
            volume = Volume(np.full((4, 8, 8), -1000, np.int16), Geometry((1.0, 1.0, 2.5)), None)
            writer.add(f"synth_0_{k:05d}", volume, Report("x", "y"), {"findings": findings})
    reports, located = fs.writer_reports(tmp_path, 0, ("emphysema", "consolidation"))
    assert set(reports) == {"normal", "emphysema", "consolidation"} and reports["normal"] == normal_report(0).text
    assert "right lower lobe" in reports["consolidation"] and "emphysema" in reports["emphysema"].lower()
    assert [(r.name, r.side, r.lobe) for r in located] == [
        ("consolidation right", "right", "right lower lobe"), ("consolidation left", "left", "left upper lobe"),
        ("consolidation left (mirror of right)", "left", "left lower lobe"),
        ("consolidation right (mirror of left)", "right", "right upper lobe")]
    first, mirror = located[0].text, located[2].text  # the same words but the side: the side alone is tested
    assert mirror == first.replace("right lower lobe", "left lower lobe") and mirror != first
    assert located[3].text == located[1].text.replace("left upper lobe", "right upper lobe")
    with pytest.raises(CTFlowError, match="no patient .* has nodule"):
        fs.writer_reports(tmp_path, 0, ("nodule",))


def study() -> fs.FindingStudy:
    score = fs.DetectorScore("consolidation", "present", [False, True], 80, 80, 0.7, 0.81, 0.86, twin_pairs=12,
                             twins_raised=9, paired_latent=11, paired_hu=10, paired_used="latent")
    lobe = fs.DetectorScore("consolidation", "lobe", ["left lower lobe", "right lower lobe"], 24, 24, 0.5, 0.6, 0.55)
    return fs.FindingStudy(
        "model", 3, 0, 16, 1.0, "80 volumes", "12 patients", [score, lobe], {"emphysema side": "why"},
        [fs.Response("writer", "consolidation", "consolidation", [0.9, 0.4, 0.7], [0.2, 0.6, 0.1], 2,
                     [0.8, 0.7, 0.4], paired_first=1),
         fs.Response("heldout", "consolidation_RLL", "consolidation", [0.6, 0.7, 0.2], [0.3, 0.3, 0.3],
                     paired=[0.9, 0.9, 0.6], negated_over_normal=[0.2, 0.7, 0.5],
                     reworded_over_normal=[0.6, 0.4, 0.7],
                     negated_elsewhere_over_normal=[[0.6, 0.2], [0.7, 0.9], [0.1, 0.4]],
                     unnamed_elsewhere_over_normal=[[0.3], [0.6], [0.2]])],
        [fs.Placement("heldout", "consolidation_RLL", "consolidation", "lobe", "right lower lobe",
                      ["right lower lobe", "left lower lobe", "right lower lobe"], 0.5),
         fs.Placement("writer", "consolidation right", "consolidation", "side (change)", "right",
                      ["right", "right", "left"], 0.5),
         fs.Placement("writer", "consolidation left", "consolidation", "side (change)", "left",
                      ["left", "right", "left"], 0.5),
         fs.Placement("writer", "consolidation left", "consolidation", "side (relative change)", "left",
                      ["left", "left", "left"], 0.5),
         fs.Placement("writer", "consolidation left (mirror of right)", "consolidation", "side (change)", "left",
                      ["left", "left", "left"], 0.5)],
        {"writer/normal": "Findings: normal."})


def test_the_result_counts_round_trips_and_makes_tables():
    result = study()
    assert result.detectors[0].used == "hu" and result.detectors[1].used == "latent"
    writer, heldout = result.responses
    assert (writer.shown_when_asked, writer.shown_when_negated, writer.raised) == (2, 1, 2)
    assert (heldout.shown_when_asked, heldout.shown_when_negated, heldout.raised) == (2, 0, 2)
    assert (writer.raised_paired, writer.negated_above_normal) == (2, None)
    assert (heldout.raised_paired, heldout.negated_above_normal, heldout.reworded_above_normal) == (3, 1, 2)
    assert result.placements[0].hits == 2
    assert result.both_sides() == [("consolidation", "the first patients' reports", "side (change)", 1),  # seed 0
                                   ("consolidation", "the right one and its mirror", "side (change)", 2)]  # 0, 1
    again = fs.FindingStudy.from_json(result.to_json())
    assert again == result
    table = result.markdown()
    assert "| consolidation | present | 80 (80) | 0.7 | 0.81 | 0.86 | hu | 9/12 | 11, 10 (latent) |" in table
    assert "| consolidation | lobe | 24 (24) | 0.5 | 0.6 | 0.55 | latent |  |  |" in table
    assert "| writer | consolidation | hu 0.86 (0.7) | 2/3 | 1/3 | 2/3 | 2/3 | 0.667 / 0.300 | 2/3 | 1/3 |  |  |" in table
    assert ("| heldout | consolidation_RLL | hu 0.86 (0.7) | 2/3 | 0/3 | 2/3 |  | 0.500 / 0.300 | 3/3 |  | 1/3 | 2/3 |"
            in table)
    assert "| heldout | consolidation_RLL | lobe | right lower lobe | latent 0.6 | 2/3 | 0.50 |" in table
    assert "| consolidation | 3/6 (2 reports, mean 0.48) | 1/3 (1 report, mean 0.37) |" in table  # a negation inside another finding's
    assert "not fitted: emphysema side (why)" in table
    assert "| consolidation | the first patients' reports | side (change) | 1/3 |" in table
    assert ("| writer | consolidation left | side (relative change) | left | largest change against the pair over its "
            "usual | 3/3 | 0.50 |") in table
    with pytest.raises(CTFlowError, match="not the JSON"):
        fs.FindingStudy.from_json(json.dumps({"seeds": 3}))
    older = json.loads(result.to_json())  # a study made before the twins' ceiling was counted, and the pair probes
    for detector in older["detectors"]:
        del (detector["twin_pairs"], detector["twins_raised"], detector["paired_latent"], detector["paired_hu"],
             detector["paired_used"])
    for response in older["responses"]:
        del response["paired"], response["negated_over_normal"], response["paired_first"]
        del response["reworded_over_normal"], response["negated_elsewhere_over_normal"]
        del response["unnamed_elsewhere_over_normal"]
    table = fs.FindingStudy.from_json(json.dumps(older)).markdown()
    assert "| 0.86 | hu |  |  |" in table and "| 0.667 / 0.300 |  |  |  |  |" in table
    assert "another finding" not in table


def test_a_training_volume_made_again_is_not_read_from_the_feature_cache(cache, tmp_path):
    """Cohort names repeat (synth_<seed>_<index>): a cohort drawn again and encoded again must not reuse the old
    volume's features."""
    again = shutil.copytree(cache, tmp_path / "again")
    rows = [json.loads(line) for line in (again / "index.jsonl").read_text().splitlines()]
    rows[0]["sha256"] = "0" * 64  # volume 0 encoded from other voxels under the same name
    (again / "index.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    before, after = LatentStore(cache), LatentStore(again)
    assert fs.training_feature_key("vae", before, 0) != fs.training_feature_key("vae", after, 0)
    assert fs.training_feature_key("vae", before, 1) == fs.training_feature_key("vae", after, 1)


@pytest.mark.parametrize("reads_code", [False, True])
def test_a_generated_volume_s_key_states_the_code_its_denoiser_reads(tiny_pipeline, monkeypatch, reads_code):
    """A denoiser told report.denoiser_code makes another volume when the report is read otherwise (a change of the
    reading's rules), though the text is the same: its key says so; a denoiser that reads only the text keeps it."""
    config = dataclasses.replace(tiny_pipeline.config, denoiser=dataclasses.replace(tiny_pipeline.config.denoiser,
                                                                                    side_map=reads_code))
    pipe = CTFlowPipeline(config, tiny_pipeline.denoiser, tiny_pipeline.autoencoder, tiny_pipeline.text_encoder)
    text = "Findings: Right pleural effusion. The left pleural space is clear."

    def key() -> str:
        return fs.volume_key(pipe, "model", text, 0, 2, 3.0, 1.0)

    read = key()
    assert ("codes" in read) == reads_code and key() == read and "side halves" in read
    monkeypatch.setattr(config_module, "denoiser_code", lambda *reading: [1.0] * SIDE_CODE_SIZE)  # read otherwise
    assert (key() != read) == reads_code


def test_a_generated_volume_s_key_states_finding_guidance_where_it_acts(tiny_pipeline):
    """Finding guidance makes another volume only of a report that reports a finding: a normal report keeps its
    volume (and key), so a study at finding guidance shares the normal and negated reports' volumes."""
    def key(text: str, finding: float) -> str:
        return fs.volume_key(tiny_pipeline, "model", text, 0, 2, 3.0, 1.0, finding)

    sick, normal = "Findings: Right pleural effusion. Heart normal.", "Findings: No pleural effusion. Heart normal."
    assert key(normal, 2.0) == key(normal, 0.0)
    assert key(sick, 2.0) != key(sick, 0.0) and "'Findings: Heart normal.'" in key(sick, 2.0)
    assert key(sick, 2.0) != key(sick, 1.0)
    assert f"onset {FINDING_ONSET}" in key(sick, 2.0)  # volumes made before the onset rule are not reused


def test_a_report_of_no_finding_is_keyed_as_the_model_s_normal_report(tiny_pipeline):
    """A model with a normal report draws every report of no finding from it (pipeline.drawn_report), so those
    share its volume (and key); a report of a finding keeps its own. The normal report is not in the config's hash:
    the same weights with and without one share every other volume."""
    normal = normal_report().text
    pipe = CTFlowPipeline(dataclasses.replace(tiny_pipeline.config, normal_report=normal), tiny_pipeline.denoiser,
                          tiny_pipeline.autoencoder, tiny_pipeline.text_encoder)

    def key(model: CTFlowPipeline, text: str) -> str:
        return fs.volume_key(model, "model", text, 0, 2, 3.0, 1.0, 1.0)

    negated = "Findings: No pleural effusion. Heart not enlarged.\nImpressions: No acute finding."
    assert key(pipe, negated) == key(pipe, normal) == key(tiny_pipeline, normal)
    assert key(tiny_pipeline, negated) != key(tiny_pipeline, normal)
    sick = "Findings: Right pleural effusion. No emphysema."
    assert key(pipe, sick) == key(tiny_pipeline, sick) and sick in key(pipe, sick)
    assert fs.volume_config_hash(pipe.config) == fs.volume_config_hash(tiny_pipeline.config)


def test_a_lobe_prior_makes_another_volume_only_of_a_report_whose_lobes_read_differently(tiny_model, tiny_pipeline,
                                                                                           tmp_path):
    """A model copied with a lobe prior shares its weights' hash and every volume but those of reports that put a
    finding in a lobe (with side guidance), whose key states the prior and what each place reads."""
    copy = shutil.copytree(tiny_model, tmp_path / "lobes")
    shares = {name: torch.full((4, 8, 8), 0.2) for half in HALF_LOBES.values() for name in half}
    save_file(shares, copy / LOBE_FILE)
    write_checksums(copy)
    lobed = CTFlowPipeline.from_pretrained(copy, device="cpu")
    assert fs.weights_hash(copy) == fs.weights_hash(tiny_model)

    def keys(text: str, side: float = 1.0) -> tuple[str, str]:
        return tuple(fs.volume_key(pipe, "model", text, 0, 2, 3.0, side) for pipe in (tiny_pipeline, lobed))

    for text in ("Findings: Right pleural effusion.", "Findings: No effusion. Heart normal."):
        assert len(set(keys(text))) == 1
    lobar = "Findings: Consolidation in the right lower lobe."
    without, with_prior = keys(lobar)
    assert without != with_prior and " lobes " in with_prior
    assert len(set(keys(lobar, side=0.0))) == 1  # without side guidance the prior does nothing
    save_file({**shares, "right lower lobe": torch.full((4, 8, 8), 0.4)}, copy / LOBE_FILE)
    write_checksums(copy)
    other = CTFlowPipeline.from_pretrained(copy, device="cpu")
    assert fs.volume_key(other, "model", lobar, 0, 2, 3.0, 1.0) != with_prior  # another prior, another volume


def one_seed(whole: fs.FindingStudy, seed: int) -> fs.FindingStudy:
    """The study of one of whole's seeds, as `finding-study --seed S --seeds 1` writes it."""
    def pick(values):
        return values[seed - whole.seed:seed - whole.seed + 1]
    responses = [dataclasses.replace(r, asked=pick(r.asked), negated=pick(r.negated),  # its first seeds ranked first
                                     ranked_first=None if r.ranked_first is None else int(seed < r.ranked_first),
                                     paired=r.paired and pick(r.paired),
                                     paired_first=None if r.paired_first is None else int(seed < r.paired_first),
                                     negated_over_normal=r.negated_over_normal and pick(r.negated_over_normal),
                                     reworded_over_normal=r.reworded_over_normal and pick(r.reworded_over_normal),
                                     negated_elsewhere_over_normal=r.negated_elsewhere_over_normal
                                     and pick(r.negated_elsewhere_over_normal),
                                     unnamed_elsewhere_over_normal=r.unnamed_elsewhere_over_normal
                                     and pick(r.unnamed_elsewhere_over_normal))
                 for r in whole.responses]
    placements = [dataclasses.replace(p, predicted=pick(p.predicted)) for p in whole.placements]
    return dataclasses.replace(whole, seeds=1, seed=seed, responses=responses, placements=placements)


def test_studies_of_consecutive_seeds_combine_into_the_study_of_all_of_them(tmp_path, capsys):
    whole = study()
    paths = []
    for seed in (2, 0, 1):  # in any order
        paths.append(tmp_path / f"s{seed}.json")
        paths[-1].write_text(one_seed(whole, seed).to_json())
    out = tmp_path / "all.json"
    assert main(["combine-studies", *map(str, paths), "--out", str(out)]) == 0
    combined = fs.FindingStudy.from_json(out.read_text())
    assert combined == whole
    assert out.with_suffix(".md").read_text() == combined.markdown() and "| consolidation | the first patients' reports | side (change) | 1/3 |" in \
        combined.markdown()
    capsys.readouterr()
    assert main(["combine-studies", *map(str, paths), "--out", str(out)]) == 1  # never over a file unasked
    assert "exists" in capsys.readouterr().err
    refused = {"missing seed": [paths[1], paths[0]], "twice": [paths[0], paths[1], paths[1]]}
    other = tmp_path / "other.json"
    other.write_text(dataclasses.replace(one_seed(whole, 1), finding_guidance=1.0).to_json())
    refused["finding guidance"] = [paths[1], other]
    moved = tmp_path / "moved.json"
    moved.write_text(dataclasses.replace(one_seed(whole, 1), placements=one_seed(whole, 1).placements[1:]).to_json())
    refused["placements"] = [paths[1], moved]
    (tmp_path / "broken.json").write_text("{")
    refused["broken"] = [paths[1], tmp_path / "broken.json"]
    (tmp_path / "eval.json").write_text(json.dumps({"seam": 1}))
    refused["not a study"] = [paths[1], tmp_path / "eval.json"]
    refused["absent"] = [paths[1], tmp_path / "absent.json"]
    for why, files in refused.items():
        assert main(["combine-studies", *map(str, files), "--out", str(tmp_path / "x.json")]) == 1, why
        error = capsys.readouterr().err
        assert len(error.strip().splitlines()) == 1, why
        assert {"missing seed": "not consecutive", "twice": "not consecutive", "finding guidance": "finding_guidance",
                "placements": "in placements", "broken": "broken.json: cannot read", "not a study": "not the JSON",
                "absent": "absent.json: cannot read"}[why] in error, (why, error)
    assert not (tmp_path / "x.json").exists()


def test_finding_study_probes_the_cohort_and_counts_generated_volumes(tiny, data, vae_run, cache, tmp_path):
    flow = tmp_path / "flow"
    train_flow.train(tiny.flow_run(cache, flow, steps=2))
    parser = parser_export = argparse.ArgumentParser()
    export.configure(parser)
    args = parser.parse_args(["--flow", str(flow), "--vae", str(vae_run[0]), "--cache", str(cache),
                              "--out", str(tmp_path / "model"), "--steps", "2", "--calibration-cases", "2"])
    export.export(export.ExportRun.from_args(args))
    lungs = np.zeros((14, tiny.SIZE, tiny.SIZE), np.uint8)  # the tiny volumes' anatomy, roughly: a lung on each side
    lungs[:, 6:10, 3:7], lungs[:, 6:10, 9:13], lungs[:, 7:9, 7:9] = 1, 2, 3
    names = {**dict.fromkeys(LOBES, 0), "lung_upper_lobe_right": 1, "lung_upper_lobe_left": 2, "heart": 3,
             "aorta": 0, "trachea": 0, "esophagus": 0}
    fs.AnatomyPrior.from_label_maps([lungs], names).save(tmp_path / "prior.npz")
    parser = argparse.ArgumentParser()
    fs.configure(parser)
    out = tmp_path / "findings.json"
    flipped = {"tiny_0_without_emphysema": ("emphysema", 1), "tiny_1_without_cardiomegaly": ("cardiomegaly", 0),
               "tiny_2_with_cardiomegaly": ("cardiomegaly", 1)}  # a twin: his finding as patient <n> has it
    twins = {name: {**tiny.labels(int(name[5]))["findings"], finding: tiny.labels(n)["findings"][finding]}
             for name, (finding, n) in flipped.items()}
    rng = np.random.default_rng(6)
    twin_store = tiny.latent_store(vae_run, tmp_path / "twins", {n: tiny.volume(rng, 14) for n in twins}, twins)
    argv = ["--model", str(tmp_path / "model"), "--data", str(data), str(twin_store.parent / "data"),
            "--latents", str(cache), str(twin_store),
            "--prior", str(tmp_path / "prior.npz"), "--feature-cache", str(tmp_path / "features"),
            "--heldout-per-finding", "1", "--seeds", "2", "--steps", "2", "--out", str(out)]
    assert fs.run(parser.parse_args(argv)) == 0
    result = fs.FindingStudy.from_json(out.read_text())
    assert out.with_suffix(".md").read_text() == result.markdown()
    studied = {"emphysema", "pleural_effusion", "consolidation", "cardiomegaly"}  # what the tiny labels vary
    present = {d.finding: d for d in result.detectors if d.target == "present"}
    assert set(present) == studied and all(d.volumes == 6 and d.patients == 3 for d in present.values())
    assert all(0 <= d.latent <= 1 and 0 <= d.hu <= 1 and d.used in ("latent", "hu") for d in result.detectors)
    writer = {r.case: r for r in result.responses if r.report_set == "writer"}
    heldout = [r for r in result.responses if r.report_set == "heldout"]
    assert set(writer) == studied and all(len(r.asked) == len(r.negated) == 2 for r in result.responses)
    assert {r.finding for r in heldout} == studied and len(heldout) == 4  # one case each
    assert set(result.reports) >= {f"writer/{f}" for f in studied} | {"writer/normal"}  # each against the normal one
    assert {f"heldout/{r.case}/negated" for r in heldout} <= set(result.reports)  # each against its counterpart
    assert all(0 <= r.ranked_first <= 2 for r in writer.values())
    for r in result.responses:  # a pair probe where the cohort has twins of the finding, read at every seed
        assert (r.paired is None) == (present[r.finding].paired_used == "")
        assert r.paired is None or (len(r.paired) == 2 and all(0 <= p <= 1 for p in r.paired))
        assert (r.negated_over_normal is not None) == (r.paired is not None and r.report_set == "heldout")
        assert (r.reworded_over_normal is not None) == (r.negated_over_normal is not None)  # the other cases' too
        assert r.reworded_over_normal is None or (len(r.reworded_over_normal) == 2
                                                  and all(0 <= p <= 1 for p in r.reworded_over_normal))
        assert (r.paired_first is not None) == (r.paired is not None and r.report_set == "writer")
        assert r.paired_first is None or 0 <= r.paired_first <= 2
    assert {f: d.twin_pairs for f, d in present.items()} == {"pleural_effusion": 0, "emphysema": 1,
                                                             "cardiomegaly": 2, "consolidation": 0}
    # the other cases negate only findings without a pair probe here (the RLL consolidation and the ratio the
    # pleural fluid, upper-lobe emphysema the consolidation), and none names emphysema or cardiomegaly
    assert all(r.negated_elsewhere_over_normal is None for r in heldout)
    for r in heldout:
        readings = r.unnamed_elsewhere_over_normal
        assert (readings is None) == (r.paired is None)
        assert readings is None or (len(readings) == 2 and all(len(seed) == 3 and all(0 <= p <= 1 for p in seed)
                                                               for seed in readings))
    # sides: the store holds patients 0-2, so pleural effusion (patients 1, 3) is seen on the right only
    assert result.detector("pleural_effusion", "side") is None
    side = result.detector("consolidation", "side")
    assert side.classes == ["left", "right"] and side.volumes == 4 and side.chance == 0.5
    placed = {(p.report_set, p.case, p.target): p for p in result.placements}
    assert ("writer", "consolidation right", "side") in placed and ("writer", "consolidation left", "side") in placed
    read = [p for p in placed.values() if "change" not in p.target]
    assert read and all(p.finding == "consolidation" for p in read)  # the only finding with side and lobe detectors
    changed = placed["writer", "pleural_effusion left", "side (change)"]  # read without a detector
    assert changed.expected == "left" and len(changed.predicted) == 2 and changed.chance == 0.5
    relative = placed["writer", "pleural_effusion left", "side (relative change)"]  # over each lung's usual change
    assert relative.expected == "left" and len(relative.predicted) == 2 and set(relative.predicted) <= {"right", "left"}
    assert {c for _, c, t in placed if t == "side (relative change)"} == {c for _, c, t in placed if t == "side (change)"}
    assert "right lower lobe" in result.reports["writer/consolidation right"]
    assert "left lower lobe" in result.reports["writer/consolidation left"]
    cached = len(list((tmp_path / "features").iterdir()))  # training volumes and every generated volume
    assert fs.run(parser.parse_args([*argv, "--overwrite"])) == 0
    assert len(list((tmp_path / "features").iterdir())) == cached  # nothing generated twice
    assert fs.FindingStudy.from_json(out.read_text()) == result  # and the same figures
    # one finding alone: its rows of the whole study, read from the same volumes
    one = tmp_path / "consolidation.json"
    assert fs.run(parser.parse_args([*argv[:-1], str(one), "--findings", "consolidation"])) == 0
    alone = fs.FindingStudy.from_json(one.read_text())
    assert len(list((tmp_path / "features").iterdir())) == cached
    assert {r.finding for r in alone.responses} == {p.finding for p in alone.placements} == {"consolidation"}
    unranked = lambda responses: [dataclasses.replace(r, ranked_first=0, paired_first=None) for r in responses]
    assert unranked(alone.responses) == unranked(r for r in result.responses if r.finding == "consolidation")
    assert alone.placements == [p for p in result.placements if p.finding == "consolidation"
                                and p.target != "side (relative change)"]  # no unsided report to read the usual from
    assert set(alone.reports) == {"writer/normal"} | {k for k in result.reports if "consolidation" in k}
    with pytest.raises(CTFlowError, match="--findings nodule: the cohort's labels do not vary it"):
        fs.run(parser.parse_args([*argv[:-1], str(tmp_path / "nodule.json"), "--findings", "nodule"]))
    assert fs.run(parser.parse_args([*argv, "--seed", "1", "--seeds", "1", "--overwrite"])) == 0
    assert len(list((tmp_path / "features").iterdir())) == cached  # a run over other seeds: the same reports
    assert fs.FindingStudy.from_json(out.read_text()).reports == result.reports
    seed0 = tmp_path / "seed0.json"
    assert fs.run(parser.parse_args([*argv, "--seeds", "1", "--out", str(seed0)])) == 0
    both = tmp_path / "both.json"
    assert main(["combine-studies", str(out), str(seed0), "--out", str(both)]) == 0
    combined = fs.FindingStudy.from_json(both.read_text())  # two one-seed runs read as the two-seed run:
    assert combined.markdown() == result.markdown()
    for joined, whole in zip(combined.responses, result.responses, strict=True):  # probabilities to rounding
        assert joined.asked == pytest.approx(whole.asked) and joined.negated == pytest.approx(whole.negated)
        assert dataclasses.replace(joined, asked=whole.asked, negated=whole.negated) == whole
    assert dataclasses.replace(combined, responses=result.responses) == result
    train_flow.train(tiny.flow_run(cache, tmp_path / "flow2", steps=1))  # another denoiser, the same autoencoder
    normal = tmp_path / "normal.txt"  # what an export on the synthetic cohort writes by default
    normal.write_text(normal_report().text)
    export.export(export.ExportRun.from_args(parser_export.parse_args(
        ["--flow", str(tmp_path / "flow2"), "--vae", str(vae_run[0]), "--cache", str(cache), "--out",
         str(tmp_path / "model2"), "--steps", "2", "--calibration-cases", "2", "--normal-report", str(normal)])))
    argv2 = [*argv, "--model", str(tmp_path / "model2"), "--seeds", "1", "--overwrite"]
    assert fs.run(parser.parse_args(argv2)) == 0
    given = {normal_report().text if reports_no_finding(parse_report(text)) else text  # what the model is given
             for text in result.reports.values()}
    assert len(given) < len(set(result.reports.values()))  # the negated reports drawn as the normal report
    generated = len(given)  # one volume a report given; the training volumes are not decoded again
    assert len(list((tmp_path / "features").iterdir())) == cached + generated
    capped = shutil.copytree(tmp_path / "model2", tmp_path / "model3")  # the same weights, volumes ended elsewhere
    config = json.loads((capped / "config.json").read_text())
    (capped / "config.json").write_text(json.dumps({**config, "max_slices": config["max_slices"] - 2}))
    write_checksums(capped)
    assert fs.run(parser.parse_args([*argv2, "--model", str(capped)])) == 0
    assert len(list((tmp_path / "features").iterdir())) == cached + 2 * generated  # made again, not read back
    cached += 2 * generated
    assert fs.run(parser.parse_args([*argv, "--seeds", "1", "--side-guidance", "2", "--overwrite"])) == 0
    sided = {text for text in result.reports.values() if names_one_side(text)}  # made again, guided by side
    assert sided and len(sided) < len(set(result.reports.values()))
    assert len(list((tmp_path / "features").iterdir())) == cached + len(sided)
    guided = fs.FindingStudy.from_json(out.read_text())
    assert guided.side_guidance == 2 and "side guidance 2;" in guided.markdown()
    sided_by_default = shutil.copytree(argv[argv.index("--model") + 1], tmp_path / "model4")
    config = json.loads((sided_by_default / "config.json").read_text())
    (sided_by_default / "config.json").write_text(json.dumps({**config, "sampling": {**config["sampling"],
                                                                                     "side_guidance": 3}}))
    write_checksums(sided_by_default)
    assert fs.run(parser.parse_args([*argv, "--model", str(sided_by_default), "--seeds", "1", "--overwrite"])) == 0
    assert len(list((tmp_path / "features").iterdir())) == cached + 2 * len(sided)  # the others read back
    other_default = shutil.copytree(argv[argv.index("--model") + 1], tmp_path / "model5")  # --steps 2 says the steps
    config = json.loads((other_default / "config.json").read_text())
    (other_default / "config.json").write_text(json.dumps({**config, "sampling": {**config["sampling"], "steps": 7}}))
    write_checksums(other_default)
    assert fs.run(parser.parse_args([*argv, "--model", str(other_default), "--seeds", "1", "--overwrite"])) == 0
    assert len(list((tmp_path / "features").iterdir())) == cached + 2 * len(sided)  # every volume read back
    cases = json.loads(fs.HELDOUT.read_text())["cases"]  # the ratio's report negating emphysema too
    ratio = next(case for case in cases if case["name"] == "cardiomegaly_ctr")
    ratio["report"] = ratio["report"].replace("Lungs clear.", "Lungs clear, no emphysema.")
    (tmp_path / "heldout.json").write_text(json.dumps({"cases": cases}))
    negating = tmp_path / "negating.json"
    assert fs.run(parser.parse_args([*argv, "--heldout", str(tmp_path / "heldout.json"), "--seeds", "1",
                                     "--out", str(negating)])) == 0
    negating = fs.FindingStudy.from_json(negating.read_text())
    emphysema = next(r for r in negating.responses if r.report_set == "heldout" and r.finding == "emphysema")
    assert [len(seed) for seed in emphysema.negated_elsewhere_over_normal] == [1]  # the ratio's report
    assert [len(seed) for seed in emphysema.unnamed_elsewhere_over_normal] == [2]  # hydrothorax, RLL consolidation
    (reading,) = emphysema.negated_elsewhere_over_normal[0]
    assert f"| emphysema | {int(reading > 0.5)}/1 (1 report, mean {reading:.2f}) | " in negating.markdown()
    with pytest.raises(CTFlowError, match="exists"):
        fs.run(parser.parse_args(argv))
    args = parser.parse_args([*argv, "--overwrite"])
    args.latents = args.latents[:1]
    with pytest.raises(CTFlowError, match="one --latents store per --data folder"):
        fs.run_study(args)
    args.data, args.latents = [data], [tiny.store_of_another_vae(cache, tmp_path)]
    with pytest.raises(CTFlowError, match="not encoded by the model's autoencoder"):
        fs.run_study(args)
