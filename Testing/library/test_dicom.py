"""DICOM series: geometry and provenance round-trip, the synthetic marking, atomic folders, ordinary CT series, and
proof by tools no one here wrote (dciodvfy from dicom3tools, dcm2niix, SimpleITK/GDCM, pydicom)."""

import dataclasses
import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest

from ctflow import Geometry, OutputExistsError, Provenance, Volume, read_volume, write_dicom, write_volume
from ctflow.cli import main
from ctflow.dicom import SYNTHESIZING_EQUIPMENT, Study, read_dicom
from ctflow.errors import CTFlowError
from ctflow.qa import volume_files

# Columns: RAS directions of i, j, k.
GEOMETRIES = {
    "head-first axial": np.diag([-1.0, -1.0, -1.0]),  # what ctflow generates: slice 0 most superior
    "slices going up": np.diag([-1.0, -1.0, 1.0]),  # k towards the head, as many scanners store it
    "mirrored rows and columns": np.diag([1.0, 1.0, -1.0]),
    "rotated in-plane": np.array([[-0.96, 0.28, 0.0], [-0.28, -0.96, 0.0], [0.0, 0.0, -1.0]]),
}


@pytest.fixture
def provenance():
    return Provenance(
        report="Findings: Right pleural effusion.\nImpressions: Effusion; \\ not \"quoted\" — ünïcode.",
        prompt="Findings: ...\nLength: 5 slices", seed=123, steps=12, sampler="heun", shift=2.0, guidance=1.5,
        model="ctflow-demo", model_sha256="ab" * 32, ctflow_version="0.1.0", device="cpu", slices_requested=5,
        partial=True, block_slices=4,
    )


def make_volume(provenance, direction=GEOMETRIES["head-first axial"], shape=(5, 6, 7)):
    hu = np.random.default_rng(0).integers(-1024, 3000, size=shape).astype(np.int16)
    return Volume(hu, Geometry((0.7, 0.8, 2.5), (10.0, -20.0, 30.0), direction), provenance)


def instances(folder):
    return [pydicom.dcmread(path) for path in sorted(folder.iterdir())]


@pytest.mark.parametrize("name", GEOMETRIES)
def test_round_trip_keeps_voxels_geometry_and_provenance(provenance, tmp_path, name):
    volume = make_volume(provenance, GEOMETRIES[name])
    folder = write_volume(volume, tmp_path / "ct.dcm")
    back = read_volume(folder)
    assert np.array_equal(back.hu, volume.hu) and back.hu.dtype == np.int16
    assert np.allclose(back.geometry.ijk_to_ras(), volume.geometry.ijk_to_ras(), atol=1e-6)
    assert back.provenance == volume.provenance
    assert [p.name for p in tmp_path.iterdir()] == ["ct.dcm"]  # no temporary folder left behind
    assert np.array_equal(read_volume(folder / "0003.dcm").hu, volume.hu)  # any file of the series reads it all


def test_the_series_says_synthetic_where_dicom_looks(provenance, tmp_path):
    provenance = dataclasses.replace(provenance, side_guidance=4.5, finding_guidance=1.5)
    volume = make_volume(provenance)
    series = instances(write_dicom(volume, tmp_path / "ct"))
    assert len(series) == 5 and len({ds.SOPInstanceUID for ds in series}) == 5
    assert len({(ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID) for ds in series}) == 1
    ds = series[0]
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
    assert ds.SyntheticData == "YES" and list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert ds.BurnedInAnnotation == "NO" and ds.PatientName == "SYNTHETIC^CTFLOW"
    assert ds.PatientID.startswith("SYNTHETIC-") and "SYNTHETIC" in ds.SeriesDescription
    assert "NOT FOR DIAGNOSIS" in ds.SeriesDescription and "not for diagnosis" in ds.ImageComments
    assert "INCOMPLETE" in ds.ImageComments  # the provenance says partial
    equipment = ds.ContributingEquipmentSequence[0]
    code = equipment.PurposeOfReferenceCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == SYNTHESIZING_EQUIPMENT
    assert equipment.ManufacturerModelName == "ctflow-demo" and equipment.DeviceSerialNumber == "ab" * 32
    assert equipment.SoftwareVersions == "ctflow 0.1.0"
    assert equipment.ContributionDescription.endswith("side guidance 4.5, finding guidance 1.5")
    assert (ds.StudyDate, ds.StudyTime) <= (ds.SeriesDate, ds.SeriesTime)  # no study is dated after its series
    elsewhere = dataclasses.replace(provenance, created="2026-12-01T10:00:00+02:00")  # provenance not in UTC
    ds = instances(write_dicom(make_volume(elsewhere), tmp_path / "east"))[0]
    assert (ds.StudyDate, ds.StudyTime, ds.SeriesTime) == ("20261201", "080000", "080000")
    assert all(uid.startswith("2.25.") for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID))
    assert json.loads(ds.private_block(0x0011, "CTFlow provenance")[0x00].value)["seed"] == "123"
    # Geometry in LPS, worked by hand: i runs to patient left (+x), j to posterior (+y), k to inferior (-z)
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in series[1].ImagePositionPatient] == [-10.0, 20.0, 27.5]
    assert [float(v) for v in ds.PixelSpacing] == [0.8, 0.7] and float(ds.SpacingBetweenSlices) == 2.5
    assert (ds.Rows, ds.Columns, ds.PixelRepresentation, float(ds.RescaleSlope)) == (6, 7, 1, 1.0)
    assert np.array_equal(series[2].pixel_array, volume.hu[2])  # pydicom decodes our HU


