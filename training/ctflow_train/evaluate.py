"""Measure a trained model the way a user meets it: through ctflow's pipeline.

    ctflow-train evaluate --model Resources/Models/ctflow-demo --data cache/cohort --out cache/eval.json

- seam continuity: mean |HU difference| between consecutive slices across block boundaries vs inside blocks
  (real slices only), for generated volumes and, as the reference, for the cohort's own volumes;
- length: where the model ends a volume by itself, against the cohort's typical length and the length of the
  patient whose report was used (and, for a synthetic cohort, every length it draws), split into where the lungs
  end and how far below them the volume ends; and,
  with "Length: N slices" in the prompt but the end left to the model, how far its end lies from N;
- lung volume: the lungs drawn inside the body against the patient's (a model can keep its seams and lengths and
  still draw the lungs small and broken into patches);
- time: seconds per generated volume on this machine.

The result is a ModelEvaluation: written as JSON (`to_json`), read back by the export (`from_json`) for the model
card's lines (`markdown`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ctflow import CTFlowPipeline, GenerationRequest, Volume
from ctflow.conventions import MAX_SLICES
from ctflow.errors import CTFlowError
from ctflow.conventions import real_slices
from ctflow.io import atomic_write, check_output_path
from ctflow.qa import TISSUES, lungs_end, seam_continuity

from .cohort import cohort_lengths, is_cohort_patient
from .dataset import patient_of
from .options import RunConfig, add_ct_cache_option, add_holdout_option, add_threads_option, finite_number, seed
from .runtime import set_threads
from .training_data import Case, list_cases, load_case

POPULATION, POPULATION_SEED = 4000, 1_000_003  # patients of a cohort seed no store is drawn from


@dataclass(frozen=True)
class EvaluationRun(RunConfig):
    """The options of `ctflow-train evaluate` (see `configure`)."""

    model: Path
    data: Path
    holdout: int
    requested: list[int]
    seed: int
    threads: int
    out: Path
    overwrite: bool
    ct_cache: Path | None


def mean(values) -> float | None:
    """The mean to one decimal, None for no values: the figures of an evaluation."""
    values = list(values)
    return round(statistics.mean(values), 1) if values else None


def share(flags) -> float | None:
    """The share of true flags to two decimals, None for none."""
    flags = list(flags)
    return round(sum(flags) / len(flags), 2) if flags else None


@dataclass(frozen=True)
class SeamContinuity:
    """Mean |HU difference| of consecutive real slices across block boundaries and inside blocks, over volumes."""

    boundary_hu: float | None  # None: no volume was long enough to have a seam
    inside_hu: float | None
    ratio: float | None
    volumes: int

    def figures(self) -> dict:
        return {"boundary_hu": self.boundary_hu, "inside_hu": self.inside_hu, "ratio": self.ratio}


@dataclass(frozen=True)
class FreeLength:
    """One volume whose end the model chose: its patient's real slices and the slices generated, and where the
    lungs end in each (qa.lungs_end; None in evaluations written before 2026-11-28 or where no lungs were found),
    and their lung volumes (`lung_volume_ml`; None in evaluations written before 2026-11-29)."""

    patient: str
    real: int
    generated: int
    seconds: float
    patient_lungs_end: int | None = None
    lungs_end: int | None = None
    patient_lung_ml: float | None = None
    lung_ml: float | None = None


@dataclass(frozen=True)
class PromptedLength:
    """One volume with "Length: N slices" in the prompt but the end left to the model."""

    patient: str
    requested: int
    generated: int


@dataclass(frozen=True)
class UnrequestedLength:
    """Where the model ends volumes by itself. The length splits into the pace of the anatomy (where the lungs end,
    against the patient's) and the end's distance below the lungs (generated and real, which the cohort draws at
    random): a model can end at the right distance below lungs that come too early."""

    typical: int
    mean_abs_error_vs_typical: float
    mean_abs_error_vs_patient: float
    volumes: list[FreeLength]
    lungs_end_vs_patient: float | None = None  # mean of generated minus patient: < 0, the anatomy runs ahead
    end_below_lungs: float | None = None  # mean slices from where the lungs end to the volume's end
    patient_end_below_lungs: float | None = None
    lung_volume_vs_patient: float | None = None  # mean percent of generated over patient: < 0, lungs drawn too small
    # The goal's test (issue 18): the share of volumes within one block of the patient's length. No report states
    # the coverage the cohort drew, so the typical length, always, is the reference a model is held against.
    within_one_block: float | None = None
    typical_within_one_block: float | None = None
    typical_error_vs_patient: float | None = None  # the mean error of always ending at the typical length
    # The same shares expected over the length distribution of the patients' cohort (cohort.cohort_lengths): each
    # generated length against every length the cohort draws, not only its own patient's. A few dozen patients
    # give the shares above to within about ten points; these tell the model's lengths apart from its sample's.
    population_within_one_block: float | None = None
    typical_population_within_one_block: float | None = None
    # ... and of lengths drawn from that distribution itself, apart from the report: what a generator whose lengths
    # follow the cohort's exactly would get (below the typical length's: a spread of lengths costs what it adds)
    drawn_population_within_one_block: float | None = None

    @classmethod
    def of(cls, typical: int, volumes: list[FreeLength], block: int | None = None,
           population: np.ndarray | None = None) -> "UnrequestedLength":
        """population: [N] slice counts of the patients' cohort (needs block), None where the data is no cohort."""
        both = [v for v in volumes if v.lungs_end is not None and v.patient_lungs_end is not None]
        lungs = [v for v in volumes if v.lung_ml is not None and v.patient_lung_ml]
        within = () if block is None else (share(abs(v.generated - v.real) <= block for v in volumes),
                                           share(abs(typical - v.real) <= block for v in volumes),
                                           mean(abs(typical - v.real) for v in volumes))
        expected = () if block is None or population is None else (
            round(statistics.mean(float(np.mean(abs(population - v.generated) <= block)) for v in volumes), 2),
            round(float(np.mean(abs(population - typical) <= block)), 2),
            round(float(np.mean(abs(population[:, None] - population[None]) <= block)), 2))
        return cls(typical, mean(abs(v.generated - typical) for v in volumes),
                   mean(abs(v.generated - v.real) for v in volumes), volumes,
                   mean(v.lungs_end - v.patient_lungs_end for v in both), mean(v.generated - v.lungs_end for v in both),
                   mean(v.real - v.patient_lungs_end for v in both),
                   mean(100 * (v.lung_ml / v.patient_lung_ml - 1) for v in lungs), *within, *expected)

    def figures(self) -> dict:
        """The card's figures; the lung ones only where measured (not in evaluations from before them)."""
        figures = {"typical": self.typical, "mean_abs_error_vs_typical": self.mean_abs_error_vs_typical,
                   "mean_abs_error_vs_patient": self.mean_abs_error_vs_patient,
                   "lungs_end_vs_patient": self.lungs_end_vs_patient, "end_below_lungs": self.end_below_lungs,
                   "patient_end_below_lungs": self.patient_end_below_lungs,
                   "lung_volume_vs_patient": self.lung_volume_vs_patient, "within_one_block": self.within_one_block,
                   "typical_within_one_block": self.typical_within_one_block,
                   "typical_error_vs_patient": self.typical_error_vs_patient,
                   "population_within_one_block": self.population_within_one_block,
                   "typical_population_within_one_block": self.typical_population_within_one_block,
                   "drawn_population_within_one_block": self.drawn_population_within_one_block}
        return {name: value for name, value in figures.items() if value is not None}


@dataclass(frozen=True)
class LengthInPrompt:
    mean_abs_error: float | None  # None: no length was put in a prompt
    volumes: list[PromptedLength]

    def figures(self) -> dict:
        return {"mean_abs_error": self.mean_abs_error}


@dataclass(frozen=True)
class ModelEvaluation:
    """What `ctflow-train evaluate` measured; its JSON field names are the file format the model card reads."""

    seam_continuity_generated: SeamContinuity
    seam_continuity_cohort: SeamContinuity
    length_unrequested: UnrequestedLength
    length_requested_in_prompt: LengthInPrompt
    seconds_per_128_slices: float
    machine: str

    def to_json(self) -> dict:
        """dataclasses.asdict, less the lung figures where they were not measured: the file as before them."""
        data = dataclasses.asdict(self)
        free = data["length_unrequested"]
        free["volumes"] = [{k: v for k, v in volume.items() if v is not None} for volume in free["volumes"]]
        data["length_unrequested"] = {k: v for k, v in free.items() if v is not None}
        return data

    @classmethod
    def from_json(cls, data: dict) -> "ModelEvaluation":
        free, asked = data["length_unrequested"], data["length_requested_in_prompt"]
        return cls(
            seam_continuity_generated=SeamContinuity(**data["seam_continuity_generated"]),
            seam_continuity_cohort=SeamContinuity(**data["seam_continuity_cohort"]),
            length_unrequested=UnrequestedLength(**{**free, "volumes": [FreeLength(**v) for v in free["volumes"]]}),
            length_requested_in_prompt=LengthInPrompt(asked["mean_abs_error"],
                                                      [PromptedLength(**v) for v in asked["volumes"]]),
            seconds_per_128_slices=data["seconds_per_128_slices"],
            machine=data["machine"],
        )

    @classmethod
    def is_one(cls, data: dict) -> bool:
        """Whether a JSON object is a ModelEvaluation (an --evaluation file may hold other figures)."""
        return set(data) == {field.name for field in dataclasses.fields(cls)}

    def figures(self) -> dict:
        """The headline figures, without per-volume lists."""
        return {"seam_continuity_generated": self.seam_continuity_generated.figures(),
                "seam_continuity_cohort": self.seam_continuity_cohort.figures(),
                "length_unrequested": self.length_unrequested.figures(),
                "length_requested_in_prompt": self.length_requested_in_prompt.figures(),
                "seconds_per_128_slices": self.seconds_per_128_slices, "machine": self.machine}

    def markdown(self) -> list[str]:
        """The model card's lines: one a figure, its value as JSON."""
        return [f"- {name}: {json.dumps(value)}" for name, value in self.figures().items()]


def seam_jump(hu: np.ndarray, block: int) -> dict:
    """Mean |HU difference| of consecutive real slices at block boundaries and inside blocks (ctflow's QA measure)."""
    seams = seam_continuity(hu[: real_slices(hu)], block)
    return {"boundary_hu": seams["across_hu"], "inside_hu": seams["inside_hu"]} if seams["ratio"] is not None else {}


def lung_voxels(axial: np.ndarray) -> np.ndarray:
    """bool [j, i]: the slice's lung-density voxels (qa.TISSUES) inside the body: the body is what is denser than
    lung, closed and filled, less a rim, so the blur between the skin and the air around it does not count."""
    low, high = TISSUES["lung"]
    body = ndimage.binary_fill_holes(ndimage.binary_closing(axial >= high, iterations=2))
    inside = ndimage.binary_erosion(body, iterations=2)
    return (axial >= low) & (axial < high) & inside


def lung_volume_ml(hu: np.ndarray, spacing) -> float:
    """Millilitres of lung-density voxels inside the body (lung_voxels)."""
    voxels = sum(int(lung_voxels(axial).sum()) for axial in hu)
    return round(voxels * float(np.prod(spacing)) / 1000, 1)


def summarise(seams: list[dict]) -> SeamContinuity:
    """The seams of the volumes that have one (a volume within one block has none)."""
    seams = [s for s in seams if s]
    if not seams:
        return SeamContinuity(None, None, None, 0)
    boundary = statistics.mean(s["boundary_hu"] for s in seams)
    inside = statistics.mean(s["inside_hu"] for s in seams)
    return SeamContinuity(round(boundary, 1), round(inside, 1), round(boundary / max(inside, 1e-6), 2), len(seams))


def generate_volume(pipe: CTFlowPipeline, report: str, seed: int, prompt_slices: int | None = None,
                    **request) -> tuple[Volume, float]:
    """(volume, seconds): how the training package's measurements generate, through ctflow's public API as a user
    does. With prompt_slices the prompt says "Length: N slices" but the model still ends it; `request`: other
    GenerationRequest fields (steps, guidance, slices)."""
    plan = pipe.plan(GenerationRequest(report, prompt_slices=prompt_slices, seed=seed, **request))
    started = time.perf_counter()
    volume = pipe.generate(plan)
    return volume, time.perf_counter() - started


def cohort_population(cases: list[Case], ct_cache: Path | None = None) -> np.ndarray | None:
    """The slice counts of POPULATION patients drawn as the cases' cohort draws its patients, where every case is a
    cohort patient (ctflow-train cohort) of one grid; None for other data (CT-RATE), whose lengths no generator gives.
    ct_cache: where the cohort's base CT is (its lung extent sets the coverage)."""
    grids = {(case.hu.shape[-1], float(case.spacing[2])) for case in cases}
    if len(grids) != 1 or not all(is_cohort_patient(patient_of(case.name)) for case in cases):
        return None
    (size, slice_spacing), = grids
    return cohort_lengths(POPULATION, POPULATION_SEED, size, slice_spacing, ct_cache)


def evaluate_model(args: EvaluationRun) -> ModelEvaluation:
    set_threads(args.threads)
    pipe = CTFlowPipeline.from_pretrained(args.model, device="cpu")
    block = pipe.config.denoiser.block_slices
    _, held = list_cases(args.data, args.holdout)
    cases = [load_case(args.data, entry) for entry in held]
    typical = pipe.config.typical_slices
    free, asked, seams, seconds = [], [], [], []
    for number, case in enumerate(cases):
        seed = args.seed + number
        volume, took = generate_volume(pipe, case.report.text, seed)
        hu = volume.hu
        generated = real_slices(hu)
        real = case.hu[: case.content_slices]
        free.append(FreeLength(case.name, case.content_slices, generated, round(took, 1), lungs_end(real),
                               lungs_end(hu[:generated]), lung_volume_ml(real, case.spacing),
                               lung_volume_ml(hu[:generated], pipe.config.geometry.spacing)))
        seams.append(seam_jump(hu, block))
        seconds.append(took / max(1, len(hu)))
        for requested in args.requested:
            volume, took = generate_volume(pipe, case.report.text, seed, requested)
            hu = volume.hu
            asked.append(PromptedLength(case.name, requested, real_slices(hu)))
            seams.append(seam_jump(hu, block))
            seconds.append(took / max(1, len(hu)))
        print(json.dumps(dataclasses.asdict(free[-1])),
              json.dumps([dataclasses.asdict(a) for a in asked[-len(args.requested):]]), flush=True)
    return ModelEvaluation(
        seam_continuity_generated=summarise(seams),
        seam_continuity_cohort=summarise([seam_jump(case.hu, block) for case in cases]),
        length_unrequested=UnrequestedLength.of(typical, free, block, cohort_population(cases, args.ct_cache)),
        length_requested_in_prompt=LengthInPrompt(
            mean_abs_error=mean(abs(a.generated - a.requested) for a in asked),
            volumes=asked,
        ),
        seconds_per_128_slices=round(128 * statistics.mean(seconds), 1),
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads",
    )


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--data", type=Path, required=True,
                        help="prepared folder whose last --holdout patients give the reports and real lengths; "
                        "keep them out of every latent store the model trained on")
    add_holdout_option(parser)  # its held-out patients give the reports
    length = finite_number(int, lambda n: 1 <= n <= MAX_SLICES, f"from 1 to {MAX_SLICES}")
    parser.add_argument("--requested", type=length, nargs="*", default=[96, 160], help="lengths to put in the prompt")
    parser.add_argument("--seed", type=seed, default=0)
    add_threads_option(parser)
    add_ct_cache_option(parser)
    parser.add_argument("--out", type=Path, required=True, help="JSON to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file (default: refuse)")


def run(args: argparse.Namespace) -> int:
    options = EvaluationRun.from_args(args)
    if options.holdout < 1:
        raise CTFlowError("evaluate --holdout must be at least 1: the held-out patients give the reports and lengths")
    if options.out.exists() and not options.overwrite:  # minutes of generation must not end in a refusal
        check_output_path(options.out, options.overwrite, suffixes=(".json",))
    figures = evaluate_model(options).to_json()
    options.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(options.out, lambda tmp: tmp.write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8"),
                 overwrite=options.overwrite)
    print(json.dumps({k: v for k, v in figures.items() if k not in ("length_unrequested", "length_requested_in_prompt")}))
    return 0
