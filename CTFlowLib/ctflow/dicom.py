"""DICOM: a generated CT as a CT Image Storage series marked synthetic by the standard's own attribute, and back.

What every instance (one per slice) carries, so a PACS, a viewer and a radiologist all see what it is:
- Synthetic Data (0008,001C) = YES (PS3.3 C.12.1, SOP Common); Image Type DERIVED\\SECONDARY\\AXIAL; Burned In
  Annotation NO; Series Description, Study Description and Image Comments that say SYNTHETIC, not for diagnosis.
- The generator as a Contributing Equipment Sequence (0018,A001) item with Purpose of Reference (109100, DCM,
  "Synthesizing Equipment"): CTFlow and its version, the model id, the model's SHA-256 (model_folder.model_sha256) as Device Serial Number.
- A fictitious patient: name SYNTHETIC^CTFLOW, id SYNTHETIC-<hash of the study UID>; nothing is taken from anywhere.
- The full provenance as JSON (ASCII) in a private block: creator "CTFlow provenance" in group 0011, element
  (0011,xx00) UT. Standard text attributes cannot hold it (length limits, no structure); a private block is
  what the standard offers for it, and `read_dicom` turns it back into the same `Provenance`.
- UIDs under the root 2.25 (UUID-derived, PS3.5 B.2): no organisation root to register, fresh for every write.
- Geometry: Image Position/Orientation (Patient) in LPS from the volume's RAS geometry, Pixel Spacing, Slice
  Thickness and Spacing Between Slices; int16 HU with Rescale Slope 1 and Intercept 0.

A series is written into a sibling temporary folder and renamed into place, so no half-written series is ever
seen; an existing folder is replaced only when asked, and only if it holds nothing but DICOM files.
Reading accepts ordinary CT series as well (any single-frame image series in one folder, uncompressed unless
pydicom has a decoder for its transfer syntax).
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .checksums import TOOL_FILES
from .conventions import SYNTHETIC_DESCRIPTION, WINDOWS
from .errors import CTFlowError, OutputExistsError, first_line
from .io import atomic_folder, check_writable_folder
from .volume import RAS_TO_LPS, Geometry, Provenance, Volume, hu_voxels

UID_ROOT = "2.25."  # ISO/IEC 9834-8 UUID-derived UIDs (PS3.5 B.2)
IMPLEMENTATION_CLASS_UID = f"{UID_ROOT}{uuid.uuid5(uuid.NAMESPACE_URL, 'urn:ctflow:dicom-writer').int}"
PRIVATE_GROUP, PRIVATE_CREATOR = 0x0011, "CTFlow provenance"
SYNTHESIZING_EQUIPMENT = ("109100", "DCM", "Synthesizing Equipment")
NOT_FOR_DIAGNOSIS = SYNTHETIC_DESCRIPTION
PATIENT_NAME = "SYNTHETIC^CTFLOW"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_SHOWN_WINDOWS = ("soft tissue", "lung")


def new_uid() -> str:
    return f"{UID_ROOT}{uuid.uuid4().int}"


def derived_uid(namespace: str, name: str) -> str:
    """The same UID from the same (namespace UUID, name): lets batch ranks agree on a study without talking."""
    return f"{UID_ROOT}{uuid.uuid5(uuid.UUID(namespace), name).int}"


@dataclass(frozen=True)
class Study:
    """The study a series joins: series written with one Study share its UID, date and fictitious patient."""

    uid: str = field(default_factory=new_uid)
    description: str = NOT_FOR_DIAGNOSIS
    created: _dt.datetime = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc))

    @property
    def patient_id(self) -> str:
        return "SYNTHETIC-" + hashlib.sha256(self.uid.encode()).hexdigest()[:12].upper()


# -- writing -------------------------------------------------------------------------------------------------------


def write_dicom(
    volume: Volume, folder: str | os.PathLike, overwrite: bool = False, study: Study | None = None,
    series_number: int = 1,
) -> Path:
    """Write `volume` as a CT series into `folder` (created atomically); returns the folder."""
    folder = check_dicom_folder(folder, overwrite)
    return atomic_folder(folder, dicom_writer(volume, study, series_number), overwrite)


def dicom_writer(volume: Volume, study: Study | None = None, series_number: int = 1) -> Callable[[Path], None]:
    """fill(folder) writing `volume` as one CT series of `study` (io.StagedWrites.add_folder); refuses a volume
    without provenance before any work."""
    import pydicom  # noqa: F401  (fail here, not half-way, if pydicom is missing)

    if volume.provenance is None:
        raise CTFlowError("only volumes CTFlow generated (they carry provenance) are written as DICOM: "
                          "the series is marked synthetic, which another CT is not")
    created = _dt.datetime.fromisoformat(volume.provenance.created).astimezone(_dt.timezone.utc)
    study = study or Study(created=created)  # not dated after the series (both in UTC)
    header = series_header(volume, study, series_number)
    width = max(4, len(str(volume.shape[0])))

    def fill(folder: Path) -> None:
        for k in range(volume.shape[0]):
            slice_instance(header, volume, k).save_as(folder / f"{k + 1:0{width}d}.dcm", enforce_file_format=True)

    return fill


def check_dicom_folder(folder: str | os.PathLike, overwrite: bool) -> Path:
    """Fail before any work if `folder` cannot take a series; only a folder of DICOM files is ever replaced."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        raise CTFlowError(f"output folder {folder.parent} does not exist")
    check_writable_folder(folder.parent)
    if folder.exists() or folder.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{folder} already exists; choose another name or pass --overwrite")
        if folder.is_symlink() or not folder.is_dir() or not all(is_dicom_file(p) or p.name in TOOL_FILES
                                                                  for p in folder.iterdir()):  # Finder's .DS_Store
            raise OutputExistsError(f"{folder} is not a folder of DICOM files only; not replacing it")
    return folder


