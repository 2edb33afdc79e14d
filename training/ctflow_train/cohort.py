"""The demo cohort: synthetic patients made from one real chest CT, each with findings, a report and labels.

Each patient is the anatomy of anatomy.py, reshaped (body habitus, a smooth elastic warp, lung
inflation, cranio-caudal coverage), given findings drawn into the right structures (findings.py),
degraded like a scanner would (sharpness, noise) and described in a CT-RATE-style report
(reports.py). Everything is decided by a numpy Generator seeded from (seed, patient index), so a
patient can be regenerated alone and two runs with one seed are identical.

Speed: the CT is cropped to the body and resampled once (the "working" anatomy, a little finer than
the output); each patient is then a single resampling pass into the output grid plus local drawing.
"""

from __future__ import annotations

import argparse
import functools
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from ctflow.conventions import append_end_slices
from ctflow.report import Report
from ctflow.volume import Geometry, Volume

from .anatomy import LUNG_LOBES, Anatomy, close_fissures, in_labels, load_anatomy, remove_contrast
from .dataset import DatasetWriter, check_free
from .findings import CODES, LOBED, SIDED, SIDES, Scene, ctrate_labels, draw_findings
from .options import (
    add_download_cache_option, add_model_space_options, add_overwrite_option, positive, print_json, progress, seed,
)
from .preprocess import HU_MIN, resample, square_fov, to_model_window
from .reports import compose_report

FOV_MARGIN = (1.06, 1.3)  # output field of view / body size
HABITUS = (0.88, 1.15)  # in-plane body scale
WORKING_SIDE = 1.5  # working field / body size: room for the widest field and offsets
SLAB = 24  # output slices resampled at once: bounds memory


@dataclass(frozen=True)
class Patient:
    """One synthetic patient; `labels` and `finding_mask` share the volume's grid (end slices excluded)."""

    name: str
    volume: Volume
    labels: np.ndarray  # anatomy label ids, after the findings reshaped anything (cardiomegaly)
    finding_mask: np.ndarray  # findings.CODES of the voxels each finding drew
    findings: dict[str, dict]  # finding name -> {"present": bool, ...parameters}
    report: Report
    body: dict  # the sampled habitus/coverage/scanner parameters

    def label_record(self) -> dict:
        """What labels/<name>.json holds."""
        return {
            "name": self.name,
            "synthetic": True,
            "findings": self.findings,
            "ctrate_labels": ctrate_labels(self.findings),
            "body": self.body,
        }


@dataclass(frozen=True)
class Template:
    """The anatomy every patient is made from, with the measurements sampling needs."""

    anatomy: Anatomy  # cropped to a square around the body, a little finer than the output
    body_mm: float  # the larger of body width and depth: the field of view scales with it
    lung_mm: tuple[float, float]  # first and last lung slice, mm from the first slice


def template(size: int, cache: str | Path | None = None) -> Template:
    """The template for output size `size`, made once per process (see _make_template)."""
    return _make_template(size, None if cache is None else str(cache))


@functools.lru_cache(maxsize=2)
def _make_template(size: int, cache: str | None) -> Template:
    """Crop the CT to a square around the body and resample it once for output size `size`.

    Slices keep the source spacing; contrast is removed and lobe gaps closed here, on the smaller grid.
    """
    source = load_anatomy(cache)
    centre_ji, extent_mm = body_box(source)
    side = extent_mm * WORKING_SIDE
    pixels = round(size * WORKING_SIDE / FOV_MARGIN[0])
    slice_spacing = source.geometry.spacing[2]
    cropped = square_fov(source.hu, source.geometry, side, centre_ji, fill=HU_MIN)
    hu, geometry = resample(*cropped, pixels, slice_spacing)
    cropped = square_fov(source.labels, source.geometry, side, centre_ji, fill=0)
    labels, _ = resample(*cropped, pixels, slice_spacing, order=0)
    working = Anatomy(hu, labels, geometry, source.names)
    remove_contrast(working)
    close_fissures(working)
    lung_slices = np.nonzero(in_labels(labels, working.ids(*LUNG_LOBES)).any(axis=(1, 2)))[0]
    return Template(working, extent_mm, (lung_slices[0] * slice_spacing, lung_slices[-1] * slice_spacing))


