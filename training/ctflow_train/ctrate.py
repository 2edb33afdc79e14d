"""Reading CT-RATE: a folder tree of .nii.gz volumes, the reports CSV and the metadata CSV.

Early CT-RATE releases have blank NIfTI headers (identity affine, unit spacing, no rescaling); for
those the metadata CSV supplies spacing, orientation, position and rescale slope/intercept. A header
that carries its own geometry is trusted and the metadata is only used to check the shape.

One bad file must not end a run over tens of thousands: each problem becomes a line in the skip report.
"""

from __future__ import annotations

import argparse
import csv
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from ctflow.errors import CTFlowError
from ctflow.report import Report
from ctflow.volume import Geometry, to_canonical

from .dataset import DatasetWriter, check_free
from .options import add_model_space_options, add_overwrite_option, print_json
from .preprocess import prepare

SUFFIX = ".nii.gz"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError, ImageFileError)  # what damaged files raise


class SkipVolume(Exception):
    """A volume that cannot be used; the message is the reason in the skip report."""


def find_volumes(root: str | Path) -> dict[str, Path]:
    """Volume name (file name without .nii.gz) -> path, searching sub-folders; sorted by name."""
    found = {path.name[: -len(SUFFIX)]: path for path in Path(root).rglob(f"*{SUFFIX}") if path.is_file()}
    return dict(sorted(found.items()))


def read_reports(path: str | Path) -> dict[str, Report]:
    """VolumeName -> Report(Findings_EN, Impressions_EN)."""
    return {
        row["VolumeName"].removesuffix(SUFFIX): Report(_text(row.get("Findings_EN")), _text(row.get("Impressions_EN")))
        for row in _rows(path, ("VolumeName", "Findings_EN", "Impressions_EN"))
    }


def read_metadata(path: str | Path) -> dict[str, dict[str, str]]:
    """VolumeName -> the metadata row (all columns as text)."""
    return {row["VolumeName"].removesuffix(SUFFIX): row for row in _rows(path)}


def load_volume(path: str | Path, metadata: dict[str, str] | None = None) -> tuple[np.ndarray, Geometry]:
    """HU in canonical [k, j, i] order and its geometry; raises SkipVolume with a reason when unusable."""
    image = nib.load(str(path))
    if metadata is not None:
        _check_shape(image.shape, metadata)
    if _is_blank(image):
        if metadata is None:
            raise SkipVolume("blank NIfTI header (identity affine) and no metadata row")
        raw = np.asarray(image.dataobj, dtype=np.float32)
        hu = raw * _number(metadata, "RescaleSlope", 1.0) + _number(metadata, "RescaleIntercept", 0.0)
        affine = affine_from_metadata(metadata)
    else:
        hu, affine = image.get_fdata(dtype=np.float32), image.affine
    if hu.ndim != 3:
        raise SkipVolume(f"expected a 3-D volume, found shape {hu.shape}")
    if not np.all(np.isfinite(hu)):
        raise SkipVolume("non-finite voxel values (NaN or inf)")
    if hu.min() > -500:
        raise SkipVolume(f"no air in the volume (minimum {hu.min():.0f} HU): rescale slope/intercept missing?")
    return to_canonical(hu, affine)


def affine_from_metadata(metadata: dict[str, str]) -> np.ndarray:
    """RAS affine from the DICOM fields of a metadata row.

    Assumes the stored array is laid out as DICOM-to-NIfTI converters write it: axis 0 along the
    row direction (columns), axis 1 along the column direction (rows), axis 2 along the slice normal
    starting at ImagePositionPatient. Missing orientation/position default to axial at the origin.
    """
    row_spacing, column_spacing = _numbers(metadata, "XYSpacing", 2)
    cosines = _numbers(metadata, "ImageOrientationPatient", 6, default=[1, 0, 0, 0, 1, 0])
    position = _numbers(metadata, "ImagePositionPatient", 3, default=[0, 0, 0])
    along_row, along_column = np.array(cosines[:3]), np.array(cosines[3:])
    lps = np.eye(4)
    lps[:3, 0] = along_row * column_spacing
    lps[:3, 1] = along_column * row_spacing
    lps[:3, 2] = np.cross(along_row, along_column) * _number(metadata, "ZSpacing")
    lps[:3, 3] = position
    ras = lps.copy()
    ras[:3] = _LPS_TO_RAS @ lps[:3]
    return ras


