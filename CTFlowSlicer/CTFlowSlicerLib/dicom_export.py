"""Export a CTFlow volume node as a DICOM series marked synthetic, and add it to Slicer's DICOM database.

Slicer's own scalar-volume exporter writes ORIGINAL\\PRIMARY and no synthetic flag. This writes the series with
ctflow (Synthetic Data YES, the generator as Synthesizing Equipment, the full provenance; see ctflow/dicom.py),
then imports it into the DICOM database, from where the DICOM module can send it to a PACS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ctflow
import numpy as np
import slicer

from .generation import ijkToRAS, provenanceOf


@dataclass(frozen=True)
class DicomExport:
    folder: Path  # the series folder written
    imported: bool  # added to slicer.dicomDatabase
    message: str  # one line for the status bar


def volumeOf(node) -> ctflow.Volume:
    """The node as a ctflow Volume: voxels [k, j, i], its IJK-to-RAS, and the provenance stored on it."""
    return ctflow.Volume(
        slicer.util.arrayFromVolume(node).astype(np.int16),
        ctflow.Geometry.from_ijk_to_ras(ijkToRAS(node)),
        provenanceOf(node),
    )


def exportDicom(node, folder: str | Path, overwrite: bool = False, database=None) -> DicomExport:
    """Write `node` as a series into `folder` and import it (copying the files) into `database`, by default
    slicer.dicomDatabase. Raises ctflow.CTFlowError for a node CTFlow did not make or a folder that exists."""
    volume = volumeOf(node)
    if volume.provenance is None:
        raise ctflow.CTFlowError(f"{node.GetName()} was not made by CTFlow: export it with Slicer's DICOM module")
    written = ctflow.write_dicom(volume, folder, overwrite=overwrite)
    slices = f"{volume.shape[0]} slices"
    reason = addToDicomDatabase(written, database)
    if reason is None:
        return DicomExport(written, True, f"Wrote {written} ({slices}) and added it to the DICOM database")
    return DicomExport(written, False, f"Wrote {written} ({slices}); not added to the DICOM database: {reason}")


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
