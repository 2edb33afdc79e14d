"""One PNG to check a volume at a glance: axial, coronal and sagittal mid-planes in a lung and a soft-tissue window."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from .conventions import SYNTHETIC_LABEL, WINDOWS
from .volume import Volume


def apply_window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """HU -> uint8 grey values for a display window."""
    low = level - width / 2
    return (np.clip((hu.astype(np.float32) - low) / width, 0, 1) * 255).astype(np.uint8)


def plane_image(plane: np.ndarray, aspect: float, tile: int, resample: int = Image.BILINEAR) -> Image.Image:
    """A 2-D uint8 plane scaled to fit a tile x tile square, its pixels drawn `aspect` (row/column spacing) tall."""
    height, width = plane.shape
    scale = tile / max(width, height * aspect)
    size = (max(1, round(width * scale)), max(1, round(height * aspect * scale)))
    return Image.fromarray(plane).resize(size, resample)


def mid_planes(volume: Volume) -> list[tuple[str, np.ndarray, float]]:
    """(name, plane, row/column pixel aspect) in radiological display: patient right on the image left."""
    hu = volume.hu
    sx, sy, sz = volume.geometry.spacing
    k, j, i = (n // 2 for n in hu.shape)
    return [("axial", hu[k], sy / sx), ("coronal", hu[:, j, :], sz / sx), ("sagittal", hu[:, :, i], sz / sy)]


def render_preview(volume: Volume, tile: int = 256, windows: tuple[str, ...] = ("lung", "soft tissue")) -> Image.Image:
    """The mid-planes in each window, headed SYNTHETIC for a volume CTFlow made (one with provenance)."""
    planes = mid_planes(volume)
    label_height = 16
    sheet = Image.new("L", (tile * len(planes), (tile + label_height) * len(windows) + label_height), 0)
    draw = ImageDraw.Draw(sheet)
    marked = f"{SYNTHETIC_LABEL} - " if volume.provenance is not None else ""  # only what CTFlow made (qa reads any CT)
    draw.text((4, 2), f"{marked}{volume.shape[0]} slices", fill=255)
    for row, window in enumerate(windows):
        top = label_height + row * (tile + label_height)
        for col, (name, plane, aspect) in enumerate(planes):
            image = plane_image(apply_window(plane, *WINDOWS[window]), aspect, tile)
            sheet.paste(image, (col * tile + (tile - image.width) // 2, top + label_height))
            draw.text((col * tile + 4, top + 2), f"{name}, {window} window", fill=200)
    return sheet


def preview_writer(volume: Volume) -> Callable[[Path], None]:
    """write(tmp) of the preview PNG, for io.atomic_write or io.StagedWrites."""
    return lambda tmp: render_preview(volume).save(tmp, format="PNG")
