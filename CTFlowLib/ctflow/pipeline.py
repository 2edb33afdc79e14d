"""Report -> volume, block by block: the autoregressive CTFlow loop with a streaming API.

One report's path: plan() parses and embeds it once and fixes the options (guidance among them); stream() samples
each block of latent slices conditioned on the previous block (the black start block first) and the text, asks the
end detector (ending.VolumeEnd) what of it belongs to the volume, decodes that to HU and yields it at once;
generate() collects the stream into a Volume.
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import torch

from . import __version__
from .autoencoder import SliceAutoencoder
from .config import MAX_SEED, MAX_SLICES, ModelConfig, SamplingConfig, is_finite_number, is_whole
from .conventions import END_HU, MAX_GUIDANCE, START_HU
from .devices import is_out_of_memory, out_of_memory, select_device
from .denoiser import STDiT, parameter_count
from .errors import CorruptModelError, CTFlowError, ModelError, RequestError
from .hub import default_model, is_hub_id, resolve_model
from .io import read_text_file
from .model_folder import CARD, load_denoiser, load_vae, model_sha256, read_config, verify_model_folder
from .places import LOBE_FILE, LobePrior, Places
from .report import (Report, parse_report, reading_of, render_prompt, reports_no_finding, typed_meta_lines,
                     without_findings)
from .ending import VolumeEnd
from .sampling import Cancelled, Guidance, block_velocity, sample, denoiser_codes, validate
from .text_encoder import TextEncoder, unit_cls
from .volume import Geometry, Provenance, Volume

MARKER_SEED_OFFSET = 1  # the released mode's marker samples: a stream apart from the noise of the same seed
ENDED_BEFORE_FIRST_SLICE = "the model ended the volume before its first slice"
UNKNOWN_TOKENS_NOTICE = 0.5  # tell the user when the text encoder knows fewer than half of the report's tokens
# The request's guidance options that read the report's text, and what they read of it: none with an embedding.
READING_GUIDANCE = (("side_guidance", "sides"), ("finding_guidance", "findings"))


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. None means "the model's default"."""

    report: str
    impressions: str | None = None  # when Findings and Impressions come from separate boxes
    slices: int | None = None  # stop at exactly this many slices; None lets the model end the volume itself
    # The length written into the prompt ("Length: N slices"); None: `slices`. Set it without `slices` to ask the
    # model for a length and let it end the volume itself (how well it follows is what evaluation measures).
    prompt_slices: int | None = None
    seed: int | None = None  # None draws a fresh seed (recorded in provenance)
    steps: int | None = None
    guidance: float | None = None
    side_guidance: float | None = None  # each half of the volume by its half of the report (report.half_reports); 0: none
    finding_guidance: float | None = None  # away from the report without its findings (without_findings); 0: none
    sampler: str | None = None
    shift: float | None = None
    # A precomputed report embedding (models with one text vector): used instead of encoding the report, which is
    # then only recorded. [D], [N, D] (row 0 is used, as the released training did) or [1, N, D].
    embedding: torch.Tensor | None = None


@dataclass(frozen=True)
class GenerationPlan:
    """A validated request with its text embedded: everything needed to start sampling."""

    request: GenerationRequest  # with every None replaced by the value used
    prompt: str
    report_text: str
    notices: tuple[str, ...]  # things the caller should tell the user (e.g. the report was truncated)
    text: torch.Tensor  # [guidance.branches, M, text_dim]: in Guidance.texts' order
    text_mask: torch.Tensor
    guidance: Guidance
    code_texts: tuple[str, ...] = ()  # each row's text, in Guidance.texts' order: what a denoiser's code is read from
    reading: str = ""  # the findings the report is read to report and negate (report.reading_of); "" for an embedding


@dataclass(frozen=True)
class DecodedBlock:
    """One decoded block of slices, in order, with the generation's progress; slices [start, stop) of the volume."""

    index: int
    start: int
    stop: int
    hu: np.ndarray  # int16 [stop - start, rows, cols]
    geometry: Geometry
    provenance: Provenance
    blocks_done: int
    blocks_expected: int  # estimate: the model decides where an unrequested length ends
    elapsed_s: float
    block_s: float
    eta_s: float

    @property
    def is_last(self) -> bool:
        """The volume's final block (the estimate of blocks to come is exact once the volume has ended)."""
        return self.blocks_done == self.blocks_expected


