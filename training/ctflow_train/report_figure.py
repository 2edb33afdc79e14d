"""A picture of where a model puts each report's finding: `ctflow-train report-figure`.

    ctflow-train report-figure --model Resources/Models/ctflow-demo --reports Resources/SampleReports/*.txt \\
        --normal Resources/SampleReports/normal_chest.txt --seeds 0 1 --out docs/images/sample_reports.png

One row per report, and per seed two views: the axial and the coronal slice through the place in the chest where
the report's volume differs most from the normal report's volume on the same seed (the finding asked for, where the
model drew it), the change outlined in red. The same seed gives both volumes the same noise, so what differs is what
the text changed. Every volume is generated through ctflow's public API (evaluate.generate_volume), as a user would; its
progress line gives the lungs it drew, in ml (evaluate.lung_volume_ml), since a model can follow a report and break
the lungs doing it.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import binary_erosion, gaussian_filter

from ctflow import CTFlowPipeline
from ctflow.conventions import SYNTHETIC_NOTICE, WINDOWS, real_slices
from ctflow.errors import CTFlowError, ModelError, ReportError
from ctflow.io import atomic_write, check_output_path
from ctflow.preview import apply_window, plane_image
from ctflow.report import parse_report, read_report_file

from .evaluate import generate_volume, lung_voxels, lung_volume_ml
from .options import RunConfig, add_guidance_options, add_threads_option, positive, progress, seed
from .runtime import set_threads

FOCUS_MM = 5.0  # the change is averaged with a Gaussian of this sigma (12 mm across at half height: a finding's size)
CHANGE_HU = 200.0  # outlined: voxels whose HU the report changed by more than this
CHEST_MARGIN_MM = 15.0  # the chest: the box of the normal volume's lungs, grown by this (an effusion lies outside them)
LUNG_SLICE_SHARE = 0.05  # a slice holds lungs where it has this share of the normal volume's most lung voxels
LINE = 14  # pixels a line of text takes
CAPTION_LINES = 2


@dataclasses.dataclass(frozen=True)
class FigureRun(RunConfig):
    """The options of `ctflow-train report-figure` (see `configure`)."""

    model: Path
    reports: list[Path]
    normal: Path
    seeds: list[int]
    out: Path
    steps: int | None
    guidance: float | None
    side_guidance: float | None
    finding_guidance: float | None
    slices: int | None
    window: str
    tile: int
    threads: int
    overwrite: bool


@dataclasses.dataclass(frozen=True)
class SampleReport:
    path: Path
    text: str
    summary: str  # for the caption: "Impressions: ...", or the Findings of a report without Impressions


def read_sample_report(path: Path) -> SampleReport:
    """The file's text, refused (with its name) when it cannot be read or holds no report."""
    text = read_report_file(path)  # its errors name the file
    try:
        report = parse_report(text)
    except ReportError as exc:
        raise ReportError(f"{path}: {exc}") from exc
    summary = f"Impressions: {report.impressions}" if report.impressions else f"Findings: {report.findings}"
    return SampleReport(path, text, summary)


# ---------------------------------------------------------------- where the report changed the volume


