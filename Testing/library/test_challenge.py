"""The VLM3D text-to-CT challenge's input (/input/prompts.json) through `ctflow batch`: one <input_image_name>.nii.gz
per prompt, in HU, with the spacing in the header (what the official evaluation reads)."""

import json

import nibabel as nib
import numpy as np
import pytest

from ctflow import CTFlowError, parse_report, read_volume
from ctflow.batch import plan_items, read_reports
from ctflow.cli import main

PROMPTS = [
    {"input_image_name": "65f43b26-34fd-447a-9462-faf4d7b139ed.mha",  # the challenge's example carries .mha
     "report": "58-year-old male: Findings: The trachea and both main bronchi are open. Impressions: Normal."},
    {"input_image_name": "case_two", "report": "Findings: Moderate right pleural effusion."},
]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(PROMPTS))
    return path


def test_challenge_prompts_become_named_nifti_volumes_in_hu(tiny_model, tiny_pipeline, prompts, tmp_path, capsys):
    out = tmp_path / "output"
    code = main(["batch", str(prompts), "--out", str(out), "--model", str(tiny_model), "--steps", "1",
                 "--slices", "5", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir() if p.name.endswith(".nii.gz"))
    assert names == ["65f43b26-34fd-447a-9462-faf4d7b139ed.nii.gz", "case_two.nii.gz"]
    for name, prompt in zip(names, PROMPTS):
        image = nib.load(out / name)
        assert image.get_data_dtype() == np.int16 and image.header.get_slope_inter() in ((None, None), (1.0, 0.0))
        hu = np.asarray(image.dataobj)
        assert hu.shape[2] == 5 and -1100 <= hu.min() and hu.max() <= 3100  # HU, not a 0..1 intensity
        spacing = tiny_pipeline.config.geometry.spacing  # millimetres of i, j, k
        assert np.allclose(image.header.get_zooms(), spacing) and spacing != (1.0, 1.0, 1.0)
        assert np.allclose(np.linalg.norm(image.affine[:3, :3], axis=0), spacing)
        provenance = json.loads(image.header.extensions[0].get_content())["ctflow_provenance"]
        assert provenance["report"] == parse_report(prompt["report"]).text


def test_challenge_names_allow_one_seed_only(prompts):
    assert [item.name for item in plan_items(read_reports(prompts), seeds=1)] == [
        "65f43b26-34fd-447a-9462-faf4d7b139ed", "case_two"]
    with pytest.raises(CTFlowError, match="one volume per report: use --seeds 1"):
        plan_items(read_reports(prompts), seeds=2)


@pytest.mark.parametrize("text, message", [("{}", "JSON array of objects"), ("[1, 2]", "JSON array of objects"),
                                           ("[{", "not JSON")])
def test_a_bad_prompts_file_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "prompts.json"
    path.write_text(text)
    with pytest.raises(CTFlowError, match=message):
        read_reports(path)


def test_mha_output_is_what_the_official_evaluation_reads(tiny_model, prompts, tmp_path):
    """The evaluation container globs /input/**/*.mha and reads each with SimpleITK, then writes a NIfTI."""
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is in requirements-test.txt")
    out = tmp_path / "output"
    assert main(["batch", str(prompts), "--out", str(out), "--format", ".mha", "--model", str(tiny_model),
                 "--steps", "1", "--slices", "5", "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.glob("*.mha")) == ["65f43b26-34fd-447a-9462-faf4d7b139ed.mha", "case_two.mha"]
    ours = read_volume(out / "case_two.mha")
    image = sitk.ReadImage(str(out / "case_two.mha"))
    assert np.array_equal(sitk.GetArrayFromImage(image), ours.hu)  # [k, j, i] both
    assert np.allclose(image.GetSpacing(), ours.geometry.spacing)
    assert np.allclose(np.diag([-1, -1, 1]) @ np.asarray(image.GetOrigin()), ours.geometry.origin)
    assert "SYNTHETIC" in image.GetMetaData("CTFlow_synthetic") and ours.provenance.seed == 0
    sitk.WriteImage(image, str(tmp_path / "converted.nii.gz"))  # the container's own conversion step
    converted = read_volume(tmp_path / "converted.nii.gz")
    assert np.array_equal(converted.hu, ours.hu)
    assert np.allclose(converted.geometry.ijk_to_ras(), ours.geometry.ijk_to_ras(), atol=1e-5)
