"""Quality checks of generated volumes, aimed at what block-by-block generation gets wrong.

Per volume: continuity across block seams against continuity inside blocks (each block is sampled on its
own, conditioned only on the previous one), in-plane detail block after block (errors accumulate, detail
fades), HU statistics of air, lung, fat, soft tissue and bone against a reference, and requested vs
produced length. Over a set: diversity across the seeds of one report. `report_page` draws one PNG.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .dicom import is_dicom_folder
from .errors import CTFlowError, OutputExistsError
from .io import DICOM_SUFFIX, SUFFIXES, StagedWrites, read_volume, volume_stem, volume_suffix
from .preview import render_preview
from .volume import Volume

# HU ranges [low, high) of the tissue classes; the gaps between them are partial-volume voxels, counted in none.
TISSUES = {"air": (-1e9, -950.0), "lung": (-950.0, -500.0), "fat": (-150.0, -30.0),
           "soft tissue": (-30.0, 150.0), "bone": (300.0, 1e9)}
# Textbook mean HU of each class: the reference when no reference CT is given.
NOMINAL_HU = {"air": -1000.0, "lung": -850.0, "fat": -100.0, "soft tissue": 40.0, "bone": 700.0}
HISTOGRAM_EDGES = np.arange(-1100.0, 2001.0, 20.0)
DIVERSITY_PAIRS = 20  # pairs compared per group at most: keeps a set of thousands cheap
SEEDS_KEPT = 7  # thumbnails kept per report for diversity (21 pairs)
MIN_LUNG_SHARE = 0.01  # a volume whose slices never hold this share of lung-density voxels has no lungs


def series_of(path: Path) -> Path:
    """A DICOM file's folder (its series, read from any of its files, is named after it and reported beside it),
    else the path itself."""
    return path.parent if path.is_file() and path.name.lower().endswith(DICOM_SUFFIX) else path


def volume_files(path: str | os.PathLike) -> list[Path]:
    """A volume file or DICOM series folder, or those a folder holds (not deeper, not hidden ones such as
    temporary files), sorted by name."""
    path = Path(path)
    if path.is_file() or is_dicom_folder(path):
        return [path]
    if not path.is_dir():
        raise CTFlowError(f"{path} does not exist")
    files = sorted(p for p in path.iterdir()
                   if not p.name.startswith(".")
                   and ((p.is_file() and volume_suffix(p.name)) or is_dicom_folder(p)))
    if not files:
        raise CTFlowError(f"{path} holds no volumes ({', '.join(SUFFIXES)}, or DICOM series folders)")
    return files


# -- continuity across seams -------------------------------------------------------------------------------------


def slice_steps(hu: np.ndarray) -> np.ndarray:
    """Mean absolute HU change between each slice and the next: [K - 1]."""
    return np.abs(np.diff(hu.astype(np.float32), axis=0)).mean(axis=(1, 2))


def seam_continuity(hu: np.ndarray, block_slices: int) -> dict:
    """Slice-to-slice change across block seams vs inside blocks; a ratio near 1 means invisible seams."""
    steps = slice_steps(hu)
    seam = (np.arange(len(steps)) + 1) % block_slices == 0  # step k joins slice k and k + 1
    if not seam.any() or seam.all():
        return {"seams": int(seam.sum()), "ratio": None, "reason": "needs at least one seam and one step inside a block"}
    across, inside = steps[seam], steps[~seam]
    return {
        "seams": int(seam.sum()),
        "across_hu": float(across.mean()),
        "inside_hu": float(inside.mean()),
        "ratio": float(across.mean() / max(inside.mean(), 1e-6)),
        "z": float((across.mean() - inside.mean()) / max(inside.std(), 1e-6)),
    }


def lungs_end(hu: np.ndarray, run: int = 5) -> int | None:
    """The slice (head to feet) below which the lungs have faded: the last one whose share of lung-density voxels
    (TISSUES) is still half the volume's peak share, in a running mean over `run` slices; None without lungs.

    Half the peak, not any lung at all: the costophrenic recesses reach far below the dome of the diaphragm. Where a
    generated volume's lungs end shows how fast its anatomy runs from head to feet, apart from where it ends."""
    low, high = TISSUES["lung"]
    share = ((hu >= low) & (hu < high)).reshape(len(hu), -1).mean(1)
    smooth = np.convolve(share, np.ones(run) / run, mode="same")
    if not len(smooth) or smooth.max() < MIN_LUNG_SHARE:
        return None
    return int(np.flatnonzero(smooth >= smooth.max() / 2)[-1]) + 1


# -- detail over depth -------------------------------------------------------------------------------------------