def change(asked: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """|HU difference| [k, j, i] of two volumes over the real slices both have (each may end elsewhere)."""
    common = min(real_slices(asked), real_slices(normal))
    return np.abs(asked[:common].astype(np.float32) - normal[:common].astype(np.float32))


def chest(normal: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """bool [k, j, i] over `normal`'s real slices: where a chest finding can lie. On each slice that holds lungs
    (LUNG_SLICE_SHARE of the slice with most), the box around its lung voxels (evaluate.lung_voxels), grown by
    CHEST_MARGIN_MM: the lungs, the mediastinum and heart between them, the pleura around them; not the neck above
    nor the abdomen below, where a changed report also moves the anatomy but asks for no finding."""
    normal = normal[: real_slices(normal)]
    lungs = [lung_voxels(axial) for axial in normal]
    counts = np.array([int(mask.sum()) for mask in lungs])
    box = np.zeros(normal.shape, bool)
    if not counts.any():
        return box
    grow_j, grow_i = (round(CHEST_MARGIN_MM / s) for s in spacing[1::-1])
    for k in np.flatnonzero(counts >= LUNG_SLICE_SHARE * counts.max()):
        rows, columns = np.nonzero(lungs[k])
        box[k, max(rows.min() - grow_j, 0): rows.max() + grow_j + 1,
            max(columns.min() - grow_i, 0): columns.max() + grow_i + 1] = True
    return box


def changed_centre(difference: np.ndarray, spacing: tuple[float, float, float],
                   where: np.ndarray | None = None) -> tuple[int, int, int]:
    """The voxel [k, j, i] where the change is largest: the maximum of |HU difference| smoothed by a Gaussian of
    FOCUS_MM (`spacing`: i, j, k in mm), within `where` (bool, the shape of `difference`) where it holds any voxel.

    Why a smoothed maximum rather than the centre of the largest connected region above a threshold: a finding is a
    compact blob of change, and its finding-sized weighted mean peaks at the blob's centre (a Gaussian has no
    plateau, as a box mean has over a blob smaller than the box), while a lone voxel the sampler drew differently
    averages away. It needs no threshold, and where the text moved the whole anatomy a little (as today's demo
    model does) it still finds the strongest spot, where one region would span the body and its centre could lie
    outside the change altogether."""
    smoothed = gaussian_filter(difference, sigma=[FOCUS_MM / s for s in spacing[::-1]], mode="constant")  # [k, j, i]
    if where is not None and where.any():
        smoothed = np.where(where, smoothed, -1.0)
    return tuple(int(n) for n in np.unravel_index(np.argmax(smoothed), smoothed.shape))


@dataclasses.dataclass
class View:
    name: str  # "axial k=57", "coronal j=120"
    hu: np.ndarray  # the plane
    changed: np.ndarray  # bool: |HU difference| > CHANGE_HU there
    aspect: float  # row / column pixel spacing
    peak: float  # the largest |HU difference| in the plane: near 0, the report changed nothing there


def views(asked: np.ndarray, normal: np.ndarray, spacing: tuple[float, float, float],
          normal_chest: np.ndarray | None = None) -> list[View]:
    """The axial and coronal planes of `asked` through its largest change in the chest against `normal` (same seed);
    through its largest change anywhere where `normal` shows no lungs. `normal_chest`: chest(normal), when the
    caller has it (one normal volume serves every report of its seed)."""
    difference = change(asked, normal)
    where = chest(normal, spacing) if normal_chest is None else normal_chest
    k, j, _ = changed_centre(difference, spacing, where[: len(difference)])
    hu, changed = asked[: len(difference)], difference > CHANGE_HU
    sx, sy, sz = spacing
    return [View(f"axial k={k}", hu[k], changed[k], sy / sx, float(difference[k].max())),
            View(f"coronal j={j}", hu[:, j, :], changed[:, j, :], sz / sx, float(difference[:, j, :].max()))]


# ---------------------------------------------------------------- the picture


def tile_image(view: View, window: str, tile: int) -> Image.Image:
    """The plane in a display window, scaled into the tile, with the changed region's outline in red."""
    image = plane_image(apply_window(view.hu, *WINDOWS[window]), view.aspect, tile).convert("RGB")
    inside = np.asarray(plane_image(view.changed.astype(np.uint8) * 255, view.aspect, tile, Image.NEAREST)) > 127
    pixels = np.array(image)
    pixels[inside & ~binary_erosion(inside)] = (255, 0, 0)
    return Image.fromarray(pixels)


def row_height(tile: int) -> int:
    """A row: its caption, then one tile per seed and view."""
    return CAPTION_LINES * LINE + 4 + tile


def render_figure(header: str, rows: list[tuple[SampleReport, dict[int, list[View]]]], window: str,
                  tile: int) -> Image.Image:
    """`header`: what the figure shows, wrapped to the figure's width above the rows; `rows`: each report and, per
    seed, its views."""
    seeds = list(rows[0][1])
    width = 2 * len(seeds) * tile
    characters = width // 6  # the default font's characters are about 6 pixels wide
    header_lines = textwrap.wrap(header, characters)
    header_height = len(header_lines) * LINE + 8
    sheet = Image.new("RGB", (width, header_height + len(rows) * row_height(tile)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for number, line in enumerate(header_lines):
        draw.text((4, 4 + LINE * number), line, fill=(255, 255, 255))
    for row, (report, by_seed) in enumerate(rows):
        top = header_height + row * row_height(tile)
        caption = f"{report.path.name} - SYNTHETIC - {report.summary}"
        for number, line in enumerate(textwrap.wrap(caption, characters, max_lines=CAPTION_LINES, placeholder=" ...")):
            draw.text((4, top + 2 + LINE * number), line, fill=(255, 255, 255))
        top += CAPTION_LINES * LINE + 4
        left = 0
        for seed in seeds:
            for view in by_seed[seed]:
                image = tile_image(view, window, tile)
                sheet.paste(image, (left + (tile - image.width) // 2, top + (tile - image.height) // 2))
                label = f"seed {seed}, {view.name}, largest change {view.peak:.0f} HU"
                draw.rectangle(draw.textbbox((left + 2, top + 2), label), fill=(0, 0, 0))  # readable on any grey
                draw.text((left + 2, top + 2), label, fill=(255, 255, 0))
                left += tile
    return sheet


# ---------------------------------------------------------------- the command


def check_inputs(run: FigureRun) -> tuple[SampleReport, list[SampleReport]]:
    """The normal report and the others, every input checked before a model loads or a volume is generated."""
    if run.out.exists() and not run.overwrite:
        check_output_path(run.out, run.overwrite, suffixes=(".png",))  # says why
    if not run.model.is_dir():
        raise ModelError(f"model folder {run.model} is missing")
    normal = read_sample_report(run.normal)
    reports = [read_sample_report(path) for path in dict.fromkeys(run.reports)
               if path.resolve() != run.normal.resolve()]
    if not reports:
        raise CTFlowError("give at least one report besides the --normal one")
    return normal, reports


def make_figure(run: FigureRun, log=progress) -> Image.Image:
    normal, reports = check_inputs(run)
    seeds = list(dict.fromkeys(run.seeds))
    set_threads(run.threads)
    pipe = CTFlowPipeline.from_pretrained(run.model, device="cpu")
    request = {"steps": run.steps, "guidance": run.guidance, "side_guidance": run.side_guidance,
               "finding_guidance": run.finding_guidance, "slices": run.slices}
    total, done, started = len(seeds) * (len(reports) + 1), 0, time.perf_counter()
    sides, findings = {0.0}, {0.0}

    def generated(report: SampleReport, seed: int):
        nonlocal done
        volume, took = generate_volume(pipe, report.text, seed, **request)
        sides.add(volume.provenance.side_guidance)  # 0 for a report that names no side
        findings.add(volume.provenance.finding_guidance)  # 0 for a report without findings
        done += 1
        eta = (time.perf_counter() - started) / done * (total - done)
        slices = real_slices(volume.hu)
        lungs = lung_volume_ml(volume.hu[:slices], volume.geometry.spacing)  # a model can answer with broken lungs
        log(f"volume {done}/{total}: {report.path.name}, seed {seed}: {slices} slices, lungs {lungs:.0f} ml, in "
            f"{took:.1f} s; ETA {eta:.0f} s")
        return volume

    normals = {seed: generated(normal, seed) for seed in seeds}  # each once, the baseline of every row
    chests = {seed: chest(volume.hu, volume.geometry.spacing) for seed, volume in normals.items()}
    rows = []
    for report in reports:
        by_seed = {}
        for seed in seeds:
            volume = generated(report, seed)
            by_seed[seed] = views(volume.hu, normals[seed].hu, volume.geometry.spacing, chests[seed])
        rows.append((report, by_seed))
    made = normals[seeds[0]].provenance
    header = (f"{SYNTHETIC_NOTICE}. "
              f"Model {made.model} (model sha256 {made.model_sha256[:12]}), {made.steps} {made.sampler} steps, "
              f"guidance {made.guidance:g}, side guidance {max(sides):g} where a report names a side, finding "
              f"guidance {max(findings):g} where it reports a finding. "
              f"Per seed: axial and coronal slice through the largest change in the chest against "
              f"{normal.path.name} on the same seed; red: |HU change| > {CHANGE_HU:g}. {run.window} window.")
    return render_figure(header, rows, run.window, run.tile)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--reports", type=Path, nargs="+", required=True,
                        help="report files, one row each (the --normal one among them is left out)")
    parser.add_argument("--normal", type=Path, required=True, help="the normal report every volume is compared with")
    parser.add_argument("--seeds", type=seed, nargs="+", default=[0, 1], help="seeds: two views each (default 0 1)")
    parser.add_argument("--out", type=Path, default=Path("docs/images/sample_reports.png"), help="PNG to write")
    add_guidance_options(parser)
    parser.add_argument("--slices", type=positive(int), help="stop every volume at this many slices (default: the "
                                                             "model ends each itself)")
    parser.add_argument("--window", default="lung", choices=list(WINDOWS), help="display window (default lung)")
    parser.add_argument("--tile", type=positive(int), default=256, help="pixels a view takes (default 256)")
    add_threads_option(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out image (default: refuse)")


def run(args: argparse.Namespace) -> int:
    options = FigureRun.from_args(args)
    image = make_figure(options)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    print(atomic_write(options.out, lambda tmp: image.save(tmp, format="PNG"), overwrite=options.overwrite))
    return 0