def with_defaults(request: GenerationRequest, sampling: SamplingConfig) -> GenerationRequest:
    """The request with every unset sampling option replaced by the model's default (the seed stays as given).
    A precomputed embedding has no empty report, halves of a report or report without findings to guide by, so its
    default guidance is 1 and its side and finding guidance 0 (off)."""
    given = request.embedding is not None
    default_guidance, default_side, default_finding = ((1.0, 0.0, 0.0) if given else
                                                       (sampling.guidance, sampling.side_guidance,
                                                        sampling.finding_guidance))
    return dataclasses.replace(
        request,
        steps=request.steps if request.steps is not None else sampling.steps,
        guidance=request.guidance if request.guidance is not None else default_guidance,
        side_guidance=request.side_guidance if request.side_guidance is not None else default_side,
        finding_guidance=request.finding_guidance if request.finding_guidance is not None else default_finding,
        sampler=request.sampler or sampling.method,
        shift=request.shift if request.shift is not None else sampling.shift,
        prompt_slices=request.prompt_slices if request.prompt_slices is not None else request.slices,
    )


def check_options(request: GenerationRequest, config: ModelConfig | None = None) -> None:
    """Every check of a request's numbers that needs no model, at most its config.json: commands run it before
    the model loads (a second, not twenty), and plan() runs it again."""
    resolved = with_defaults(request, config.sampling if config is not None else SamplingConfig())
    validate(resolved.steps, resolved.sampler, resolved.shift)
    slices = resolved.slices
    if slices is not None and not (is_whole(slices) and 1 <= slices <= MAX_SLICES):
        raise RequestError(f"slice count must be a whole number from 1 to {MAX_SLICES}, not {slices!r}")
    if slices is not None and config is not None and slices > config.max_slices:
        raise RequestError(f"slice count {slices} is more than this model makes: at most {config.max_slices} slices "
                           "(max_slices in its config.json)")
    length = resolved.prompt_slices
    if length is not None and not (is_whole(length) and 1 <= length <= MAX_SLICES):
        raise RequestError(f"the prompt's length must be a whole number from 1 to {MAX_SLICES} slices, not {length!r}")
    if resolved.seed is not None and not (is_whole(resolved.seed) and 0 <= resolved.seed <= MAX_SEED):
        raise RequestError(f"seed must be a whole number from 0 to {MAX_SEED}, not {resolved.seed!r}")
    guidance = resolved.guidance
    if not (is_finite_number(guidance) and 0.0 <= guidance <= MAX_GUIDANCE):
        raise RequestError(f"guidance must be a number from 0 to {MAX_GUIDANCE:g}, not {guidance!r}")
    if guidance != 1.0 and config is not None and not config.sampling.guidance_supported:
        raise RequestError(f"{config.name} was trained without text dropout, so it has no unconditional "
                           "prediction to guide by: use guidance 1")
    if guidance != 1.0 and request.embedding is not None:
        raise RequestError("guidance needs an embedding of the empty report too: with a precomputed "
                           "embedding use guidance 1")
    for name, reads in READING_GUIDANCE:
        value, label = getattr(resolved, name), name.replace("_", " ")
        if not (is_finite_number(value) and 0 <= value <= MAX_GUIDANCE):
            raise RequestError(f"{label} must be a number from 0 to {MAX_GUIDANCE:g}, not {value!r}")
        if value > 0 and request.embedding is not None:
            raise RequestError(f"{label} needs the report's text, to read its {reads}: with a precomputed "
                               f"embedding use {label} 0")
    if request.embedding is not None and config is not None:
        given_embedding(request.embedding, config)


