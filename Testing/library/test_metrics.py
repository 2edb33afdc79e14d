"""Set metrics: the Fréchet distance, the 2.5D FID path with small feature networks, and text alignment."""

import json

import ctflow
import numpy as np
import pytest
import torch
from scipy import linalg
from safetensors.torch import save_file

from ctflow import CTFlowError, Geometry, Volume, write_volume
from ctflow.batch import BatchFolder, merge_manifest
from ctflow.cli import main
from ctflow.metrics import (
    PLANES, RandomFeatures, ResNet50, batch_alignment, fid_2_5d, frechet_distance, load_detector, load_resnet50,
    plane_slices, read_labels, set_features, text_alignment,
)


class MeanAndContrast(torch.nn.Module):
    """A tiny feature network: per-image mean and mean absolute gradient."""

    def forward(self, x):
        return torch.stack([x.mean(dim=(1, 2, 3)), (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))], dim=1)


def volumes(offset, count=3, seed=0):
    rng = np.random.default_rng(seed)
    return [Volume((rng.normal(-300 + offset, 200, (12, 16, 16))).astype(np.int16), Geometry((1.0, 1.0, 2.0)), None)
            for _ in range(count)]


def test_frechet_distance_matches_the_matrix_square_root_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (200, 5)), rng.normal(0.5, 2, (150, 5)) @ rng.normal(0, 1, (5, 5))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(CTFlowError, match="two samples"):
        frechet_distance(a[:1], b)


def test_slices_of_the_three_planes():
    planes = plane_slices(np.full((12, 20, 24), 1000, np.int16), per_axis=4, size=32)
    assert list(planes) == list(PLANES)
    assert all(p.shape == (4, 1, 32, 32) and torch.allclose(p, torch.ones(())) for p in planes.values())


def test_fid_2_5d_with_a_tiny_feature_network():
    extractor = MeanAndContrast()
    real = set_features(volumes(0), extractor, per_axis=3, size=16)
    assert {plane: f.shape for plane, f in real.items()} == {plane: (9, 2) for plane in PLANES}
    same = fid_2_5d(real, set_features(volumes(0, seed=1), extractor, per_axis=3, size=16))
    shifted = fid_2_5d(real, set_features(volumes(300, seed=1), extractor, per_axis=3, size=16))
    assert shifted["mean"] > 10 * same["mean"]
    assert shifted["mean"] == pytest.approx(np.mean([shifted[plane] for plane in PLANES]))


def test_a_ct_stored_feet_first_has_the_same_slices_as_stored_head_first(tmp_path):
    """Real CT files are often RAS with slice 0 at the feet (dcm2niix, CT-RATE); ctflow writes head first. The
    slices of one CT are the same whichever way a file stores it, so its FID against itself is 0."""
    import nibabel as nib

    k, j, i = np.meshgrid(np.arange(12), np.arange(16), np.arange(20), indexing="ij")
    ct = Volume((k * 40 + j * 7 - i * 3 - 500).astype(np.int16), Geometry((0.8, 0.9, 2.0)), None)
    write_volume(ct, tmp_path / "head_first.nii.gz")
    ras = nib.as_closest_canonical(nib.load(tmp_path / "head_first.nii.gz"))
    nib.save(ras, tmp_path / "feet_first.nii.gz")
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    extractor = RandomFeatures(0)
    first, second = (set_features([tmp_path / f"{name}.nii.gz"], extractor, per_axis=3, size=32)
                     for name in ("head_first", "feet_first"))
    assert all(np.allclose(first[plane], second[plane], atol=1e-5) for plane in PLANES)
    np.testing.assert_array_equal(ctflow.read_volume(tmp_path / "feet_first.nii.gz").head_first().hu, ct.hu)


def test_random_features_are_fixed_by_their_seed():
    images = torch.rand(2, 1, 32, 32)
    first, again, other = RandomFeatures(0)(images), RandomFeatures(0)(images), RandomFeatures(1)(images)
    assert first.shape == (2, 480) and torch.equal(first, again) and not torch.allclose(first, other)


@pytest.mark.parametrize("keras", [True, False])
def test_resnet50_weights_load_in_both_layouts(tmp_path, keras):
    with torch.device("meta"):  # shapes only: building real random weights twice is slow on a small CPU
        shapes = ResNet50(keras=keras).state_dict()
    state = {name: torch.full(tensor.shape, 0.01) for name, tensor in shapes.items()}
    state["fc.weight"] = torch.zeros(10, 2048)  # a classifier head is ignored
    save_file(state, tmp_path / "resnet50.safetensors")
    extractor = load_resnet50(tmp_path / "resnet50.safetensors")
    assert extractor.network.conv1.bias is not None if keras else extractor.network.conv1.bias is None
    assert extractor(torch.rand(2, 1, 32, 32)).shape == (2, 2048)
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "partial.safetensors")
    with pytest.raises(CTFlowError, match="not a ResNet-50"):
        load_resnet50(tmp_path / "partial.safetensors")