def series_header(volume: Volume, study: Study, series_number: int):
    """Everything the instances of one series share (a pydicom Dataset without pixels or per-slice attributes)."""
    from pydicom.dataset import Dataset

    provenance = volume.provenance
    created = _dt.datetime.fromisoformat(provenance.created).astimezone(_dt.timezone.utc)
    ds = Dataset()
    # Patient and study: fictitious, and say so
    ds.PatientName = PATIENT_NAME
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"  # nothing identifies a person: there is none
    ds.DeidentificationMethod = "No patient: synthetic image, fictitious name and id"
    ds.StudyInstanceUID = study.uid
    ds.StudyDate, ds.StudyTime = _date(study.created), _time(study.created)
    ds.StudyID = "CTFLOW"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = _lo(study.description)
    # Series, equipment, frame of reference
    ds.Modality = "CT"
    ds.SeriesInstanceUID = new_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = _date(created), _time(created)
    ds.SeriesDescription = _lo(f"{NOT_FOR_DIAGNOSIS}{' - INCOMPLETE' if provenance.partial else ''}")
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.Manufacturer = "CTFlow"
    ds.ManufacturerModelName = _lo(provenance.model)
    ds.SoftwareVersions = _lo(f"ctflow {provenance.ctflow_version}")
    ds.FrameOfReferenceUID = new_uid()
    ds.PositionReferenceIndicator = ""
    # Image: derived, synthetic, never burned in
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.DerivationDescription = "Synthesized by CTFlow from a radiology report; no patient was imaged"
    ds.ContentDate, ds.ContentTime = _date(created), _time(created)
    ds.AcquisitionNumber = None
    ds.KVP = None  # no X-rays were used
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ImageComments = provenance.synthetic + (". INCOMPLETE: the generation was stopped early" if provenance.partial
                                               else "")
    # Pixels: signed int16 HU
    rows, columns = volume.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
    ds.WindowCenter = [WINDOWS[name].level for name in _SHOWN_WINDOWS]
    ds.WindowWidth = [WINDOWS[name].width for name in _SHOWN_WINDOWS]
    ds.WindowCenterWidthExplanation = [name.replace(" ", "_").upper() for name in _SHOWN_WINDOWS]
    _set_geometry_shared(ds, volume.geometry)
    # SOP common: the synthetic flag and who made it
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SyntheticData = "YES"
    ds.TimezoneOffsetFromUTC = "+0000"
    now = _dt.datetime.now(_dt.timezone.utc)
    ds.InstanceCreationDate, ds.InstanceCreationTime = _date(now), _time(now)
    ds.ContributingEquipmentSequence = [_synthesizing_equipment(provenance, created)]
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x00, "UT", json.dumps(provenance.as_dict(), sort_keys=True))
    return ds