def prepare_ctrate(
    root: str | Path,
    reports_csv: str | Path,
    out: str | Path,
    metadata_csv: str | Path | None = None,
    size: int = 256,
    slice_spacing: float = 2.5,
    overwrite: bool = False,
) -> dict:
    """Convert every volume under `root` that has a report into the model space; returns a summary."""
    if not Path(root).is_dir():
        raise CTFlowError(f"CT-RATE folder {root} does not exist")
    check_free(Path(out), overwrite)
    reports = read_reports(reports_csv)
    metadata = read_metadata(metadata_csv) if metadata_csv else {}
    writer = DatasetWriter(out, overwrite)
    try:
        for name, path in find_volumes(root).items():
            report = reports.get(name)
            if report is None or not (report.findings or report.impressions):
                writer.skip(name, path, "no report (Findings/Impressions) for this volume")
                continue
            try:
                volume = prepare(*load_volume(path, metadata.get(name)), size, slice_spacing)
            except SkipVolume as exc:
                writer.skip(name, path, str(exc))
                continue
            except _READ_ERRORS as exc:
                writer.skip(name, path, f"unreadable: {type(exc).__name__}: {exc}")
                continue
            writer.add(name, volume, report)
    finally:
        writer.close()
    return writer.summary()


def _is_blank(image: nib.Nifti1Image) -> bool:
    header = image.header
    no_codes = int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0
    return no_codes or np.allclose(image.affine, np.eye(4))


def _check_shape(shape: tuple[int, ...], metadata: dict[str, str]) -> None:
    """Rows/Columns/NumberofSlices, where the metadata has them, must match the array.

    In-plane the order is not checked: converters differ in which axis holds the DICOM rows.
    """
    columns, rows, slices = (
        int(_number(metadata, key)) if (metadata.get(key) or "").strip() else None for key in ("Columns", "Rows", "NumberofSlices")
    )
    in_plane = columns is None or rows is None or sorted(shape[:2]) == sorted((columns, rows))
    along = slices is None or (len(shape) > 2 and shape[2] == slices)
    if not (in_plane and along):
        raise SkipVolume(f"shape {tuple(shape)} does not match metadata Columns/Rows/NumberofSlices {columns}/{rows}/{slices}")


def _rows(path: str | Path, columns: tuple[str, ...] = ("VolumeName",)) -> list[dict[str, str]]:
    """The rows of a CT-RATE CSV whose header names `columns` (a row may leave any but VolumeName empty)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
    except FileNotFoundError as exc:
        raise CTFlowError(f"CSV file {path} does not exist") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CTFlowError(f"{path} is not a UTF-8 CSV file: {exc}") from exc
    missing = [column for column in columns if column not in (reader.fieldnames or ())]
    if missing:
        raise CTFlowError(f"{path} has no {', '.join(missing)} column{'s' if len(missing) > 1 else ''}")
    return rows


def _text(value: str | None) -> str:
    return " ".join((value or "").split())


def _numbers(metadata: dict[str, str], key: str, count: int, default: list[float] | None = None) -> list[float]:
    """Numbers from a cell such as "[0.75, 0.75]" or "0.75\\0.75"."""
    values = [float(v) for v in re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", metadata.get(key) or "")]
    if not values and default is not None:
        return [float(v) for v in default]
    if len(values) != count:
        raise SkipVolume(f"metadata {key}={metadata.get(key)!r}: expected {count} numbers")
    return values


def _number(metadata: dict[str, str], key: str, default: float | None = None) -> float:
    """One number; a missing cell gives `default`, or a skip when there is none."""
    if not (metadata.get(key) or "").strip():
        if default is None:
            raise SkipVolume(f"metadata has no {key}")
        return default
    return _numbers(metadata, key, 1)[0]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, required=True, help="folder tree holding the CT-RATE .nii.gz volumes")
    parser.add_argument("--reports", type=Path, required=True,
                        help="reports CSV (VolumeName, Findings_EN, Impressions_EN, ...)")
    parser.add_argument("--metadata", type=Path, help="metadata CSV, needed for volumes with blank NIfTI headers")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    add_model_space_options(parser)
    add_overwrite_option(parser)


def run(args: argparse.Namespace) -> int:
    return print_json(prepare_ctrate(args.root, args.reports, args.out, args.metadata, args.size, args.slice_spacing,
                                     args.overwrite))
