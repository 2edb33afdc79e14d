"""CT-RATE reading and preprocessing on a tiny CT-RATE-like tree written by the tests themselves."""

from __future__ import annotations

import csv
import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from ctflow.io import read_volume
from ctflow.volume import Geometry
from ctflow_train import cli, ctrate, preprocess
from ctflow.conventions import BLOCK_SLICES
from ctflow.conventions import real_slices as content_slices
from ctflow_train.dataset import read_index

SHAPE = (24, 24, 10)  # nibabel order: x (columns), y (rows), slices
TISSUE, MARKER = 40, 700
REPORT_FIELDS = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]


def phantom() -> np.ndarray:
    """HU in RAS-like voxel order (x to the right->left is decided by the affine): air, a body, and a
    bright marker in the corner at the highest x, y and z voxel index."""
    hu = np.full(SHAPE, -1000, np.int16)
    hu[4:20, 4:20, :] = TISSUE
    hu[18:20, 18:20, 8:10] = MARKER
    return hu


def save_nifti(path, data, affine, blank=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, None if blank else affine)
    if blank:
        image.header.set_sform(None, code=0)
        image.header.set_qform(None, code=0)
    nib.save(image, str(path))


@pytest.fixture
def tree(tmp_path):
    """A CT-RATE-like layout: nested volumes, a reports CSV and a metadata CSV."""
    root = tmp_path / "dataset"
    las = np.diag([-0.75, 0.75, 1.5, 1.0])  # x to patient left, y anterior, z superior
    las[:3, 3] = [100, -80, -200]
    save_nifti(root / "train/train_1/train_1_a/train_1_a_1.nii.gz", phantom(), las)
    # blank header: stored values are raw (HU + 1024), geometry and rescale only in the metadata
    save_nifti(root / "train/train_2/train_2_a/train_2_a_1.nii.gz", (phantom() + 1024).astype(np.int16), None, blank=True)
    corrupt = root / "valid/valid_3/valid_3_a/valid_3_a_1.nii.gz"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(gzip.compress(b"\x00" * 4000)[:200])
    save_nifti(root / "valid/valid_4/valid_4_a/valid_4_a_1.nii.gz", phantom(), las)  # no report row
    save_nifti(root / "train_5_a_1.nii.gz", phantom(), None, blank=True)  # metadata says 12 slices
    with_nan = phantom().astype(np.float32)
    with_nan[0, 0, 0] = np.nan
    save_nifti(root / "train_6_a_1.nii.gz", with_nan, las)

    reports = tmp_path / "reports.csv"
    with open(reports, "w", newline="") as handle:
        writer = csv.DictWriter(handle, REPORT_FIELDS)
        writer.writeheader()
        for name in ("train_1_a_1", "train_2_a_1", "valid_3_a_1", "train_5_a_1", "train_6_a_1"):
            writer.writerow({"VolumeName": f"{name}.nii.gz", "Findings_EN": f"Findings of {name}.", "Impressions_EN": "Normal."})
    metadata = tmp_path / "metadata.csv"
    fields = ["VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept", "ImageOrientationPatient",
              "ImagePositionPatient", "Rows", "Columns", "NumberofSlices"]
    common = {"XYSpacing": "[0.8, 0.8]", "ZSpacing": "2.0", "RescaleSlope": "1.0", "RescaleIntercept": "-1024",
              "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]", "ImagePositionPatient": "[-90, -90, -300]", "Rows": "24",
              "Columns": "24"}
    with open(metadata, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        writer.writerow({"VolumeName": "train_2_a_1.nii.gz", **common, "NumberofSlices": "10"})
        writer.writerow({"VolumeName": "train_5_a_1.nii.gz", **common, "NumberofSlices": "12"})
    return root, reports, metadata


def test_find_volumes_searches_subfolders(tree):
    root, _, _ = tree
    assert list(ctrate.find_volumes(root)) == sorted(
        ["train_1_a_1", "train_2_a_1", "valid_3_a_1", "valid_4_a_1", "train_5_a_1", "train_6_a_1"]
    )


def test_canonical_order_puts_the_marker_where_the_patient_has_it(tree):
    """Marker at the highest x, y, z voxel of an LAS volume: patient left, anterior, superior."""
    root, _, _ = tree
    hu, geometry = ctrate.load_volume(root / "train/train_1/train_1_a/train_1_a_1.nii.gz")
    k, j, i = np.argwhere(hu == MARKER).mean(axis=0)
    assert hu.shape == (10, 24, 24)
    assert k < 2 and j < 6 and i > 17  # superior (first slices), anterior (first rows), left (last columns)
    np.testing.assert_allclose(geometry.direction, np.diag([-1.0, -1.0, -1.0]))
    assert geometry.spacing == pytest.approx((0.75, 0.75, 1.5))
    # the marker's RAS position is unchanged by the reordering
    las = np.diag([-0.75, 0.75, 1.5, 1.0])
    las[:3, 3] = [100, -80, -200]
    expected = las @ np.array([18.5, 18.5, 8.5, 1.0])
    found = geometry.ijk_to_ras() @ np.array([i, j, k, 1.0])
    np.testing.assert_allclose(found[:3], expected[:3], atol=1e-6)


def test_blank_header_uses_metadata_geometry_and_rescale(tree):
    root, _, metadata = tree
    row = ctrate.read_metadata(metadata)["train_2_a_1"]
    hu, geometry = ctrate.load_volume(root / "train/train_2/train_2_a/train_2_a_1.nii.gz", row)
    assert hu.min() == -1000 and np.median(hu[hu > -500]) == TISSUE  # intercept -1024 applied once
    assert geometry.spacing == pytest.approx((0.8, 0.8, 2.0))
    # DICOM axial (LPS): x to patient left, y posterior, slices towards the head; the marker sits at
    # the highest x, y, z index -> left, posterior, superior
    k, j, i = np.argwhere(hu == MARKER).mean(axis=0)
    assert k < 2 and j > 17 and i > 17
    origin_lps = np.array([-90.0, -90.0, -300.0])
    first_voxel_ras = geometry.ijk_to_ras() @ np.array([0, 0, 9, 1.0])  # stored voxel (0, 0, 0): k was flipped
    np.testing.assert_allclose(first_voxel_ras[:3], origin_lps * [-1, -1, 1], atol=1e-6)


def test_blank_header_without_metadata_is_refused(tree):
    root, _, _ = tree
    with pytest.raises(ctrate.SkipVolume, match="blank"):
        ctrate.load_volume(root / "train_5_a_1.nii.gz", None)


def test_prepare_ctrate_writes_model_space_and_skip_report(tree, tmp_path):
    root, reports, metadata = tree
    out = tmp_path / "prepared"
    summary = ctrate.prepare_ctrate(root, reports, out, metadata, size=32, slice_spacing=3.0)
    assert summary["written"] == 2 and summary["skipped"] == 4

    skipped = {entry["name"]: entry["reason"] for entry in json.loads((out / "skipped.json").read_text())}
    assert set(skipped) == {"valid_3_a_1", "valid_4_a_1", "train_5_a_1", "train_6_a_1"}
    assert "unreadable" in skipped["valid_3_a_1"]
    assert "no report" in skipped["valid_4_a_1"]
    assert "does not match metadata" in skipped["train_5_a_1"]
    assert "non-finite" in skipped["train_6_a_1"]

    index = {entry["name"]: entry for entry in read_index(out)}
    assert set(index) == {"train_1_a_1", "train_2_a_1"}
    for name, entry in index.items():
        volume = read_volume(out / entry["volume"])
        assert volume.hu.dtype == np.int16 and volume.hu.shape[1:] == (32, 32)
        assert volume.hu.shape[0] % BLOCK_SLICES == 0
        assert np.all(volume.hu[-BLOCK_SLICES :] == preprocess.HU_MAX)
        assert entry["slices"] == content_slices(volume.hu) == volume.hu.shape[0] - np.all(volume.hu == 1000, axis=(1, 2)).sum()
        assert volume.hu[: entry["slices"]].min() == -1000
        assert volume.geometry.spacing[2] == pytest.approx(3.0)
        text = (out / entry["report"]).read_text()
        assert text == f"Findings: Findings of {name}.\nImpressions: Normal.\n"
    # 10 slices x 1.5 mm = 15 mm -> 5 slices of 3 mm; the in-plane field (18 mm) is kept on 32 pixels
    assert index["train_1_a_1"]["slices"] == 5
    assert index["train_1_a_1"]["spacing"][:2] == pytest.approx([24 * 0.75 / 32] * 2, abs=1e-4)


def test_resample_keeps_the_field_of_view_centred():
    geometry = Geometry((0.5, 0.5, 1.0), (10.0, 20.0, 30.0), np.diag([-1.0, -1.0, -1.0]))
    hu = np.zeros((20, 40, 40), np.float32)
    out, resampled = preprocess.resample(hu, geometry, size=16, slice_spacing=2.5)
    assert out.shape == (8, 16, 16)

    def centre(grid, shape):
        return (grid.ijk_to_ras() @ np.array([(shape[2] - 1) / 2, (shape[1] - 1) / 2, (shape[0] - 1) / 2, 1.0]))[:3]

    np.testing.assert_allclose(centre(resampled, out.shape), centre(geometry, hu.shape), atol=1e-9)
    assert resampled.spacing == pytest.approx((1.25, 1.25, 2.5))


def test_square_fov_pads_the_short_side_with_air():
    hu = np.zeros((3, 10, 20), np.float32)
    out, geometry = preprocess.square_fov(hu, Geometry((1.0, 1.0, 1.0)))
    assert out.shape == (3, 20, 20)
    assert np.all(out[:, :5] == preprocess.HU_MIN) and np.all(out[:, 5:15] == 0) and np.all(out[:, 15:] == preprocess.HU_MIN)
    assert geometry.origin[1] == pytest.approx(5.0)  # row 0 moved 5 mm anterior (j axis points posterior: -y)


@pytest.mark.parametrize("slices, white", [(1, 16 + 15), (16, 16), (17, 16 + 15), (40, 16 + 8)])
def test_end_slices_fill_to_a_whole_white_block(slices, white):
    hu = np.zeros((slices, 4, 4), np.int16)
    out = preprocess.append_end_slices(hu)
    assert out.shape[0] == slices + white and out.shape[0] % 16 == 0
    assert np.all(out[slices:] == 1000) and content_slices(out) == slices


def test_cli_prepare_ctrate(tree, tmp_path, capsys):
    root, reports, metadata = tree
    out = tmp_path / "cli"
    argv = ["prepare-ctrate", "--root", str(root), "--reports", str(reports), "--metadata", str(metadata), "--out", str(out), "--size", "16"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 2
    assert (out / "index.jsonl").is_file() and (out / "skipped.json").is_file()
    png = tmp_path / "preview.png"
    assert cli.main(["cohort-preview", "--cohort", str(out), "--out", str(png)]) == 0  # no labels: shown by impressions
    assert png.stat().st_size > 0