def given_embedding(vectors: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """A precomputed report embedding ([D], [N, D] or [1, N, D]) -> [1, 1, D]: its first row, L2-normalised, as
    the released CTFlow training read its embedding files. Needs only the config, so a command refuses a wrong one
    before the model loads."""
    width = config.denoiser.text_dim
    if config.text.mode == "tokens":
        raise RequestError(f"{config.name} reads token sequences, not one precomputed embedding vector")
    vectors = torch.as_tensor(vectors, dtype=torch.float32)
    if vectors.dim() == 0 or vectors.shape[-1] != width or not vectors.numel():
        raise RequestError(f"the embedding is {list(vectors.shape)}, but {config.name} reads "
                           f"{width}-d report embeddings")
    rows = vectors.reshape(-1, width)
    if not torch.isfinite(rows[0]).all() or not rows[0].any():
        raise RequestError("the embedding's first row is zero or not finite")
    return unit_cls(rows[:1])[None]


def check_request(request: GenerationRequest, config: ModelConfig | None = None) -> Report:
    """check_options, and parse the report (empty, binary, not text...): returns the parsed report."""
    check_options(request, config)
    return parse_report(request.report, request.impressions)


def local_config(model: str | os.PathLike | None, revision: str | None = None) -> ModelConfig | None:
    """config.json of a local model folder (None: the bundled one), read without touching its weights; None for a
    hub id, which is read once downloaded."""
    refuse_revision_for_folder(model, revision)
    if model is not None and is_hub_id(model):
        return None
    return read_config(resolve_model(model if model is not None else default_model()))


def refuse_revision_for_folder(model: str | os.PathLike | None, revision: str | None) -> None:
    """A revision picks a version of a hub model; silently ignoring it for a local folder would mislead."""
    if revision and (model is None or Path(model).expanduser().is_dir()):
        where = "the bundled model" if model is None else str(model)
        raise ModelError(f"--revision {revision} selects a version of a hub model, but {where} is a local folder; "
                         "drop --revision")


class CTFlowPipeline:
    def __init__(
        self, config: ModelConfig, denoiser: STDiT, autoencoder: SliceAutoencoder, text_encoder: TextEncoder,
        model_id: str = "", model_sha256: str = "", device: torch.device = torch.device("cpu"), card: str = "",
        lobe_prior: LobePrior | None = None,
    ) -> None:
        if text_encoder.dim != config.denoiser.text_dim:
            raise ModelError(f"text encoder width {text_encoder.dim} != denoiser text_dim {config.denoiser.text_dim}")
        if autoencoder.latent_channels != config.denoiser.latent_channels:
            raise ModelError(
                f"VAE latent channels {autoencoder.latent_channels} != denoiser {config.denoiser.latent_channels}"
            )
        self.config = config
        self.denoiser = denoiser
        self.autoencoder = autoencoder
        self.text_encoder = text_encoder
        self.model_id = model_id
        self.model_sha256 = model_sha256
        self.device = device
        self.card = card  # the model folder's README.md: data, training, metrics, limits
        self.lobe_prior = lobe_prior  # where the lungs' lobes lie: side guidance places a lobe's findings there

    @classmethod
    def from_pretrained(
        cls, model: str | os.PathLike | None = None, *, revision: str | None = None, device: str = "auto",
        dtype: torch.dtype | None = None, local_files_only: bool | None = None,
    ) -> "CTFlowPipeline":
        """Load a model folder or hub id (default: the bundled demo model), verifying its checksums first."""
        refuse_revision_for_folder(model, revision)
        folder = resolve_model(model if model is not None else default_model(), revision, local_files_only)
        checksums = verify_model_folder(folder)
        config = read_config(folder)
        card = read_text_file(folder / CARD, CorruptModelError, "; re-download the model") if CARD in checksums else ""
        target = select_device(device)
        dtype = dtype or (torch.bfloat16 if target.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32)
        try:
            denoiser = load_denoiser(folder, config).to(target, dtype)
            autoencoder = SliceAutoencoder(load_vae(folder).to(target), config.autoencoder)
            text_encoder = TextEncoder.load(config.text, folder, local_files_only)
            text_encoder.model.to(target)
            lobe_prior = LobePrior.load(folder, config.denoiser.latent_size) if LOBE_FILE in checksums else None
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            raise out_of_memory(target, f"loading {folder.name}") from exc
        model_id = str(model) if model is not None and not Path(model).is_dir() else config.name
        return cls(config, denoiser, autoencoder, text_encoder, model_id, model_sha256(checksums), target, card,
                   lobe_prior)

    # -- planning -------------------------------------------------------------------------------------------

    def plan(self, request: GenerationRequest) -> GenerationPlan:
        """Validate the request and embed its text: fails fast, before any sampling."""
        resolved = with_defaults(request, self.config.sampling)
        if resolved.seed is None:
            resolved = dataclasses.replace(resolved, seed=secrets.randbelow(2**31))
        report = check_request(resolved, self.config)
        if request.embedding is not None:  # the report text is only recorded; the model sees the given vector
            tokens = given_embedding(request.embedding, self.config)
            notices = []
            if request.guidance is None and resolved.guidance != self.config.sampling.guidance:  # with_defaults
                notices.append(f"guidance 1 (the model's default is {self.config.sampling.guidance:g}): a "
                               "precomputed embedding has no empty-report twin to guide by")
            for name, reads in READING_GUIDANCE:
                if getattr(request, name) is None and getattr(self.config.sampling, name):
                    notices.append(f"{name.replace('_', ' ')} 0 (the model's default is "
                                   f"{getattr(self.config.sampling, name):g}): a precomputed embedding has no report "
                                   f"text to read {reads} from")
            guidance = Guidance(resolved.guidance)
            return GenerationPlan(resolved, report.text, report.text, tuple(notices), tokens,
                                  torch.ones(1, 1, dtype=torch.bool), guidance, tuple(guidance.texts("")))
        # The released model never saw our meta lines (length, spacing): it gets the report sections alone.
        spacing = self.config.geometry.spacing[2]

        def render(text: Report) -> str:
            return text.text if self.released_mode else render_prompt(text, resolved.prompt_slices, spacing)

        drawn = self.drawn_report(report)
        prompt, reference = render(drawn), render(without_findings(drawn))
        places = Places.of(drawn, render, self.lobe_prior, resolved.slices or self.config.typical_slices)
        guidance = Guidance(resolved.guidance, resolved.side_guidance if len(places.texts) > 1 else 0.0,
                            resolved.finding_guidance if reference != prompt else 0.0, places)
        texts = guidance.texts(prompt, reference)
        embedding = self.text_encoder.encode(texts)
        notices = []
        if report.truncated or any(embedding.truncated):  # either half's text, with side guidance
            notices.append(
                f"the report is longer than the text encoder's {self.text_encoder.max_tokens}-token limit; "
                "only its beginning was used"
            )
        if drawn != report:
            notices.append("the report is read as no finding, so the volume is drawn from the model's own normal "
                           "report (the provenance's prompt): this model can draw a finding from words that negate it")
        for line in typed_meta_lines(report):
            notices.append(f"the report's '{line}' is read as report text, not as a request: "
                           + ("ask for a length with the slice count (--slices, the panel's Slices)"
                              if line.lower().startswith("length") else f"the model makes slices {spacing:g} mm apart"))
        unknown = self.text_encoder.unknown_share(f"{report.findings} {report.impressions}")
        if unknown > UNKNOWN_TOKENS_NOTICE:
            notices.append(
                f"the text encoder does not know {unknown:.0%} of the report's tokens (it reads English): "
                "the volume will hardly follow the report"
            )
        return GenerationPlan(resolved, prompt, report.text, tuple(notices), embedding.tokens, embedding.mask, guidance,
                              tuple(texts), reading_of(report))

    def drawn_report(self, report: Report) -> Report:
        """The report the model is given: its normal report (config.normal_report) where `report` reports no finding,
        else `report`. A user's normal report, or one that only negates findings, then draws the chest the model
        learnt a normal report to be, not what its other words happen to move (issue 18)."""
        if self.config.normal_report and reports_no_finding(report):
            return parse_report(self.config.normal_report)
        return report

    # -- generation -----------------------------------------------------------------------------------------

    def stream(
        self, request: GenerationRequest | GenerationPlan, cancel: CancelFlag | None = None, decode_ahead: bool = False,
    ) -> Iterator[DecodedBlock]:
        """Yield decoded blocks in order as soon as each is ready. Stops early (no error) when cancelled.

        decode_ahead: sample block k + 1 on a worker thread while block k is decoded and consumed. On a CPU both
        halves compete for the same cores; docs/BENCHMARKS.md says where it pays.
        """
        plan = request if isinstance(request, GenerationPlan) else self.plan(request)
        stopped = threading.Event()  # set when the consumer stops iterating: ends a decode-ahead worker too
        is_cancelled = (lambda: stopped.is_set() or cancel.is_set()) if cancel is not None else stopped.is_set
        start, white = self._markers(plan.request.seed)
        blocks = self._sample_blocks(plan, start, is_cancelled)
        if decode_ahead:
            blocks = _run_ahead(blocks, stopped)
        volume_end = VolumeEnd(self._end_rule(plan.request), white, self.config.end_tolerance, self.config.end_fraction)
        progress = _Progress(self._provenance(plan), self._geometry(), self._expected_blocks(plan.request))
        try:
            for first_slice, latents in blocks:  # sample a block
                hu, last = volume_end(latents, self._length_cap(plan.request) - first_slice, self._decode)  # end, decode
                if hu is not None:
                    yield progress.add(hu, last)
                    progress.resume()  # the consumer is done with the block: the next block's time starts
                if last or is_cancelled():
                    return
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(exc):
                raise
            raise out_of_memory(self.device, f"generating block {progress.blocks_done + 1}", "ask for fewer slices") from exc
        finally:
            stopped.set()
            blocks.close()  # ends a decode-ahead worker before returning

    def generate(
        self, request: GenerationRequest | GenerationPlan, cancel: CancelFlag | None = None,
        on_block: Callable[[DecodedBlock], None] | None = None,
    ) -> Volume:
        """Run the stream to the end and return the volume; cancelled runs return what was made, marked partial."""
        blocks = []
        for block in self.stream(request, cancel):
            blocks.append(block)
            if on_block is not None:
                on_block(block)
        cancelled = cancel is not None and cancel.is_set() and not (blocks and blocks[-1].is_last)  # not if too late
        if not blocks:
            raise CTFlowError("generation was cancelled before the first block was made" if cancelled else
                              ENDED_BEFORE_FIRST_SLICE)
        provenance = dataclasses.replace(blocks[0].provenance, partial=cancelled)
        return Volume(np.concatenate([b.hu for b in blocks]), blocks[0].geometry, provenance)

    def compile(self, **options) -> "CTFlowPipeline":
        """torch.compile the denoiser (every block has the same shape, so it compiles once); the first block is slow."""
        self.denoiser = torch.compile(self.denoiser, **options)
        return self

    @property
    def precision(self) -> str:
        """The denoiser's dtype as provenance records it: "float32", "bfloat16"."""
        return str(next(self.denoiser.parameters()).dtype).removeprefix("torch.")

    def info(self) -> dict[str, object]:
        """Model card facts: name, sizes, parameter counts, device."""
        return {
            "model": self.model_id,
            "model_sha256": self.model_sha256,
            "ctflow_version": __version__,
            "device": str(self.device),
            "dtype": self.precision,
            "denoiser_parameters": parameter_count(self.denoiser),
            "autoencoder_parameters": parameter_count(self.autoencoder.vae),
            "text_encoder": self.text_encoder.name,
            "text_encoder_parameters": parameter_count(self.text_encoder.model),
            "slice_size": self.autoencoder.config.image_size,
            "spacing_mm": list(self.config.geometry.spacing),
            "block_slices": self.config.denoiser.block_slices,
            "sampling": dataclasses.asdict(self.config.sampling),
            "lobe_prior": self.lobe_prior is not None,  # side guidance places a lobe's findings in that lobe
            "description": self.config.description,
        }

    # -- internals ------------------------------------------------------------------------------------------

    @property
    def released_mode(self) -> bool:
        return self.config.sampling.mode == "released"

    def _markers(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The start block's slice latent and the white end-marker latent, each [C, h, w].

        The released generator draws both as VAE posterior samples (from the request's seed here); ours uses modes.
        """
        if not self.released_mode:
            return self.autoencoder.constant_latent(START_HU), self.autoencoder.constant_latent(END_HU)
        generator = torch.Generator("cpu").manual_seed(seed + MARKER_SEED_OFFSET)
        return (self.autoencoder.constant_latent(START_HU, generator),
                self.autoencoder.constant_latent(END_HU, generator))

    def _end_rule(self, request: GenerationRequest) -> str:
        return "length" if request.slices else self.config.sampling.mode

    def _length_cap(self, request: GenerationRequest) -> int:
        """The requested length, or the model's max_slices when it ends the volume itself."""
        return request.slices or self.config.max_slices

    def _expected_blocks(self, request: GenerationRequest) -> int:
        return math.ceil((request.slices or self.config.typical_slices) / self.config.denoiser.block_slices)

    def _geometry(self) -> Geometry:
        size = self.autoencoder.config.image_size
        return Geometry.centred(self.config.geometry.spacing, (1, size, size))

    def _provenance(self, plan: GenerationPlan) -> Provenance:
        req = plan.request
        return Provenance(
            report=plan.report_text, prompt=plan.prompt, seed=req.seed, steps=req.steps, sampler=req.sampler,
            shift=req.shift, guidance=req.guidance, side_guidance=plan.guidance.side,
            finding_guidance=plan.guidance.finding, model=self.model_id,
            model_sha256=self.model_sha256, ctflow_version=__version__, device=str(self.device),
            dtype=self.precision, slices_requested=req.slices,
            block_slices=self.config.denoiser.block_slices,
        )

    def _sample_blocks(
        self, plan: GenerationPlan, start: torch.Tensor, is_cancelled: Callable[[], bool],
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Sample block after block up to the length cap, each conditioned on the one before (the start block
        first): yields (the block's first slice, its clean latents [C, T, h, w]). start: the start latent [C, h, w].

        Sampling only, no decoding, so it can run one block ahead of the decoder (decode_ahead).
        """
        req = plan.request
        block_len = self.config.denoiser.block_slices
        generator = torch.Generator("cpu").manual_seed(req.seed)  # CPU noise: the same seed gives the same noise anywhere
        previous = start.to(self.device)[:, None].expand(-1, block_len, -1, -1)[None]  # [1, C, T, h, w]
        for first_slice in range(0, self._length_cap(req), block_len):
            noise = self._block_noise(previous.shape, generator)
            with torch.no_grad():  # per thread: the decode-ahead worker needs its own
                try:
                    velocity = block_velocity(self.denoiser, previous, plan.text, plan.text_mask, first_slice,
                                              plan.guidance, denoiser_codes(plan.code_texts, self.config.denoiser,
                                                                        first_slice))
                    clean = sample(velocity, noise, req.steps, req.sampler, req.shift, is_cancelled)
                except Cancelled:
                    return
            yield first_slice, clean[0]
            previous = clean

    def _block_noise(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        """A block's starting noise, drawn on the CPU: the same seed gives the same noise on any device."""
        return torch.randn(shape, generator=generator).to(self.device)

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        hu = self.autoencoder.decode(latents.permute(1, 0, 2, 3))  # [T, h, w] latents -> [T, H, W] HU
        if not torch.isfinite(hu).all():  # would be cast to arbitrary integers, a volume that looks valid
            raise CTFlowError("the model produced non-finite values (NaN or inf): its weights or the sampling "
                              "options are broken; nothing was written")
        return hu.round().clamp(-32768, 32767).to(torch.int16).cpu().numpy()


class _Progress:
    """Numbers the decoded blocks of one stream and times them."""

    def __init__(self, provenance: Provenance, geometry: Geometry, expected: int) -> None:
        self.provenance, self.geometry, self.expected = provenance, geometry, expected
        self.blocks_done = self.slices = 0
        self.started = self.block_started = time.perf_counter()

    def add(self, hu: np.ndarray, last: bool) -> DecodedBlock:
        now = time.perf_counter()
        self.slices += hu.shape[0]
        self.blocks_done += 1
        self.expected = self.blocks_done if last else max(self.expected, self.blocks_done + 1)
        elapsed = now - self.started
        return DecodedBlock(
            index=self.blocks_done - 1, start=self.slices - hu.shape[0], stop=self.slices, hu=hu,
            geometry=self.geometry, provenance=self.provenance, blocks_done=self.blocks_done,
            blocks_expected=self.expected, elapsed_s=elapsed, block_s=now - self.block_started,
            eta_s=elapsed / self.blocks_done * (self.expected - self.blocks_done),
        )

    def resume(self) -> None:
        self.block_started = time.perf_counter()


Block = DecodedBlock  # deprecated: its first name, kept for scripts written against it (README, "The Python API")


_DONE = object()


def _run_ahead(items: Iterator, stopped: threading.Event) -> Iterator:
    """Iterate `items` on a worker thread, at most one item ahead of the consumer; the worker's errors re-raise here.

    The worker must end soon after `stopped` is set (the sampler polls it every step).
    """
    slot: queue.Queue = queue.Queue(maxsize=1)

    def offer(item) -> None:
        while not stopped.is_set():
            try:
                slot.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def work() -> None:
        try:
            for item in items:
                offer(item)
            offer(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            offer(exc)

    worker = threading.Thread(target=work, name="ctflow-sampler", daemon=True)
    worker.start()
    try:
        while (item := slot.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stopped.set()
        worker.join()
