"""A contact sheet of cohort patients, to check by eye that anatomy and findings look right.

Per patient: an axial and a coronal slice (lung window) through its most visible finding, captioned
with the findings its labels file lists. Pillow only. Works on any prepared folder; cases without a
labels file (CT-RATE) are shown through their middle.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from ctflow.conventions import WINDOWS, real_slices
from ctflow.io import atomic_write, check_output_path, read_volume
from ctflow.preview import apply_window, plane_image

from .dataset import read_index
from .options import positive

FOCUS = ("nodule", "consolidation", "ground_glass", "atelectasis", "lymphadenopathy", "medical_material")  # have a centre


def render_cohort_preview(folder: str | Path, patients: int = 4, tile: int = 256) -> Image.Image:
    """One row per patient: axial | coronal, then a caption."""
    folder = Path(folder)
    caption_lines = 4
    row_height = tile + 14 * caption_lines + 8
    entries = read_index(folder)[:patients]
    sheet = Image.new("L", (2 * tile, row_height * len(entries)), 0)
    draw = ImageDraw.Draw(sheet)
    for row, entry in enumerate(entries):
        volume = read_volume(folder / entry["volume"])
        hu = volume.hu[: real_slices(volume.hu)]
        findings = (json.loads((folder / entry["labels"]).read_text(encoding="utf-8"))["findings"] if entry["labels"]
                    else {})
        k, j, _ = _focus(findings, hu.shape)
        spacing_i, spacing_j, spacing_k = volume.geometry.spacing
        planes = [(hu[k], spacing_j / spacing_i), (hu[:, j, :], spacing_k / spacing_i)]
        top = row * row_height
        for column, (plane, aspect) in enumerate(planes):
            image = plane_image(apply_window(plane, *WINDOWS["lung"]), aspect, tile)
            sheet.paste(image, (column * tile + (tile - image.width) // 2, top + (tile - image.height) // 2))
        caption = _caption(findings) if entry["labels"] else entry["impressions"]
        text = f"{entry['name']} ({entry['slices']} slices, axial k={k}, coronal j={j}): {caption}"
        for line_number, line in enumerate(textwrap.wrap(text, width=2 * tile // 6)[:caption_lines]):
            draw.text((4, top + tile + 4 + 14 * line_number), line, fill=255)
    return sheet


def write_cohort_preview(folder: str | Path, out: str | Path, patients: int = 4, overwrite: bool = False) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        check_output_path(out, overwrite, suffixes=(".png",))  # says why, before the cohort is read
    image = render_cohort_preview(folder, patients)  # a bad --cohort ends here, before --out's folder is made
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, lambda tmp: image.save(tmp, format="PNG"), overwrite=overwrite)


def _focus(findings: dict[str, dict], shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Voxel to slice through: the centre of the first finding that has one, else low in the chest
    (where effusions and atelectasis are) when there are findings, else the middle."""
    for name in FOCUS:
        params = findings.get(name, {})
        if params.get("present"):
            centre = params.get("centre_kji") or params.get("pocket_kji") or params.get("nodes", [{}])[0].get("centre_kji")
            if centre:
                return tuple(int(c) for c in centre)
    fraction = 0.75 if any(p["present"] for p in findings.values()) else 0.5
    return int(shape[0] * fraction), shape[1] // 2, shape[2] // 2


def _caption(findings: dict[str, dict]) -> str:
    parts = []
    for name, params in findings.items():
        if params["present"]:
            detail = [str(params[key]) for key in ("side", "lobe", "grade", "severity", "kind", "device") if key in params]
            parts.append(name.replace("_", " ") + (f" ({', '.join(detail)})" if detail else ""))
    return "; ".join(parts) or "no findings"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cohort", type=Path, required=True, help="a folder written by `ctflow-train cohort`")
    parser.add_argument("--out", type=Path, default=Path("docs/images/cohort_samples.png"), help="PNG to write")
    parser.add_argument("--patients", type=positive(int), default=4, help="patients to show (default 4)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out image (default: refuse)")


def run(args: argparse.Namespace) -> int:
    print(write_cohort_preview(args.cohort, args.out, args.patients, args.overwrite))
    return 0