def test_one_study_holds_many_series_of_one_fictitious_patient(provenance, tmp_path):
    study = Study()
    a = instances(write_dicom(make_volume(provenance), tmp_path / "a", study=study, series_number=1))[0]
    b = instances(write_dicom(make_volume(provenance), tmp_path / "b", study=study, series_number=2))[0]
    c = instances(write_dicom(make_volume(provenance), tmp_path / "c"))[0]
    assert a.StudyInstanceUID == b.StudyInstanceUID != c.StudyInstanceUID
    assert a.PatientID == b.PatientID != c.PatientID
    assert a.SeriesInstanceUID != b.SeriesInstanceUID and (a.SeriesNumber, b.SeriesNumber) == (1, 2)


def test_existing_folders_are_kept_unless_asked_and_only_series_are_replaced(provenance, tmp_path):
    volume = make_volume(provenance)
    target = write_dicom(volume, tmp_path / "ct.dcm")
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(OutputExistsError, match="already exists"):
        write_dicom(volume, target)
    shorter = Volume(volume.hu[:3], volume.geometry, provenance)
    (target / ".DS_Store").write_bytes(b"Bud1")  # Finder browsed the series: still a series
    write_dicom(shorter, target, overwrite=True)
    assert len(list(target.iterdir())) == 3 < len(before) and read_volume(target).shape == (3, 6, 7)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own file")
    with pytest.raises(OutputExistsError, match="not a folder of DICOM files only"):
        write_dicom(volume, mine, overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.dcm", "mine"]


def test_a_failed_write_leaves_no_folder(provenance, tmp_path, monkeypatch):
    import ctflow.dicom

    real = ctflow.dicom.slice_instance

    def fail_at_slice_three(header, volume, k):
        if k == 3:
            raise OSError("disk full")
        return real(header, volume, k)

    monkeypatch.setattr(ctflow.dicom, "slice_instance", fail_at_slice_three)
    with pytest.raises(OSError, match="disk full"):
        write_dicom(make_volume(provenance), tmp_path / "ct.dcm")
    assert list(tmp_path.iterdir()) == []


def test_only_generated_volumes_become_synthetic_series(provenance, tmp_path):
    with pytest.raises(CTFlowError, match="only volumes CTFlow generated"):
        write_dicom(Volume(make_volume(provenance).hu, Geometry((1.0, 1.0, 1.0)), None), tmp_path / "ct.dcm")
    assert list(tmp_path.iterdir()) == []


def scanner_series(folder, hu, spacing=(0.7, 0.7, 1.25), top=-40.0, description="CHEST 1.25 mm"):
    """An ordinary CT series, written the way scanners commonly do and unlike ctflow: unsigned pixels with a
    -1024 intercept, instances numbered feet to head, arbitrary file names, no provenance."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(exist_ok=True)
    series = generate_uid()
    for k, pixels in enumerate(hu):  # k = 0 is the most superior slice
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = pydicom.uid.CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesDescription = "CT", series, description
        ds.InstanceNumber = len(hu) - k
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-100.0, -120.0, top - k * spacing[2]]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (pixels.astype(np.int32) + 1024).astype("<u2").tobytes()
        ds.save_as(folder / f"IM{generate_uid()[-6:]}", enforce_file_format=True)
    return folder


def test_ordinary_ct_series_are_read(tmp_path):
    hu = np.random.default_rng(1).integers(-1024, 2000, size=(4, 5, 6)).astype(np.int16)
    folder = scanner_series(tmp_path / "scan", hu)
    (folder / "README.txt").write_text("not DICOM")
    volume = read_volume(folder)
    assert volume.provenance is None
    # numbered feet to head: slice 0 is the lowest instance number, the most inferior slice
    assert np.array_equal(volume.hu, hu[::-1])
    expected = np.array([[-0.7, 0, 0, 100.0], [0, -0.7, 0, 120.0], [0, 0, 1.25, -40.0 - 3 * 1.25], [0, 0, 0, 1]])
    assert np.allclose(volume.geometry.ijk_to_ras(), expected)
    assert volume_files(folder) == [folder] and volume_files(tmp_path) == [folder]


def test_a_slice_a_scanner_wrote_is_read(tmp_path):
    """pydicom's CT_small.dcm: one slice from a real scanner, unsigned pixels and a -1024 intercept."""
    from pydicom.data import get_testdata_file

    original = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder = tmp_path / "scanner"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder)
    volume = read_volume(folder)
    assert np.array_equal(volume.hu[0], original.pixel_array.astype(np.int32) - 1024)
    assert volume.geometry.spacing[:2] == pytest.approx([float(v) for v in original.PixelSpacing][::-1])
    lps_origin = np.asarray(original.ImagePositionPatient, dtype=float)
    assert np.allclose(volume.geometry.origin, lps_origin * [-1, -1, 1]) and volume.provenance is None


