"""Writers and readers: geometry and provenance round-trip, checked against ctflow's reader and Slicer's own."""

import json
import os

import nibabel as nib
import nrrd
import numpy as np
import pytest

from ctflow import Geometry, OutputExistsError, Provenance, Volume, read_volume, write_volume
from ctflow.errors import CTFlowError
from ctflow.io import StagedWrites, atomic_write, volume_stem, volume_suffix

OBLIQUE = np.array([[-0.96, 0.28, 0.0], [-0.28, -0.96, 0.0], [0.0, 0.0, -1.0]])  # rotated in-plane, head first


@pytest.fixture
def volume():
    provenance = Provenance(
        report="Findings: Right pleural effusion.\nImpressions: Effusion; \\ not \"quoted\" — ünïcode.",
        prompt="Findings: ...\nLength: 5 slices", seed=123, steps=12, sampler="heun", shift=2.0, guidance=1.5,
        model="ctflow-demo", model_sha256="ab" * 32, ctflow_version="0.1.0", device="cpu", slices_requested=5,
        partial=True,
    )
    hu = np.random.default_rng(0).integers(-1000, 1000, size=(5, 6, 7)).astype(np.int16)
    return Volume(hu, Geometry((0.7, 0.8, 2.5), (10.0, -20.0, 30.0), OBLIQUE), provenance)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_round_trip_keeps_voxels_geometry_and_provenance(volume, tmp_path, suffix):
    path = write_volume(volume, tmp_path / f"ct{suffix}")
    back = read_volume(path)
    assert np.array_equal(back.hu, volume.hu) and back.hu.dtype == np.int16
    assert np.allclose(back.geometry.ijk_to_ras(), volume.geometry.ijk_to_ras(), atol=1e-5)
    assert back.provenance == volume.provenance
    assert [p.name for p in tmp_path.iterdir()] == [f"ct{suffix}"]  # no temporary file left behind


def test_headers_say_synthetic_where_other_tools_look(volume, tmp_path):
    nifti = nib.load(write_volume(volume, tmp_path / "ct.nii.gz"))
    assert b"SYNTHETIC" in nifti.header["descrip"].tobytes()
    assert nifti.header.get_sform(coded=True)[1] == 1
    extension = json.loads(nifti.header.extensions[0].get_content())
    assert "SYNTHETIC" in extension["ctflow_provenance"]["synthetic"]
    _, header = nrrd.read(str(write_volume(volume, tmp_path / "ct.nrrd")))
    assert "SYNTHETIC" in header["content"] and header["space"] == "left-posterior-superior"
    assert "\n" not in header["CTFlow_report"]  # escaped: a NRRD field is one line


@pytest.mark.parametrize("space, flip", [("right-anterior-superior", (1, 1, 1)), ("RAS", (1, 1, 1)),
                                         ("left-anterior-superior", (-1, 1, 1)), ("LPS", (-1, -1, 1))])
def test_a_nrrd_in_another_patient_frame_is_read_into_ras(tmp_path, space, flip):
    directions, origin = np.diag([0.7, 0.8, 2.5]), np.array([10.0, -20.0, 30.0])
    nrrd.write(str(tmp_path / "ct.nrrd"), np.zeros((7, 6, 5), np.int16),
               {"space": space, "space directions": directions, "space origin": origin}, index_order="F")
    geometry = read_volume(tmp_path / "ct.nrrd").geometry.ijk_to_ras()
    assert np.allclose(geometry[:3, :3], np.diag(flip) @ directions.T)
    assert np.allclose(geometry[:3, 3], np.array(flip) * origin)


def test_a_nrrd_in_a_scanner_frame_is_refused_in_one_line(tmp_path):
    nrrd.write(str(tmp_path / "ct.nrrd"), np.zeros((7, 6, 5), np.int16),
               {"space": "scanner-xyz", "space directions": np.eye(3), "space origin": np.zeros(3)}, index_order="F")
    with pytest.raises(CTFlowError, match="NRRD space 'scanner-xyz', not a patient frame"):
        read_volume(tmp_path / "ct.nrrd")


def world_values(array_kji, ijk_to_ras):
    """{RAS position (0.01 mm): HU} for every voxel: compares two files whatever their axis order."""
    k, j, i = np.indices(array_kji.shape).reshape(3, -1)
    ras = ijk_to_ras[:3, :3] @ np.stack([i, j, k]) + ijk_to_ras[:3, 3:4]
    return dict(zip(map(tuple, np.round(ras.T, 2)), array_kji.reshape(-1).tolist()))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_slicer_reads_the_same_voxels_at_the_same_places(volume, tmp_path, suffix):
    """Our RAS convention, checked by Slicer's own reader (slicer-core's MRML storage node)."""
    import slicer
    import vtk

    path = write_volume(volume, tmp_path / f"ct{suffix}")
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    slicer_ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    array = slicer.util.arrayFromVolume(node)
    assert world_values(array, slicer_ijk_to_ras) == world_values(volume.hu, volume.geometry.ijk_to_ras())


def test_existing_files_are_never_replaced_unless_asked(volume, tmp_path):
    target = tmp_path / "mine.nii.gz"
    target.write_bytes(b"the user's own file")
    with pytest.raises(OutputExistsError, match="already exists"):
        write_volume(volume, target)
    assert target.read_bytes() == b"the user's own file"
    write_volume(volume, target, overwrite=True)
    assert np.array_equal(read_volume(target).hu, volume.hu)


