"""Export a CTFlow volume node as a DICOM series marked synthetic, and add it to Slicer's DICOM database.

Slicer's own scalar-volume exporter writes ORIGINAL\\PRIMARY and no synthetic flag. This writes the series with
ctflow (Synthetic Data YES, the generator as Synthesizing Equipment, the full provenance; see ctflow/dicom.py),
then imports it into the DICOM database, from where the DICOM module can send it to a PACS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ctflow
import slicer

from .generation import volumeOf


@dataclass(frozen=True)
class DicomExport:
    folder: Path  # the series folder written
    instances: int  # files in it, one per slice
    description: str  # its Series Description: SYNTHETIC ... NOT FOR DIAGNOSIS, and INCOMPLETE for a partial volume
    imported: bool  # added to slicer.dicomDatabase
    message: str  # one line for the status bar


def exportDicom(node, folder: str | Path, overwrite: bool = False, database=None) -> DicomExport:
    """Write `node` as a series into `folder` and import it (copying the files) into `database`, by default
    slicer.dicomDatabase. Raises ctflow.CTFlowError for a node CTFlow did not make, and ctflow.OutputExistsError
    for a folder that exists (unless `overwrite`)."""
    import pydicom  # installed with the rest on the first Generate, as the library's writer needs it too

    volume = volumeOf(node)
    if volume.provenance is None:
        raise ctflow.CTFlowError(f"{node.GetName()} was not made by CTFlow: export it with Slicer's DICOM module")
    written = ctflow.write_dicom(volume, folder, overwrite=overwrite)
    files = sorted(written.iterdir())
    description = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesDescription
    wrote = f'Wrote the DICOM series {written}: {len(files)} instances, "{description}", Synthetic Data YES'
    reason = addToDicomDatabase(written, database)
    if reason is None:
        message = f"{wrote}; added to the DICOM database (the DICOM module sends it to a PACS)."
    else:
        message = f"{wrote}; not added to the DICOM database: {reason}."
    return DicomExport(written, len(files), description, reason is None, message)


def addToDicomDatabase(folder: Path, database=None) -> str | None:
    """Import the series with DICOMUtils (copying it into the database); the reason when that cannot be done."""
    try:
        from DICOMLib import DICOMUtils
    except ImportError:
        return "Slicer's DICOM module is not available"
    database = database if database is not None else getattr(slicer, "dicomDatabase", None)
    if database is None or not database.isOpen:
        return "no DICOM database is open (open the DICOM module once)"
    if DICOMUtils.importDicom(str(folder), database, copyFiles=True) is False:
        return "the import failed (details in the Python console)"
    return None