def test_metrics_command_writes_the_fid(tmp_path, capsys):
    for name, group in (("real", volumes(0)), ("generated", volumes(200, seed=3))):
        (tmp_path / name).mkdir()
        for k, volume in enumerate(group):
            write_volume(volume, tmp_path / name / f"{k}.nii.gz")
    code = main(["metrics", str(tmp_path / "generated"), "--reference", str(tmp_path / "real"), "--slices-per-axis",
                 "2", "--size", "32", "--device", "cpu", "--out", str(tmp_path / "metrics.json")])
    assert code == 0
    fid = json.loads((tmp_path / "metrics.json").read_text())["fid_2_5d"]
    assert fid["mean"] > 0 and fid["features"] == "random-cnn(seed=0)" and fid["slices"] == {"reference": 6, "generated": 6}
    assert main(["metrics", str(tmp_path / "generated")]) == 1 and "nothing to compute" in capsys.readouterr().err



def test_metrics_finds_every_input_before_the_first_feature(tmp_path, capsys, monkeypatch):
    """A missing generated folder, labels file or manifest must not wait for the reference set's features."""
    (tmp_path / "real").mkdir()
    write_volume(volumes(0)[0], tmp_path / "real" / "0.nii.gz")
    computed = []
    monkeypatch.setattr("ctflow.metrics.set_features", lambda files, *args, **kwargs: computed.append(files))
    reference = ["--reference", str(tmp_path / "real"), "--device", "cpu"]
    assert main(["metrics", str(tmp_path / "missing"), *reference]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "generated").mkdir()
    write_volume(volumes(1)[0], tmp_path / "generated" / "0.nii.gz")
    (tmp_path / "labels.csv").write_text("id,pleural_effusion\nr1,1\n")
    assert main(["metrics", str(tmp_path / "generated"), *reference, "--labels", str(tmp_path / "labels.csv"),
                 "--detector", "json:loads"]) == 1
    assert "has no manifest.json" in capsys.readouterr().err and computed == []


def test_text_alignment_rates():
    cases = [({"Effusion": True}, {"Effusion": 0.9}), ({"Effusion": True}, {"Effusion": 0.2}),
             ({"Effusion": False}, {"Effusion": 0.7}), ({"Effusion": False, "Nodule": True}, {"Effusion": 0.1})]
    result = text_alignment(cases)
    assert result == {"Effusion": {"requested": 2, "detected_when_requested": 0.5, "negated": 2,
                                   "detected_when_negated": 0.5, "gap": 0.0}}


def test_alignment_over_a_batch_folder_with_a_detector_module(tmp_path, monkeypatch):
    """Labels as the training cohort writes them; the detector calls a volume bright 'Pleural effusion'."""
    folder = BatchFolder(tmp_path / "batch")
    folder.create()
    index = []
    for order, (name, effusion) in enumerate([("p1", 1), ("p2", 0), ("p3", 1)]):
        hu = np.full((4, 8, 8), 40 if effusion else -800, np.int16)
        write_volume(Volume(hu, Geometry((1.0, 1.0, 2.0)), None), folder.folder / f"{name}_s0.nii.gz")
        row = {"file": f"{name}_s0.nii.gz", "report_id": name, "seed": 0, "order": order}
        (folder.items / f"{name}_s0.json").write_text(json.dumps(row))
        (tmp_path / f"{name}.json").write_text(json.dumps({"ctrate_labels": {"Pleural effusion": effusion}}))
        index.append({"name": name, "labels": f"{name}.json"})
    merge_manifest(folder.folder)
    (tmp_path / "index.jsonl").write_text("\n".join(json.dumps(row) for row in index))
    (tmp_path / "my_detector.py").write_text(
        "def bright(volume):\n    return {'Pleural effusion': float(volume.hu.mean() > -500)}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    labels = read_labels(tmp_path / "index.jsonl")
    assert labels == {"p1": {"Pleural effusion": True}, "p2": {"Pleural effusion": False},
                      "p3": {"Pleural effusion": True}}
    result = batch_alignment(folder.folder, labels, load_detector("my_detector:bright"))
    assert result["Pleural effusion"]["gap"] == 1.0 and result["Pleural effusion"]["requested"] == 2
    csv_labels = tmp_path / "labels.csv"
    csv_labels.write_text("VolumeName,Pleural effusion,Emphysema\np1,1,0\n")
    assert read_labels(csv_labels) == {"p1": {"Pleural effusion": True, "Emphysema": False}}
    with pytest.raises(CTFlowError, match="cannot load detector"):
        load_detector("my_detector:missing")


def test_a_damaged_label_file_is_one_line(tmp_path):
    (tmp_path / "broken.json").write_text('{"ctrate_labels": {')
    (tmp_path / "index.jsonl").write_text('{"name": "p1", "labels": "broken.json"}\n')
    with pytest.raises(CTFlowError, match="broken.json line 1: not JSON"):
        read_labels(tmp_path / "index.jsonl")
