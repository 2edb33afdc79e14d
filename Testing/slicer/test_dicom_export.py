"""Export DICOM from a volume node: the series the library writes from the node's voxels, geometry and provenance,
read back by ctflow and by Slicer's own reader (slicer-core). Slicer's DICOM database (ctk) does not exist outside
the Slicer application: its import is checked against standin.py's, which indexes the files the way ctk's does."""

from __future__ import annotations

from pathlib import Path

import ctflow
import nibabel as nib
import numpy as np
import pydicom
import pytest
import slicer

from CTFlowSlicerLib import dicom_export, generation

ROTATED = np.array([[-0.96, 0.28, 0.0], [-0.28, -0.96, 0.0], [0.0, 0.0, -1.0]])


@pytest.fixture
def node(scene):
    """A volume node as the module leaves it after a generation: voxels, IJK-to-RAS and provenance attributes."""
    provenance = ctflow.Provenance(
        report="Findings: Small left pleural effusion.\nImpressions: Effusion.", prompt="...", seed=7, steps=2,
        sampler="euler", shift=1.0, guidance=1.0, model="random-tiny", model_sha256="cd" * 32, ctflow_version="0.1.0",
        block_slices=4,
    )
    hu = np.random.default_rng(2).integers(-1000, 1500, size=(6, 8, 9)).astype(np.int16)
    volume = ctflow.Volume(hu, ctflow.Geometry((0.7, 0.8, 2.5), (5.0, -3.0, 40.0), ROTATED), provenance)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", generation.volumeName(provenance))
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(volume.geometry.ijk_to_ras()))
    for key, value in provenance.as_dict().items():
        node.SetAttribute(generation.attributeName(key), value)
    slicer.util.updateVolumeFromArray(node, volume.hu)
    return node


def canonical(array_kji, ijk_to_ras):
    image = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array_kji).transpose(2, 1, 0), ijk_to_ras))
    return np.asarray(image.dataobj), image.affine


def test_the_series_holds_the_node_and_slicer_reads_it_back(node, tmp_path):
    result = dicom_export.exportDicom(node, tmp_path / "ct.dcm")
    assert result.folder == tmp_path / "ct.dcm" and not result.imported
    assert "not added to the DICOM database" in result.message and "6 instances" in result.message
    back = ctflow.read_volume(result.folder)
    assert np.array_equal(back.hu, slicer.util.arrayFromVolume(node))
    assert np.allclose(back.geometry.ijk_to_ras(), generation.ijkToRAS(node), atol=1e-6)
    assert back.provenance == generation.provenanceOf(node)
    assert pydicom.dcmread(next(result.folder.iterdir())).SyntheticData == "YES"
    # Slicer's own reader (ITK/GDCM archetype) loads the series into a fresh node at the same places
    scene = slicer.vtkMRMLScene()
    loaded = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(sorted(result.folder.iterdir())[0]))
    assert storage.ReadData(loaded)
    theirs = canonical(slicer.util.arrayFromVolume(loaded), generation.ijkToRAS(loaded))
    ours = canonical(slicer.util.arrayFromVolume(node), generation.ijkToRAS(node))
    assert np.array_equal(theirs[0], ours[0]) and np.allclose(theirs[1], ours[1], atol=1e-4)


def test_a_volume_ctflow_did_not_make_is_not_exported(scene, tmp_path):
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "patient CT")
    slicer.util.updateVolumeFromArray(other, np.zeros((2, 3, 3), np.int16))
    with pytest.raises(ctflow.CTFlowError, match="not made by CTFlow"):
        dicom_export.exportDicom(other, tmp_path / "ct.dcm")
    assert list(tmp_path.iterdir()) == []


def test_edited_provenance_attributes_stop_the_export_with_one_line(node, tmp_path):
    node.SetAttribute("CTFlow.seed", "seven")
    with pytest.raises(ctflow.CTFlowError, match="do not read as a provenance: invalid literal"):
        dicom_export.exportDicom(node, tmp_path / "ct.dcm")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_kept_unless_overwrite(node, tmp_path):
    def series(folder: Path) -> tuple[str, dict[str, bytes]]:
        files = {path.name: path.read_bytes() for path in sorted(folder.iterdir())}
        return pydicom.dcmread(folder / next(iter(files))).SeriesInstanceUID, files

    folder = dicom_export.exportDicom(node, tmp_path / "ct.dcm").folder
    first = series(folder)
    with pytest.raises(ctflow.OutputExistsError):
        dicom_export.exportDicom(node, tmp_path / "ct.dcm")
    assert series(folder) == first  # kept, byte for byte
    assert dicom_export.exportDicom(node, tmp_path / "ct.dcm", overwrite=True).folder == folder
    assert series(folder)[0] != first[0]  # replaced by a new series


def test_the_series_is_added_to_the_dicom_database(node, tmp_path, dicom_database):
    result = dicom_export.exportDicom(node, tmp_path / "ct.dcm")
    assert result.imported and "; added to the DICOM database" in result.message
    series = pydicom.dcmread(next(result.folder.iterdir())).SeriesInstanceUID
    copies = dicom_database.filesForSeries(series)
    assert len(copies) == result.instances == 6
    assert all(Path(copy).is_relative_to(dicom_database.databaseDirectory) for copy in copies)
    dicom_database.isOpen = False
    closed = dicom_export.exportDicom(node, tmp_path / "again.dcm")
    assert not closed.imported and "no DICOM database is open" in closed.message