def slice_sharpness(hu: np.ndarray) -> np.ndarray:
    """Mean in-plane gradient magnitude (HU per pixel) of each slice: [K]."""
    x = np.clip(hu.astype(np.float32), -1024, 2000)
    gy, gx = np.diff(x, axis=1)[:, :, :-1], np.diff(x, axis=2)[:, :-1, :]
    return np.sqrt(gx**2 + gy**2).mean(axis=(1, 2))


def detail_over_depth(hu: np.ndarray, block_slices: int) -> dict:
    """Sharpness per block and its trend: percent change per block of a log-linear fit (negative: detail fades)."""
    per_slice = slice_sharpness(hu)
    blocks = [float(per_slice[k : k + block_slices].mean()) for k in range(0, len(per_slice), block_slices)]
    result = {"per_block": blocks, "last_over_first": blocks[-1] / max(blocks[0], 1e-6)}
    if len(blocks) < 2:
        return {**result, "percent_per_block": None}
    slope = np.polyfit(np.arange(len(blocks)), np.log(np.maximum(blocks, 1e-6)), 1)[0]
    return {**result, "percent_per_block": float(np.expm1(slope) * 100)}


# -- HU statistics -----------------------------------------------------------------------------------------------


def hu_statistics(hu: np.ndarray) -> dict:
    """Share of voxels, mean and std HU of each tissue class, and a normalised HU histogram."""
    values = hu.astype(np.float32).ravel()
    tissues = {}
    for name, (low, high) in TISSUES.items():
        inside = values[(values >= low) & (values < high)]
        tissues[name] = {
            "fraction": inside.size / values.size,
            "mean_hu": float(inside.mean()) if inside.size else None,
            "std_hu": float(inside.std()) if inside.size else None,
        }
    counts, _ = np.histogram(np.clip(values, HISTOGRAM_EDGES[0], HISTOGRAM_EDGES[-1] - 1), HISTOGRAM_EDGES)
    return {"tissues": tissues, "histogram": (counts / values.size).tolist()}


def compare_hu(stats: dict, reference: dict | None) -> dict:
    """Differences to a reference's hu_statistics (share in percentage points, mean HU, histogram distance in HU),
    or, without one, each class's mean against its textbook value."""
    differences = {}
    for name, tissue in stats["tissues"].items():
        if reference is None:
            mean = tissue["mean_hu"]
            differences[name] = {"mean_hu": None if mean is None else mean - NOMINAL_HU[name]}
            continue
        ref = reference["tissues"][name]
        differences[name] = {
            "fraction_points": 100 * (tissue["fraction"] - ref["fraction"]),
            "mean_hu": None if tissue["mean_hu"] is None or ref["mean_hu"] is None else tissue["mean_hu"] - ref["mean_hu"],
        }
    result = {"against": "reference" if reference is not None else "nominal HU", "tissues": differences}
    if reference is not None:
        result["histogram_distance_hu"] = histogram_distance(stats["histogram"], reference["histogram"])
    return result


def histogram_distance(a: list[float], b: list[float]) -> float:
    """Earth mover's distance (HU) between two histograms on HISTOGRAM_EDGES."""
    width = HISTOGRAM_EDGES[1] - HISTOGRAM_EDGES[0]
    return float(np.abs(np.cumsum(a) - np.cumsum(b)).sum() * width)


def load_reference(path: str | os.PathLike) -> dict:
    """HU statistics of a reference: a CT volume, or a JSON holding them (a qa report's "hu" or a whole summary)."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        return hu_statistics(read_volume(path).hu)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CTFlowError(f"reference {path} is not a JSON file: {exc}") from exc
    candidates = (data, data.get("hu", {}), data.get("reference", {}) or {}) if isinstance(data, dict) else ()
    for candidate in candidates:
        if isinstance(candidate, dict) and "tissues" in candidate and "histogram" in candidate:
            return candidate
    raise CTFlowError(f"{path} holds no HU statistics (expected 'tissues' and 'histogram')")


# -- one volume, a set -------------------------------------------------------------------------------------------


def block_size(volume: Volume, block_slices: int | None) -> int | None:
    """The given block size, else the one the volume's provenance records."""
    if block_slices is not None:
        return block_slices
    return volume.provenance.block_slices if volume.provenance is not None else None


def assess(volume: Volume, block_slices: int | None = None, reference: dict | None = None) -> dict:
    """Every per-volume measure, as a JSON-ready dict."""
    block = block_size(volume, block_slices)
    unknown = {"reason": "block size unknown: pass --block-slices"}
    stats = hu_statistics(volume.hu)
    provenance = volume.provenance
    requested = provenance.slices_requested if provenance is not None else None
    return {
        "slices": volume.shape[0],
        "block_slices": block,
        "seams": seam_continuity(volume.hu, block) if block else unknown,
        "detail": detail_over_depth(volume.hu, block) if block else unknown,
        "hu": stats,
        "hu_difference": compare_hu(stats, reference),
        "length": {"requested": requested, "produced": volume.shape[0],
                   "difference": None if requested is None else volume.shape[0] - requested},
        "report": provenance.report if provenance is not None else None,
        "seed": provenance.seed if provenance is not None else None,
    }