def test_a_folder_of_several_series_asks_for_one(tmp_path):
    hu = np.zeros((3, 4, 4), np.int16)
    folder = scanner_series(tmp_path / "mixed", hu, description="LUNG")
    scanner_series(folder, hu + 100, description="MEDIASTINUM")
    with pytest.raises(CTFlowError, match="holds 2 series .*LUNG.*give the path of one file"):
        read_volume(folder)
    one = next(p for p in folder.iterdir() if pydicom.dcmread(p).SeriesDescription == "MEDIASTINUM")
    assert np.array_equal(read_dicom(one).hu, hu + 100)


def test_a_gap_in_the_series_is_refused(tmp_path):
    folder = scanner_series(tmp_path / "scan", np.zeros((4, 4, 4), np.int16))
    next(p for p in folder.iterdir() if pydicom.dcmread(p).InstanceNumber == 2).unlink()
    with pytest.raises(CTFlowError, match="not evenly spaced"):
        read_volume(folder)


def test_qa_accepts_a_dicom_series(provenance, tmp_path, capsys):
    folder = write_volume(make_volume(provenance, shape=(12, 16, 16)), tmp_path / "ct.dcm")
    assert main(["qa", str(folder)]) == 0
    assert json.loads((tmp_path / "qa" / "ct.qa.json").read_text())["block_slices"] == 4
    assert sorted(p.name for p in folder.iterdir())[-1] == "0012.dcm" and len(list(folder.iterdir())) == 12
    assert main(["qa", str(folder / "0005.dcm"), "--overwrite"]) == 0  # a file of the series: the series
    assert json.loads((tmp_path / "qa" / "ct.qa.json").read_text())["slices"] == 12
    assert len(list(folder.iterdir())) == 12 and not (tmp_path / "qa" / "0005.qa.json").exists()
    mixed = tmp_path / "mixed"  # two series in one folder: a file of one names its series
    mixed.mkdir()
    for name, shape in (("a", (6, 16, 16)), ("b", (4, 16, 16))):
        series = write_volume(make_volume(provenance, shape=shape), tmp_path / f"{name}.dcm")
        for file in series.iterdir():
            file.rename(mixed / f"{name}{file.name}")
    assert main(["qa", str(mixed / "b0002.dcm"), "--overwrite"]) == 0
    assert json.loads((tmp_path / "qa" / "mixed.qa.json").read_text())["slices"] == 4