def body_box(anatomy: Anatomy) -> tuple[tuple[float, float], float]:
    """Centre (j, i) in voxels and the larger of width/depth in mm of the body, table excluded.

    The body is what is denser than -400 HU in at least half of the slices (so shoulders cut by the
    scan circle do not count), opened to drop the thin table, largest piece kept.
    """
    mask = (anatomy.hu > -400).mean(axis=0) > 0.5
    mask = ndimage.binary_opening(mask, iterations=max(1, round(5 / anatomy.geometry.spacing[0])))
    parts, count = ndimage.label(mask)
    largest = 1 + int(np.argmax(ndimage.sum(mask, parts, range(1, count + 1))))
    rows, cols = np.nonzero(parts == largest)
    spacing_j, spacing_i = anatomy.geometry.spacing[1], anatomy.geometry.spacing[0]
    centre = ((rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2)
    extent = max((rows.max() - rows.min()) * spacing_j, (cols.max() - cols.min()) * spacing_i)
    return centre, float(extent)


def sample_body(rng: np.random.Generator, base: Template, slice_spacing: float) -> dict:
    """Habitus, coverage and scanner parameters of one patient (plain numbers: they go into the labels file)."""
    lateral = rng.uniform(*HABITUS)
    last_mm = (base.anatomy.hu.shape[0] - 1) * base.anatomy.geometry.spacing[2]
    top = max(0.0, base.lung_mm[0] - rng.uniform(5, 30))
    bottom = min(last_mm, base.lung_mm[1] + rng.uniform(5, 60))
    return {
        "scale_lateral": lateral,
        "scale_ap": lateral * rng.uniform(0.9, 1.1),
        "scale_cc": rng.uniform(0.9, 1.1),
        "fov_margin": rng.uniform(*FOV_MARGIN),
        "offset_mm": np.round(rng.normal(0, 5, size=2), 2).tolist(),  # field centre vs body centre (j, i)
        "top_mm": top,  # coverage in working-anatomy millimetres from its first slice
        "bottom_mm": bottom,
        "warp_mm": rng.uniform(2, 6),
        "warp_seed": int(rng.integers(2**31)),
        "lung_density_shift": rng.uniform(-40, 60),  # depth of inspiration
        "blur_px": rng.uniform(0.3, 0.9),
        "noise_hu": rng.uniform(4, 18),
        "slice_spacing": slice_spacing,
    }


def covered_slices(body: dict) -> int:
    """The slice count of a patient's volume: the coverage, stretched by the cranio-caudal scale."""
    return int((body["bottom_mm"] - body["top_mm"]) * body["scale_cc"] / body["slice_spacing"]) + 1


def cohort_lengths(patients: int, seed: int, size: int = 256, slice_spacing: float = 2.5,
                   cache: str | Path | None = None) -> np.ndarray:
    """[patients] the slice counts of the cohort's patients, drawn as generate_patient draws them but without their
    volumes (thousands a second): the length distribution no report states, that a model's unrequested length is
    held against (evaluate)."""
    base = template(size, cache)
    return np.array([covered_slices(sample_body(_draws(seed, index)[0], base, slice_spacing))
                     for index in range(patients)])


def _draws(seed: int, index: int) -> list[np.random.Generator]:
    """Patient `index` of cohort `seed`'s random streams: body, findings, report, noise."""
    return [np.random.default_rng(stream) for stream in np.random.SeedSequence([seed, index]).spawn(4)]


def warp(base: Template, body: dict, size: int) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """Resample the working anatomy into the patient's output grid through the body transform.

    Output mm -> working mm: divide by the habitus scale, add the field offset and a smooth
    displacement. The scaled grid is separable per axis, and the displacement is a sum of separable
    cosine modes, so source coordinates cost a few broadcast sums per slab of slices.
    """
    scale = np.array([body["scale_cc"], body["scale_ap"], body["scale_lateral"]])
    working = base.anatomy
    fov = base.body_mm * max(scale[1:]) * body["fov_margin"]
    spacing_out = np.array([body["slice_spacing"], fov / size, fov / size])
    slices = covered_slices(body)
    shape = (slices, size, size)
    spacing_in = np.array(working.geometry.spacing[::-1])
    centre_in = (np.array(working.hu.shape) - 1) / 2
    start_mm = np.array([body["top_mm"], *body["offset_mm"]])
    centre_out = np.array([0, (size - 1) / 2, (size - 1) / 2])
    # source index along each axis for the undisplaced grid: a 1-D ramp per axis; slices count from
    # the first working slice, rows and columns from the centre
    ramps = [
        ((np.arange(n) - centre_out[a]) * spacing_out[a] / scale[a] + start_mm[a]) / spacing_in[a] + (centre_in[a] if a else 0)
        for a, n in enumerate(shape)
    ]
    modes = _cosine_modes(np.random.default_rng(body["warp_seed"]), shape, body["warp_mm"] / spacing_in)
    hu = np.empty(shape, np.float32)
    labels = np.empty(shape, np.uint8)
    for first in range(0, slices, SLAB):
        index = modes(first, min(SLAB, slices - first))  # float32: half the memory traffic, ample precision
        index[0] += ramps[0][first : first + SLAB, None, None]
        index[1] += ramps[1][None, :, None]
        index[2] += ramps[2][None, None, :]
        hu[first : first + SLAB] = ndimage.map_coordinates(working.hu, index, order=1, mode="constant", cval=HU_MIN)
        labels[first : first + SLAB] = _nearest(working.labels, index)
    return hu, labels, Geometry.centred(tuple(spacing_out[::-1].tolist()), shape)


def _nearest(labels: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Nearest-neighbour lookup (0 outside): one flat `take`, several times faster than map_coordinates(order=0)."""
    rounded = np.rint(index).astype(np.intp)
    inside = np.all((rounded >= 0) & (rounded < np.array(labels.shape)[:, None, None, None]), axis=0)
    flat = np.ravel_multi_index(tuple(rounded), labels.shape, mode="clip")
    return np.where(inside, labels.ravel().take(flat), 0).astype(labels.dtype)


def _cosine_modes(rng: np.random.Generator, shape: tuple[int, int, int], amplitude: np.ndarray):
    """A smooth random 3-component displacement: separable cosine modes up to order 3 per axis.

    `amplitude` is per component (here in source voxels). Returns slab(first, count) -> [3, count, rows, cols].
    """
    orders = np.arange(4)
    weights = 1 / (1 + orders[:, None, None] + orders[None, :, None] + orders[None, None, :])
    weights[0, 0, 0] = 0  # a pure shift is the field offset's job
    coefficients = rng.normal(size=(3, 4, 4, 4)) * weights * np.asarray(amplitude)[:, None, None, None]
    coefficients[0] *= 0.6  # less cranio-caudal than in-plane motion
    k_basis, j_basis, i_basis = (np.cos(np.pi * np.outer((np.arange(n) + 0.5) / n, orders)) for n in shape)
    plane = np.einsum("jq,ir,cpqr->cpji", j_basis, i_basis, coefficients).reshape(3, 4, -1).astype(np.float32)
    k_basis = k_basis.astype(np.float32)

    def slab(first: int, count: int) -> np.ndarray:
        rows = k_basis[first : first + count, :, None]
        out = np.zeros((3, count, shape[1] * shape[2]), np.float32)
        for component in range(3):
            for order in range(4):  # a 4-term sum: plain broadcasting beats a threaded BLAS call here
                out[component] += rows[:, order] * plane[component, order]
        return out.reshape(3, count, shape[1], shape[2])

    return slab


def adjust_lungs(hu: np.ndarray, labels: np.ndarray, anatomy: Anatomy, shift: float) -> None:
    """Denser or lighter lung parenchyma (depth of inspiration); vessels keep their values."""
    parenchyma = in_labels(labels, anatomy.ids(*LUNG_LOBES)) & (hu < -500)
    hu[parenchyma] += shift


def degrade(hu: np.ndarray, rng: np.random.Generator, blur_px: float, noise_hu: float) -> np.ndarray:
    """Scanner look: in-plane blur (reconstruction kernel) over the image plus white noise.

    The noise is blurred with the image, so it is scaled up first to end at `noise_hu` after the blur.
    """
    gain = np.sqrt(4 * np.pi) * blur_px  # std of white noise after a 2-D Gaussian blur: sigma_n / (2 sqrt(pi) s)
    noisy = hu + rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise_hu * max(gain, 1.0))
    return ndimage.gaussian_filter(noisy, (0, blur_px, blur_px))


def generate_patient(
    seed: int,
    index: int,
    size: int = 256,
    slice_spacing: float = 2.5,
    cache: str | Path | None = None,
    present: dict[str, bool | str] | None = None,
) -> Patient:
    """Patient `index` of the cohort with `seed`; `present` forces findings on or off, or to a side or lobe
    (twins, tests: findings.draw_findings)."""
    base = template(size, cache)
    body_rng, finding_rng, report_rng, noise_rng = _draws(seed, index)
    body = sample_body(body_rng, base, slice_spacing)
    hu, labels, geometry = warp(base, body, size)
    adjust_lungs(hu, labels, base.anatomy, body["lung_density_shift"])
    scene = Scene(hu, labels, np.array(geometry.spacing[::-1]), base.anatomy.names)
    drawn = draw_findings(scene, finding_rng, present)
    hu = degrade(scene.hu, noise_rng, body["blur_px"], body["noise_hu"])
    volume = Volume(append_end_slices(to_model_window(hu)), geometry, None)
    return Patient(patient_name(seed, index), volume, scene.labels, scene.finding_mask, drawn, compose_report(drawn, report_rng), _rounded(body))


def patient_name(seed: int, index: int) -> str:
    return f"synth_{seed}_{index:05d}"


def is_cohort_patient(name: str) -> bool:
    """Whether a patient's name (dataset.patient_of) is one patient_name gives."""
    return re.fullmatch(r"synth_\d+_\d{5}", name) is not None


def generate_cohort(
    out: str | Path,
    patients: int,
    seed: int,
    size: int = 256,
    slice_spacing: float = 2.5,
    cache: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    twins: tuple[str, ...] = (),
    side_twins: tuple[str, ...] = (),
    lobe_twins: tuple[str, ...] = (),
    overwrite: bool = False,
) -> dict:
    """Write `patients` patients (volume, report, labels) and the cohort index to `out`; returns a summary
    whose seconds_per_patient leaves out the one-off template preparation.

    With `twins`, write instead, for each patient and each named finding, its twin: the same patient with that
    finding flipped (present <-> absent), nothing else changed but the report's sentence about it. Trained next to
    the cohort, a pair differs only where the text does, the clearest lesson a small data set can give.
    `side_twins` (sided findings) adds two twins per finding: with it on the right, and with it on the left.
    `lobe_twins` (lobed findings) adds a twin per finding and lobe of one lung (the right lung's three for even
    patients, the left's two for odd ones): twins that differ in the lobe alone, within the side."""
    check_free(Path(out), overwrite)  # before the template's minutes of work
    template(size, cache)
    writer = DatasetWriter(out, overwrite)
    started = time.perf_counter()
    try:
        for index in range(patients):
            where = (seed, index, size, slice_spacing, cache)
            placed = side_twins or lobe_twins
            patient = generate_patient(*where) if twins or not placed else None  # placed twins need his name only
            named = patient_name(seed, index)
            variants = (_twins(patient, twins, *where) + _placed_twins(named, side_twins, tuple(SIDES), *where)
                        + _placed_twins(named, lobe_twins, SIDES[LOBE_TWIN_SIDES[index % 2]], *where))
            for made, name in variants if twins or placed else [(patient, patient.name)]:
                writer.add(name, made.volume, made.report, {**made.label_record(), "name": name}, made.finding_mask)
                if log:
                    log(f"{name}: {made.labels.shape[0]} slices, {', '.join(present_findings(made.findings)) or 'normal'}")
    finally:
        writer.close()
    return {**writer.summary(), "seconds_per_patient": round((time.perf_counter() - started) / max(1, patients), 2)}


def _twins(patient: Patient | None, findings: tuple[str, ...], *where) -> list[tuple[Patient, str]]:
    """(twin, name) per finding: the patient with that finding flipped; none where it cannot be drawn in him."""
    made = []
    for finding in findings:
        wanted = not patient.findings[finding]["present"]
        twin = generate_patient(*where, present={finding: wanted})
        if twin.findings[finding]["present"] == wanted:
            made.append((twin, f"{patient.name}_{'with' if wanted else 'without'}_{finding}"))
    return made


LOBE_TWIN_SIDES = ("right", "left")  # lobe twins' lung by the patient's parity


def _placed_twins(name: str, findings: tuple[str, ...], places: tuple[str, ...], *where) -> list[tuple[Patient, str]]:
    """(twin, name) per finding and place (a side, or a lobe's label): the patient with that finding there. His
    twins differ in the place alone, the lesson a report's side or lobe word needs."""
    made = []
    for finding in findings:
        for place in places:
            twin = generate_patient(*where, present={finding: place})
            if twin.findings[finding]["present"]:
                made.append((twin, f"{name}_with_{place}_{finding}"))
    return made


def present_findings(drawn: dict[str, dict]) -> list[str]:
    return [name for name, params in drawn.items() if params["present"]]


def _rounded(values: dict) -> dict:
    return {key: round(v, 3) if isinstance(v, float) else v for key, v in values.items()}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--patients", type=positive(int), required=True, help="how many patients")
    parser.add_argument("--seed", type=seed, default=0, help="cohort seed: same seed, same patients")
    parser.add_argument("--twins", nargs="+", default=(), metavar="FINDING", choices=sorted(CODES),
                        help="write instead each patient's twins: the same patient with one of these findings flipped")
    parser.add_argument("--side-twins", nargs="+", default=(), metavar="FINDING", choices=SIDED,
                        help="write instead (or as well) two twins per finding: with it on the right, and on the left")
    parser.add_argument("--lobe-twins", nargs="+", default=(), metavar="FINDING", choices=LOBED,
                        help="write instead (or as well) a twin per finding and lobe of one lung (right lung for even "
                             "patients, left for odd)")
    add_model_space_options(parser)
    add_overwrite_option(parser)
    add_download_cache_option(parser)


def run(args: argparse.Namespace) -> int:
    summary = generate_cohort(args.out, args.patients, args.seed, args.size, args.slice_spacing, args.cache, progress,
                              tuple(args.twins), tuple(args.side_twins), tuple(args.lobe_twins), args.overwrite)
    return print_json(summary)