def test_written_files_get_the_permissions_of_a_plain_open(volume, tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    path = write_volume(volume, tmp_path / "ct.nii.gz")
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not the temporary file's private 0o600


def test_a_failed_write_leaves_nothing(tmp_path):
    def broken(tmp):
        tmp.write_bytes(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "ct.nii.gz", broken)
    assert list(tmp_path.iterdir()) == []


def test_a_commit_that_fails_half_way_puts_back_what_it_replaced(tmp_path):
    """A volume, its preview and a DICOM series commit together: the one that cannot be placed undoes the others."""
    (tmp_path / "preview.png").write_bytes(b"old preview")
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "0001.dcm").write_bytes(b"old slice")
    with StagedWrites(overwrite=True) as staged:
        staged.add(tmp_path / "preview.png", lambda tmp: tmp.write_bytes(b"new preview"))
        staged.add_folder(tmp_path / "series", lambda tmp: (tmp / "0001.dcm").write_bytes(b"new slice"))
        staged.add(tmp_path / "ct.nii.gz", lambda tmp: tmp.write_bytes(b"new volume"))
        (tmp_path / "ct.nii.gz").mkdir()  # after staging: the last move cannot be made
        (tmp_path / "ct.nii.gz" / "a user's file").write_bytes(b"kept")
        with pytest.raises(OSError):
            staged.commit()
    assert (tmp_path / "preview.png").read_bytes() == b"old preview"
    assert (tmp_path / "series" / "0001.dcm").read_bytes() == b"old slice"
    assert (tmp_path / "ct.nii.gz" / "a user's file").read_bytes() == b"kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "preview.png", "series"]  # no temporaries


def test_a_commit_replaces_files_and_folders_together(tmp_path):
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "0001.dcm").write_bytes(b"old slice")
    with StagedWrites(overwrite=True) as staged:
        staged.add(tmp_path / "preview.png", lambda tmp: tmp.write_bytes(b"new preview"))
        staged.add_folder(tmp_path / "series", lambda tmp: (tmp / "0002.dcm").write_bytes(b"new slice"))
        staged.commit()
    assert (tmp_path / "preview.png").read_bytes() == b"new preview"
    assert [p.name for p in (tmp_path / "series").iterdir()] == ["0002.dcm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preview.png", "series"]


def test_writes_where_the_file_system_has_no_hard_links(tmp_path, monkeypatch):
    """FAT and exFAT drives and some network shares refuse os.link (and Linux refuses to link another user's file):
    new files are renamed into place after a last look, an old one is replaced without a way back."""
    (tmp_path / "old.png").write_bytes(b"old")

    def no_links(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with StagedWrites(overwrite=True) as staged:
        staged.add(tmp_path / "old.png", lambda tmp: tmp.write_bytes(b"new"))
        staged.add(tmp_path / "new.png", lambda tmp: tmp.write_bytes(b"made"))
        staged.commit()
    atomic_write(tmp_path / "other.png", lambda tmp: tmp.write_bytes(b"made too"))
    with pytest.raises(OutputExistsError):
        atomic_write(tmp_path / "other.png", lambda tmp: tmp.write_bytes(b"clobbered"))
    assert [(p.name, p.read_bytes()) for p in sorted(tmp_path.iterdir())] == [
        ("new.png", b"made"), ("old.png", b"new"), ("other.png", b"made too")]


@pytest.mark.parametrize("name, message", [("ct.mhd", "unsupported file type"), ("missing/ct.nrrd", "does not exist")])
def test_bad_output_paths(volume, tmp_path, name, message):
    with pytest.raises(CTFlowError, match=message):
        write_volume(volume, tmp_path / name)


def test_reading_damaged_or_foreign_files(tmp_path):
    damaged = tmp_path / "bad.nii.gz"
    damaged.write_bytes(b"not a nifti")
    with pytest.raises(CTFlowError, match="cannot read"):
        read_volume(damaged)
    plain = tmp_path / "plain.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), np.eye(4)), str(plain))
    assert read_volume(plain).provenance is None


def test_a_real_ct_without_provenance_is_not_marked_synthetic(volume, tmp_path):
    """Training data is written with the same writers; only what ctflow generated carries the mark."""
    real = Volume(volume.hu, volume.geometry, None)
    assert b"SYNTHETIC" not in nib.load(write_volume(real, tmp_path / "ct.nii.gz")).header["descrip"].tobytes()
    assert "content" not in nrrd.read_header(str(write_volume(real, tmp_path / "ct.nrrd")))


@pytest.mark.parametrize("name, suffix, stem", [
    ("65f4-ed.mha", ".mha", "65f4-ed"), ("dir/CT.NII.GZ", ".nii.gz", "CT"), ("ct.nii", ".nii", "ct"),
    ("ct.nrrd", ".nrrd", "ct"), ("series.DCM", "", "series"), ("patient.1.2", "", "patient.1.2"),
    ("case_two", "", "case_two"),
])
def test_one_rule_names_a_volume_files_suffix_and_stem(name, suffix, stem):
    """Batch (a challenge's input_image_name), QA (report names) and the writers share it: a DICOM series folder
    loses its .dcm but is no volume file; a dotted name without either keeps all of it."""
    assert (volume_suffix(name), volume_stem(name)) == (suffix, stem)
