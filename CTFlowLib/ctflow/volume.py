"""The result of a generation: HU voxels, their geometry, and where they came from.

Convention, stated once and kept everywhere: arrays are indexed [k, j, i] (slice, row, column), as
Slicer's arrayFromVolume; positions are RAS millimetres (Slicer's world space). Slice 0 is the most
superior slice: generation runs head to feet.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass, field

import numpy as np

from .conventions import SYNTHETIC_NOTICE
from .errors import CTFlowError

RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS (DICOM, MetaImage, NRRD's LPS space) flips x and y

# Columns are the RAS directions of i (to patient left), j (to posterior), k (to inferior).
HEAD_FIRST_AXIAL = np.diag([-1.0, -1.0, -1.0])
HEAD_FIRST_AXCODES = ("L", "P", "I")  # the same in nibabel's codes of i, j, k


@dataclass(frozen=True)
class Geometry:
    """Where voxels lie: spacing (mm) of i, j, k; RAS of voxel (0,0,0); columns = RAS unit vectors of i, j, k."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: HEAD_FIRST_AXIAL.copy())

    def ijk_to_ras(self) -> np.ndarray:
        matrix = np.eye(4)
        matrix[:3, :3] = np.asarray(self.direction, dtype=float) * np.asarray(self.spacing, dtype=float)
        matrix[:3, 3] = self.origin
        return matrix

    @classmethod
    def from_ijk_to_ras(cls, matrix: np.ndarray) -> "Geometry":
        matrix = np.asarray(matrix, dtype=float)
        spacing = np.linalg.norm(matrix[:3, :3], axis=0)
        return cls(tuple(spacing.tolist()), tuple(matrix[:3, 3].tolist()), matrix[:3, :3] / spacing)

    @classmethod
    def centred(cls, spacing: tuple[float, float, float], shape_kji: tuple[int, int, int]) -> "Geometry":
        """Head-first axial geometry whose in-plane centre is RAS (0, 0) and whose first slice is at S = 0."""
        half = (np.array(shape_kji[::-1], dtype=float) - 1) / 2 * np.array(spacing)
        return cls(tuple(float(s) for s in spacing), (float(half[0]), float(half[1]), 0.0))


def hu_voxels(values: np.ndarray, source) -> np.ndarray:
    """Voxels a file holds as int16 HU: rounded and clipped. NaN or inf are refused: cast, they would read as a
    plausible 0 or -32768 HU."""
    if not np.issubdtype(values.dtype, np.integer):
        if not np.isfinite(values).all():
            raise CTFlowError(f"{source} holds voxels that are not numbers (NaN or infinite): not a CT ctflow reads")
        values = np.rint(values)
    return np.clip(values, -32768, 32767).astype(np.int16)


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, Geometry]:
    """Reorder an (x, y, z) array with its RAS affine (nibabel's) to [k, j, i] head first; the geometry follows the
    voxels. Only axis flips and swaps: an oblique scan keeps its (nearly canonical) direction matrix."""
    from nibabel import orientations

    transform = orientations.ornt_transform(orientations.io_orientation(affine),
                                            orientations.axcodes2ornt(HEAD_FIRST_AXCODES))
    reoriented = orientations.apply_orientation(data, transform)
    affine = affine @ orientations.inv_ornt_aff(transform, data.shape)
    return np.ascontiguousarray(reoriented.transpose(2, 1, 0)), Geometry.from_ijk_to_ras(affine)


@dataclass(frozen=True)
class Provenance:
    """What made this volume; stored in node attributes, file headers and DICOM tags."""

    report: str
    prompt: str
    seed: int
    steps: int
    sampler: str
    shift: float
    guidance: float
    model: str
    model_sha256: str
    ctflow_version: str
    device: str = ""
    dtype: str = ""  # the denoiser's precision: bfloat16 on a GPU by default, float32 as the original CTFlow
    slices_requested: int | None = None
    partial: bool = False  # generation was cancelled or stopped early; the volume is incomplete
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    synthetic: str = SYNTHETIC_NOTICE
    block_slices: int | None = None  # slices per generated block: where the autoregressive seams lie (QA)
    side_guidance: float = 0.0  # as applied: 0 when the report names no side (sampling.Guidance)
    finding_guidance: float = 0.0  # as applied: 0 when the report reports no finding (sampling.Guidance)

    def as_dict(self) -> dict[str, str]:
        """Flat string map (headers and MRML attributes hold strings)."""
        return {key: "" if value is None else str(value) for key, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> "Provenance":
        """Inverse of as_dict; unknown keys are ignored so older readers survive newer writers."""
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        values: dict[str, object] = {}
        for key, text in data.items():
            if key not in kinds:
                continue
            kind = kinds[key]
            if "int" in kind and text in ("", "None"):
                values[key] = None
            elif kind.startswith("int"):
                values[key] = int(text)
            elif kind == "float":
                values[key] = float(text)
            elif kind == "bool":
                values[key] = text.lower() == "true"
            else:
                values[key] = text
        return cls(**values)


@dataclass
class Volume:
    """A synthetic CT: int16 HU voxels [k, j, i] with geometry and provenance."""

    hu: np.ndarray
    geometry: Geometry
    provenance: Provenance | None  # None for a CT that ctflow did not make

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)

    def head_first(self) -> "Volume":
        """The same CT stored head first ([k, j, i] to inferior, posterior, patient left), as ctflow makes them:
        what compares slices of CTs that files store in other orientations (feet first, RAS)."""
        hu, geometry = to_canonical(self.hu.transpose(2, 1, 0), self.geometry.ijk_to_ras())
        return Volume(hu, geometry, self.provenance)