def thumbnail(hu: np.ndarray, pool: tuple[int, int, int] = (2, 8, 8)) -> np.ndarray:
    """Block means over `pool` voxels: small enough to keep one per volume of a large set for diversity."""
    k, j, i = (n // p * p for n, p in zip(hu.shape, pool))
    x = hu[:k, :j, :i].astype(np.float32).reshape(k // pool[0], pool[0], j // pool[1], pool[1], i // pool[2], pool[2])
    return x.mean(axis=(1, 3, 5))


def volume_distance(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mean absolute HU difference over the slices both have; None for thumbnails of other slice sizes (volumes
    of two models) or without a slice in common."""
    depth = min(len(a), len(b))
    if a.shape[1:] != b.shape[1:] or not depth or not a[0].size:
        return None
    return float(np.abs(a[:depth] - b[:depth]).mean())


def _mean_distance(pairs) -> float | None:
    distances = [d for d in (volume_distance(a, b) for a, b in pairs) if d is not None]
    return float(np.mean(distances)) if distances else None


def diversity(groups: dict[str, list[np.ndarray]]) -> dict:
    """Mean pairwise distance between the seeds of one report (thumbnails per report), and between the first
    volumes of different reports for scale.

    Near 0 within a report means the seeds collapse to one volume; within close to between means the
    report barely steers the result.
    """
    per_report = []
    for report, members in groups.items():
        distance = _mean_distance(list(itertools.combinations(members, 2))[:DIVERSITY_PAIRS])
        if distance is not None:
            per_report.append({"report": report, "seeds": len(members), "mean_distance_hu": distance})
    firsts = [members[0] for members in groups.values()]
    within = [r["mean_distance_hu"] for r in per_report]
    return {
        "within_report_hu": float(np.mean(within)) if within else None,
        "between_reports_hu": _mean_distance(list(itertools.combinations(firsts, 2))[:DIVERSITY_PAIRS]),
        "per_report": per_report,
    }


def run_qa(
    files: list[Path], folder: Path, block_slices: int | None = None, reference: dict | None = None,
    overwrite: bool = False, on_volume=None,
) -> dict:
    """Assess each file, write its JSON and PNG into `folder`, then qa.json with the set's summary and diversity.

    All or nothing: the reports are staged and moved into place together at the end, so a failure or Ctrl-C
    leaves no half set. A file that cannot be read is named in document["failed"] and the others go on.
    """
    names = report_names(files)
    if folder.exists() and not folder.is_dir():
        raise CTFlowError(f"the QA folder {folder} is a file; give a folder for the reports (--out)")
    if not overwrite:  # before the work, not after it
        for target in [folder / "qa.json"] + [folder / f"{n}.qa{kind}" for n in names for kind in (".json", ".png")]:
            if target.exists():
                raise OutputExistsError(f"{target} already exists; choose another --out folder or pass --overwrite")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with StagedWrites(overwrite) as staged:
            document = _assess_all(files, names, staged, folder, block_slices, reference, on_volume)
            staged.commit()
    except BaseException:
        if created and not any(folder.iterdir()):
            folder.rmdir()
        raise
    return document


def _assess_all(files, names, staged: StagedWrites, folder: Path, block_slices, reference, on_volume) -> dict:
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    groups: dict[str, list[np.ndarray]] = {}
    for path, name in zip(files, names):
        try:
            volume = read_volume(path).head_first()  # the checks read slice 0 as the most superior
        except (CTFlowError, OSError) as exc:
            failed[path.name] = str(exc)
            continue
        results[name] = assess(volume, block_slices, reference)
        write_report(volume, results[name], folder, name, reference, staged)
        if volume.provenance is not None:
            members = groups.setdefault(volume.provenance.report, [])
            if len(members) < SEEDS_KEPT:
                members.append(thumbnail(volume.hu))
        if on_volume is not None:
            on_volume(name, results[name])
    if not results:
        raise CTFlowError(next(iter(failed.values())) if len(failed) == 1 else
                          f"none of the {len(failed)} volumes could be read, e.g. {next(iter(failed.values()))}")
    document = {"summary": summarise(results), "diversity": diversity(groups), "reference": reference,
                "volumes": results, "failed": failed}
    staged.add(folder / "qa.json", lambda tmp: tmp.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8"))
    return document


def summarise(results: dict[str, dict]) -> dict:
    """Means over the set of the headline numbers."""

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    rows = results.values()
    return {
        "volumes": len(results),
        "seam_ratio": mean(r["seams"].get("ratio") for r in rows),
        "detail_percent_per_block": mean(r["detail"].get("percent_per_block") for r in rows),
        "length_difference": mean(r["length"]["difference"] for r in rows),
        "histogram_distance_hu": mean(r["hu_difference"].get("histogram_distance_hu") for r in rows),
    }


# -- the one-page report ------------------------------------------------------------------------------------------

PAGE_WIDTH, PLOT_HEIGHT = 768, 220


def report_page(volume: Volume, result: dict, reference: dict | None = None) -> Image.Image:
    """Mid-planes (lung window), the seam plot and the HU histogram on one page."""
    planes = render_preview(volume, tile=PAGE_WIDTH // 3, windows=("lung",))
    steps = slice_steps(volume.hu)
    block = result["block_slices"]
    seams = [k for k in range(len(steps)) if block and (k + 1) % block == 0]
    seam_plot = line_plot(
        [(np.arange(len(steps)), steps, 255)], marks=seams,
        title=f"slice-to-slice change (HU); seams dashed; across/inside = {_fmt(result['seams'].get('ratio'))}",
    )
    centres = (HISTOGRAM_EDGES[:-1] + HISTOGRAM_EDGES[1:]) / 2
    series = [(centres, np.log10(np.asarray(result["hu"]["histogram"]) + 1e-6), 255)]
    if reference is not None:
        series.append((centres, np.log10(np.asarray(reference["histogram"]) + 1e-6), 120))
    hu_plot = line_plot(series, marks=[], title="HU histogram, log10 share" + ("; grey: reference" if reference else ""),
                        x_labels=(f"{HISTOGRAM_EDGES[0]:g} HU", f"{HISTOGRAM_EDGES[-1]:g} HU"))
    page = Image.new("L", (PAGE_WIDTH, planes.height + 2 * PLOT_HEIGHT), 0)
    for top, image in ((0, planes), (planes.height, seam_plot), (planes.height + PLOT_HEIGHT, hu_plot)):
        page.paste(image, (0, top))
    return page


def line_plot(series, marks, title: str, x_labels: tuple[str, str] | None = None) -> Image.Image:
    """A bare line chart: series of (x, y, grey level), dashed vertical lines at x = marks, min/max labels."""
    image = Image.new("L", (PAGE_WIDTH, PLOT_HEIGHT), 0)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 56, 20, PAGE_WIDTH - 8, PLOT_HEIGHT - 20
    draw.text((4, 4), title, fill=255)
    draw.rectangle((left, top, right, bottom), outline=90)
    xs = np.concatenate([np.asarray(s[0], float) for s in series])
    ys = np.concatenate([np.asarray(s[1], float) for s in series])
    if not len(xs):  # a one-slice volume has no step between slices
        draw.text((left + 8, top + 8), "nothing to plot", fill=200)
        return image
    x0, x1 = xs.min(), max(xs.max(), xs.min() + 1)
    y0, y1 = ys.min(), max(ys.max(), ys.min() + 1e-6)

    def point(x, y):
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    for x in marks:
        px, _ = point(x, y0)
        for y in range(top, bottom, 6):
            draw.line((px, y, px, min(y + 3, bottom)), fill=110)
    for x, y, grey in series:
        draw.line([point(a, b) for a, b in zip(x, y)], fill=grey, width=1)
    draw.text((4, top), f"{y1:.3g}", fill=200)
    draw.text((4, bottom - 10), f"{y0:.3g}", fill=200)
    low, high = x_labels or (f"{x0:g}", f"{x1:g}")
    draw.text((left, bottom + 4), low, fill=200)
    draw.text((right - 8 * len(high), bottom + 4), high, fill=200)
    return image


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def write_report(volume: Volume, result: dict, folder: Path, name: str, reference: dict | None,
                 staged: StagedWrites) -> None:
    """Stage <name>.qa.json and <name>.qa.png in `folder`."""
    staged.add(folder / f"{name}.qa.json",
               lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8"))
    page = report_page(volume, result, reference)
    staged.add(folder / f"{name}.qa.png", lambda tmp: page.save(tmp, format="PNG"))


def report_names(files: list[Path]) -> list[str]:
    """The name of each file's reports: its stem, or its whole name where two files share a stem (ct.nrrd and
    ct.nii.gz), so no report replaces another."""
    stems = [volume_stem(series_of(path)) for path in files]
    counts = collections.Counter(stems)
    return [path.name if counts[stem] > 1 else stem for path, stem in zip(files, stems)]