def _synthesizing_equipment(provenance: Provenance, created: _dt.datetime):
    from pydicom.dataset import Dataset

    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = SYNTHESIZING_EQUIPMENT
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [purpose]
    item.Manufacturer = "CTFlow"
    item.ManufacturerModelName = _lo(provenance.model)
    item.DeviceSerialNumber = provenance.model_sha256[:64]  # the model's SHA-256 names this exact generator
    item.SoftwareVersions = _lo(f"ctflow {provenance.ctflow_version}")
    item.ContributionDateTime = created.strftime("%Y%m%d%H%M%S+0000")
    item.ContributionDescription = _ascii(
        f"Synthetic CT generated from a text report by CTFlow {provenance.ctflow_version}: model {provenance.model}, "
        f"model sha256 {provenance.model_sha256}, seed {provenance.seed}, {provenance.steps} {provenance.sampler} "
        f"steps, guidance {provenance.guidance:g}, side guidance {provenance.side_guidance:g}, finding guidance "
        f"{provenance.finding_guidance:g}"
    )[:1024]
    return item


def _set_geometry_shared(ds, geometry: Geometry) -> None:
    """Orientation and spacing (the same for every slice); positions are set per slice."""
    direction = np.asarray(geometry.direction, dtype=float) * RAS_TO_LPS[:, None]  # columns: LPS of i, j, k
    si, sj, sk = geometry.spacing
    ds.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
    ds.PixelSpacing = [_ds(sj), _ds(si)]  # between rows (along j), between columns (along i)
    ds.SliceThickness = _ds(sk)
    ds.SpacingBetweenSlices = _ds(sk)


def slice_instance(header, volume: Volume, k: int):
    """Instance k of the series: the shared header plus its own UID, number, position and pixels."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = copy.deepcopy(header)
    ds.SOPInstanceUID = new_uid()
    ds.InstanceNumber = k + 1
    matrix = volume.geometry.ijk_to_ras()
    position = (matrix[:3, :3] @ np.array([0.0, 0.0, float(k)]) + matrix[:3, 3]) * RAS_TO_LPS
    ds.ImagePositionPatient = [_ds(v) for v in position]
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    ds.SliceLocation = _ds(float(position @ normal))
    ds.PixelData = np.ascontiguousarray(volume.hu[k], dtype="<i2").tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = f"CTFLOW_{__version__}"[:16]
    ds.file_meta = meta
    return ds


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters, as precise as that allows."""
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value) + 0.0)  # + 0.0 turns -0.0 into 0.0


def _ascii(text: str) -> str:
    """Text in the default character repertoire (the series sets no Specific Character Set): others become '?'."""
    return text.encode("ascii", "replace").decode()


def _lo(text: str) -> str:
    """A Long String value: ASCII, no backslash (the value separator), at most 64 characters (the end kept)."""
    text = _ascii(text).replace("\\", "/")
    return text if len(text) <= 64 else "..." + text[-61:]


def _date(moment: _dt.datetime) -> str:
    return moment.strftime("%Y%m%d")


def _time(moment: _dt.datetime) -> str:
    return moment.strftime("%H%M%S")