def test_metrics_take_scanner_series_as_reference(provenance, tmp_path, capsys):
    """Real CTs usually come as DICOM: a folder of series is a reference set like a folder of NIfTI files."""
    generated, real = tmp_path / "generated", tmp_path / "real"
    generated.mkdir(), real.mkdir()
    rng = np.random.default_rng(3)
    for k in range(2):
        write_volume(make_volume(provenance, shape=(8, 16, 16)), generated / f"g{k}.dcm")
        scanner_series(real / f"scan{k}", rng.integers(-1024, 1500, size=(8, 16, 16)).astype(np.int16))
    code = main(["metrics", str(generated), "--reference", str(real), "--slices-per-axis", "2", "--size", "32",
                 "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["fid_2_5d"]["slices"] == {"reference": 4, "generated": 4}


def test_generate_writes_a_dicom_series(tiny_model, tmp_path, capsys):
    argv = ["generate", "--report", "Findings: Left lower lobe consolidation.", "--model", str(tiny_model),
            "--steps", "1", "--seed", "5", "--slices", "6", "--device", "cpu"]
    assert main([*argv, "--out", f"{tmp_path / 'series'}/"]) == 0
    assert main([*argv, "--out", str(tmp_path / "named"), "--format", "dicom"]) == 0
    for folder in (tmp_path / "series", tmp_path / "named"):
        volume = read_volume(folder)
        assert volume.shape == (6, 16, 16) and volume.provenance.seed == 5
        assert pydicom.dcmread(next(folder.iterdir())).SyntheticData == "YES"
    assert main([*argv, "--out", str(tmp_path / "named.dcm")]) == 0
    assert read_volume(tmp_path / "named.dcm").shape[0] == 6
    assert main([*argv, "--out", str(tmp_path / "named"), "--format", "dicom"]) == 1
    assert "already exists" in capsys.readouterr().err
    preview = tmp_path / "named.png"
    preview.write_bytes(b"an older preview")
    assert main([*argv, "--out", str(tmp_path / "named"), "--format", "dicom", "--slices", "4", "--preview",
                 str(preview), "--overwrite"]) == 0  # the series and its preview replaced together
    assert read_volume(tmp_path / "named").shape[0] == 4 and preview.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["named", "named.dcm", "named.png", "series"]


# -- tools no one here wrote ---------------------------------------------------------------------------------------

needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None,
                                    reason="dciodvfy not installed (Debian package dicom3tools; .ci/run installs it)")
needs_dcm2niix = pytest.mark.skipif(shutil.which("dcm2niix") is None,
                                    reason="dcm2niix not installed (Debian package dcm2niix; .ci/run installs it)")
# dicom3tools 2022 (Debian 12) predates Synthetic Data (0008,001C) and calls an unknown even-group tag an error.
UNKNOWN_SYNTHETIC_DATA = ("Error - Attribute with an even group number is not a recognized standard attribute - "
                          "(0x0008,0x001c)")


@needs_dciodvfy
@pytest.mark.parametrize(("name", "model"), [("head-first axial", "ctflow-demo"), ("rotated in-plane", "ctflow-demo"),
                                             ("head-first axial", "démo-CT")])  # a model name outside ASCII
def test_dciodvfy_finds_no_errors(provenance, tmp_path, name, model):
    provenance = dataclasses.replace(provenance, model=model)
    folder = write_dicom(make_volume(provenance, GEOMETRIES[name]), tmp_path / "ct.dcm")
    for path in sorted(folder.iterdir()):
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        lines = (run.stdout + run.stderr).splitlines()
        assert "CTImage" in lines  # it recognised the IOD it checked against
        errors = [line for line in lines if line.startswith("Error") and not line.startswith(UNKNOWN_SYNTHETIC_DATA)]
        assert errors == [], f"{path.name}:\n" + "\n".join(lines)


def canonical(image):
    image = nib.as_closest_canonical(image)
    return np.asarray(image.dataobj), image.affine


@needs_dcm2niix
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_dcm2niix_makes_a_nifti_with_our_geometry_and_hu(provenance, tmp_path, name):
    volume = make_volume(provenance, GEOMETRIES[name], shape=(6, 10, 12))
    folder = write_dicom(volume, tmp_path / "ct.dcm")
    run = subprocess.run(["dcm2niix", "-z", "y", "-f", "converted", "-o", str(tmp_path), str(folder)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    theirs = nib.load(tmp_path / "converted.nii.gz")
    ours = nib.Nifti1Image(volume.hu.transpose(2, 1, 0), volume.geometry.ijk_to_ras())
    their_hu, their_affine = canonical(theirs)
    our_hu, our_affine = canonical(ours)
    assert np.array_equal(their_hu, our_hu)
    assert np.allclose(their_affine, our_affine, atol=1e-4)  # dcm2niix stores float32
    sidecar = json.loads((tmp_path / "converted.json").read_text())
    assert sidecar["ImageType"] == ["DERIVED", "SECONDARY", "AXIAL"] and "SYNTHETIC" in sidecar["SeriesDescription"]


@pytest.mark.parametrize("name", ["slices going up", "rotated in-plane"])
def test_simpleitk_gdcm_reads_our_geometry_and_hu(provenance, tmp_path, name):
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is in requirements-test.txt")
    volume = make_volume(provenance, GEOMETRIES[name], shape=(6, 10, 12))
    folder = write_dicom(volume, tmp_path / "ct.dcm")
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(folder))
    reader.SetFileNames(files)
    image = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    theirs = nib.Nifti1Image(sitk.GetArrayFromImage(image).transpose(2, 1, 0), np.diag([-1, -1, 1, 1]) @ lps)
    ours = nib.Nifti1Image(volume.hu.transpose(2, 1, 0), volume.geometry.ijk_to_ras())
    (their_hu, their_affine), (our_hu, our_affine) = canonical(theirs), canonical(ours)
    assert np.array_equal(their_hu, our_hu) and np.allclose(their_affine, our_affine, atol=1e-6)


def test_batch_writes_one_series_per_item_and_one_study_per_report(tiny_pipeline, tmp_path):
    from ctflow import GenerationRequest
    from ctflow.batch import BatchFolder, plan_items, read_manifest, read_reports, run_batch

    table = tmp_path / "reports.jsonl"
    table.write_text("\n".join(json.dumps(row) for row in [
        {"id": "nodule", "report": "Findings: A 9 mm nodule in the right upper lobe.", "slices": 3},
        {"id": "effusion", "report": "Findings: Small left pleural effusion.", "slices": 4}]) + "\n")
    items = plan_items(read_reports(table), seeds=2)
    out = BatchFolder(tmp_path / "out", "dicom")
    result = run_batch(tiny_pipeline, items, out, GenerationRequest("", steps=1))
    assert len(result.made) == 4 and not result.failed
    rows = read_manifest(out.folder)
    assert [row["file"] for row in rows] == ["nodule_s0.dcm", "nodule_s1.dcm", "effusion_s0.dcm", "effusion_s1.dcm"]
    first = {row["file"]: pydicom.dcmread(sorted((out.folder / row["file"]).iterdir())[0]) for row in rows}
    studies = {name: (ds.StudyInstanceUID, ds.PatientID, ds.SeriesNumber) for name, ds in first.items()}
    assert studies["nodule_s0.dcm"][:2] == studies["nodule_s1.dcm"][:2] != studies["effusion_s0.dcm"][:2]
    assert (studies["nodule_s0.dcm"][2], studies["nodule_s1.dcm"][2]) == (1, 2)
    assert all((ds.StudyDate, ds.StudyTime) <= (ds.SeriesDate, ds.SeriesTime) for ds in first.values())
    description = first["nodule_s0.dcm"].StudyDescription
    assert "nodule" in description and "SYNTHETIC" in description
    assert read_volume(out.folder / "effusion_s1.dcm").provenance.seed == 1
    again = run_batch(tiny_pipeline, items, out, GenerationRequest("", steps=1))  # a resume keeps every series
    assert sorted(again.skipped) == sorted(item.name for item in items)
    other = BatchFolder(tmp_path / "other", "dicom")  # another batch: other studies, even for the same report
    run_batch(tiny_pipeline, items[:1], other, GenerationRequest("", steps=1))
    elsewhere = pydicom.dcmread(next((other.folder / "nodule_s0.dcm").iterdir()))
    assert elsewhere.StudyInstanceUID != studies["nodule_s0.dcm"][0]
