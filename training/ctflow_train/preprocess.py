"""A CT in the model's space: head-first axial [k, j, i] int16 HU in the model window, size x size
slices over a square field of view, a fixed slice spacing, and white end slices.

CT-RATE (ctrate.py) and the synthetic cohort (cohort.py) both end here, so the model sees one format.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ctflow.conventions import HU_WINDOW, append_end_slices
from ctflow.volume import Geometry, Volume

HU_MIN, HU_MAX = HU_WINDOW  # the model's window; HU_MIN is also the start token, HU_MAX the end marker
def square_fov(
    array: np.ndarray, geometry: Geometry, side_mm: float | None = None, centre_ji: tuple[float, float] | None = None, fill: float = HU_MIN
) -> tuple[np.ndarray, Geometry]:
    """Cut (or pad with `fill`) each slice to a square of `side_mm` around `centre_ji` (voxel units).

    Defaults: the smallest square holding the whole slice, centred on it, so nothing is lost.
    """
    spacing_ji = np.array(geometry.spacing[1::-1], dtype=float)
    shape_ji = np.array(array.shape[1:])
    if side_mm is None:
        side_mm = float(np.max(shape_ji * spacing_ji))
    if centre_ji is None:
        centre_ji = (shape_ji - 1) / 2
    counts = np.maximum(1, np.round(side_mm / spacing_ji)).astype(int)
    starts = np.round(np.asarray(centre_ji, dtype=float) - (counts - 1) / 2).astype(int)
    out = np.full((array.shape[0], *counts), fill, dtype=array.dtype)
    source = [slice(max(0, s), min(n, s + c)) for s, c, n in zip(starts, counts, shape_ji)]
    target = [slice(src.start - s, src.stop - s) for src, s in zip(source, starts)]
    out[:, target[0], target[1]] = array[:, source[0], source[1]]
    return out, _shifted(geometry, (starts[1], starts[0], 0))


def resample(
    array: np.ndarray, geometry: Geometry, size: int, slice_spacing: float, order: int = 1
) -> tuple[np.ndarray, Geometry]:
    """Resample to size x size slices over the same in-plane field and to `slice_spacing` mm slices.

    Voxel centres stay centred on the input's extent, so the physical field of view is kept.
    Order 1 (HU) smooths before shrinking to avoid aliasing; order 0 (label maps) never mixes values.
    """
    shape_in = np.array(array.shape)
    spacing_in = np.array(geometry.spacing[::-1], dtype=float)  # k, j, i
    shape_out = np.array([max(1, round(shape_in[0] * spacing_in[0] / slice_spacing)), size, size])
    spacing_out = np.array([slice_spacing, *(shape_in[1:] * spacing_in[1:] / size)])
    step = spacing_out / spacing_in
    offset = (shape_in - 1) / 2 - step * (shape_out - 1) / 2
    if order > 0:
        array = array.astype(np.float32, copy=False)
        if np.any(step > 1):
            array = ndimage.gaussian_filter(array, np.maximum(0, (step - 1) / 2), mode="nearest")
    out = ndimage.affine_transform(array, step, offset=offset, output_shape=tuple(shape_out), order=order, mode="nearest")
    shifted = _shifted(geometry, offset[::-1])
    return out, Geometry(tuple(spacing_out[::-1].tolist()), shifted.origin, shifted.direction)


def to_model_window(hu: np.ndarray) -> np.ndarray:
    """HU (any float) -> int16 clipped to the model window."""
    return np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)


def prepare(hu: np.ndarray, geometry: Geometry, size: int, slice_spacing: float) -> Volume:
    """A real CT in canonical order -> the model's space, ready to write."""
    hu = np.clip(hu.astype(np.float32, copy=False), HU_MIN, HU_MAX)
    hu, geometry = square_fov(hu, geometry)
    hu, geometry = resample(hu, geometry, size, slice_spacing)
    return Volume(append_end_slices(to_model_window(hu)), geometry, None)


def _shifted(geometry: Geometry, offset_ijk) -> Geometry:
    """The same grid with voxel (0, 0, 0) moved to index `offset_ijk` of the old one."""
    shift = np.asarray(geometry.direction) @ (np.asarray(offset_ijk, dtype=float) * np.asarray(geometry.spacing))
    return Geometry(geometry.spacing, tuple((np.asarray(geometry.origin) + shift).tolist()), geometry.direction)