# -- reading -------------------------------------------------------------------------------------------------------


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: 'DICM' after the 128-byte preamble."""
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:  # a folder, unreadable, gone
        return False


def is_dicom_folder(path: Path) -> bool:
    """A folder holding at least one DICOM file (not looking into subfolders)."""
    return path.is_dir() and any(is_dicom_file(p) for p in path.iterdir())


def read_dicom(path: str | os.PathLike) -> Volume:
    """The image series in a folder, or the series a given file belongs to (its folder's other instances).

    Slices are ordered along the slice normal, in the direction of rising Instance Number, so a series written by
    `write_dicom` reads back slice for slice. Provenance is None for a series CTFlow did not write.
    """
    import pydicom

    path = Path(path)
    if path.is_file():
        folder, wanted = path.parent, _read_header(path)
        if wanted is None:
            raise CTFlowError(f"{path} is not a DICOM image")
        wanted = wanted.SeriesInstanceUID
    elif path.is_dir():
        folder, wanted = path, None
    else:
        raise CTFlowError(f"{path} does not exist")
    series: dict[str, list] = {}
    for file in sorted(folder.iterdir()):
        header = _read_header(file) if file.is_file() else None
        if header is not None:
            series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append((file, header))
    if not series:
        raise CTFlowError(f"{folder} holds no DICOM image series")
    if wanted is None and len(series) > 1:
        names = "; ".join(f"{len(v)} x {v[0][1].get('SeriesDescription', '') or uid}" for uid, v in series.items())
        raise CTFlowError(f"{folder} holds {len(series)} series ({names}): give the path of one file of the series")
    instances = series[wanted if wanted is not None else next(iter(series))]
    try:
        files, geometry = _order_and_geometry(folder, instances)
        hu = np.empty((len(files), *_shape(instances[0][1])), np.int16)
        for k, file in enumerate(files):
            hu[k] = _hu(pydicom.dcmread(file), file)
    except CTFlowError:
        raise
    except Exception as exc:  # a damaged header: pydicom and numpy raise many types
        raise CTFlowError(f"cannot read the DICOM series in {folder}: {first_line(exc)}") from exc
    return Volume(hu, geometry, _provenance(instances[0][1]))


def _read_header(file: Path):
    """The header of a single-frame image instance, or None for anything else (other files, DICOMDIR, reports)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        header = pydicom.dcmread(file, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None
    if any(key not in header for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows")):
        return None  # not a slice that can be placed in space
    if int(header.get("NumberOfFrames", 1) or 1) > 1:
        raise CTFlowError(f"{file} is a multi-frame (enhanced) image: only one-slice-per-file series are read")
    return header


def _shape(header) -> tuple[int, int]:
    return int(header.Rows), int(header.Columns)


def _order_and_geometry(folder: Path, instances: list) -> tuple[list[Path], Geometry]:
    first = instances[0][1]
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    for file, header in instances:
        if not np.allclose(np.asarray(header.ImageOrientationPatient, dtype=float), orientation, atol=1e-4) \
                or _shape(header) != _shape(first) or list(header.PixelSpacing) != list(first.PixelSpacing):
            raise CTFlowError(f"{file}: slices of the series in {folder} differ in orientation, size or pixel spacing")
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    positions = np.array([np.asarray(h.ImagePositionPatient, dtype=float) for _, h in instances])
    order = np.argsort(positions @ normal, kind="stable")
    numbers = [int(instances[i][1].get("InstanceNumber", 0) or 0) for i in order]
    if numbers[0] > numbers[-1]:
        order = order[::-1]
    positions = positions[order]
    if len(np.unique(np.round(positions @ normal, 4))) < len(positions):
        raise CTFlowError(f"the series in {folder} has several slices at one position (several phases or echoes)")
    if len(positions) > 1:
        step = (positions[-1] - positions[0]) / (len(positions) - 1)
        if not np.allclose(np.diff(positions, axis=0), step, atol=max(1e-3, 0.01 * np.linalg.norm(step))):
            raise CTFlowError(f"the slices of the series in {folder} are not evenly spaced (a slice missing?)")
    else:
        step = normal * float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
    between_rows, between_columns = (float(v) for v in first.PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * between_columns, column * between_rows, step, positions[0]
    ras = np.diag([*RAS_TO_LPS, 1.0]) @ lps
    return [instances[i][0] for i in order], Geometry.from_ijk_to_ras(ras)


def _hu(ds, file: Path) -> np.ndarray:
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises several types for missing decoders and damaged data
        syntax = getattr(ds.file_meta.get("TransferSyntaxUID"), "name", "unknown transfer syntax")
        raise CTFlowError(f"cannot decode the pixels of {file} ({syntax}): {exc}") from exc
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    return hu_voxels(pixels.astype(np.float64) * slope + intercept, file)


def _provenance(header) -> Provenance | None:
    try:
        text = header.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[0x00].value
        return Provenance.from_dict(json.loads(text))
    except (KeyError, ValueError, TypeError):
        return None
