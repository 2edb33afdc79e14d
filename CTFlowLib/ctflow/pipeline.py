"""Report -> volume, block by block: the autoregressive CTFlow loop with a streaming API.

One report's path: plan() parses and embeds it once; stream() samples each block of latent slices
conditioned on the previous block (the black start block first) and the text, decodes it to HU and
yields it at once; generate() collects the stream into a Volume.
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
from .config import MAX_SLICES, ModelConfig, SamplingConfig
from .conventions import END_HU, START_HU, real_slices
from .denoiser import STDiT, parameter_count
from .errors import CTFlowError, DeviceError, ModelError, RequestError
from .model_folder import (
    _HUB_ID, CARD, WEIGHTS, default_model, load_denoiser, load_vae, read_config, resolve_model, verify_checksums,
)
from .report import Report, parse_report, render_prompt
from .sampling import Cancelled, guided, sample, validate
from .text_encoder import TextEncoder, unit_cls
from .volume import Geometry, Provenance, Volume

MARKER_SEED_OFFSET = 1  # the released mode's marker samples: a stream apart from the noise of the same seed
MAX_GUIDANCE = 30.0
UNKNOWN_TOKENS_NOTICE = 0.5  # tell the user when the text encoder knows fewer than half of the report's tokens


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. None means "the model's default"."""

    report: str
    impressions: str | None = None  # when Findings and Impressions come from separate boxes
    slices: int | None = None  # exact length; None lets the model end the volume itself
    seed: int | None = None  # None draws a fresh seed (recorded in provenance)
    steps: int | None = None
    guidance: float | None = None
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
    text: torch.Tensor  # [2 or 1, M, text_dim]: conditional (and unconditional for guidance)
    text_mask: torch.Tensor


@dataclass(frozen=True)
class Block:
    """One decoded block of slices, in order; slices [start, stop) of the volume."""

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


def with_defaults(request: GenerationRequest, sampling: SamplingConfig) -> GenerationRequest:
    """The request with every unset sampling option replaced by the model's default (the seed stays as given)."""
    return dataclasses.replace(
        request,
        steps=request.steps if request.steps is not None else sampling.steps,
        guidance=request.guidance if request.guidance is not None else sampling.guidance,
        sampler=request.sampler or sampling.method,
        shift=request.shift if request.shift is not None else sampling.shift,
    )


def check_options(request: GenerationRequest, config: ModelConfig | None = None) -> None:
    """Every check of a request's numbers that needs no model, at most its config.json: commands run it before
    the model loads (a second, not twenty), and plan() runs it again."""
    if config is not None and not (isinstance(config.max_slices, int) and config.max_slices >= 1):
        raise ModelError(f"the model's config.json sets max_slices to {config.max_slices!r}; it must be a whole "
                         "number of at least 1")
    resolved = with_defaults(request, config.sampling if config is not None else SamplingConfig())
    validate(resolved.steps, resolved.sampler, resolved.shift)
    slices = resolved.slices
    if slices is not None and not (isinstance(slices, int) and 1 <= slices <= MAX_SLICES):
        raise RequestError(f"slice count must be a whole number from 1 to {MAX_SLICES}, not {slices!r}")
    if slices is not None and config is not None and slices > config.max_slices:
        raise RequestError(f"slice count {slices} is more than this model makes: at most {config.max_slices} slices "
                           "(max_slices in its config.json)")
    if resolved.seed is not None and not (isinstance(resolved.seed, int) and 0 <= resolved.seed < 2**63):
        raise RequestError(f"seed must be a non-negative whole number, not {resolved.seed!r}")
    guidance = resolved.guidance
    if not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and 0.0 <= guidance <= MAX_GUIDANCE):
        raise RequestError(f"guidance must be a number from 0 to {MAX_GUIDANCE:g}, not {guidance!r}")
    if guidance != 1.0 and config is not None and not config.sampling.guidance_supported:
        raise RequestError(f"{config.name} was trained without text dropout, so it has no unconditional "
                           "prediction to guide by: use guidance 1")
    if guidance != 1.0 and request.embedding is not None:
        raise RequestError("guidance needs an embedding of the empty report too: with a precomputed "
                           "embedding use guidance 1")


def check_request(request: GenerationRequest, config: ModelConfig | None = None) -> Report:
    """check_options, and parse the report (empty, binary, not text...): returns the parsed report."""
    check_options(request, config)
    return parse_report(request.report, request.impressions)


def local_config(model: str | os.PathLike | None, revision: str | None = None) -> ModelConfig | None:
    """config.json of a local model folder (None: the bundled one), read without touching its weights; None for a
    hub id, which is read once downloaded."""
    refuse_revision_for_folder(model, revision)
    if model is not None and isinstance(model, str) and _HUB_ID.match(model) and not Path(model).expanduser().exists():
        return None
    return read_config(resolve_model(model if model is not None else default_model()))


def refuse_revision_for_folder(model: str | os.PathLike | None, revision: str | None) -> None:
    """A revision picks a version of a hub model; silently ignoring it for a local folder would mislead."""
    if revision and (model is None or Path(model).expanduser().is_dir()):
        where = "the bundled model" if model is None else str(model)
        raise ModelError(f"--revision {revision} selects a version of a hub model, but {where} is a local folder; "
                         "drop --revision")


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"CUDA was requested but this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu "
            "or install a CUDA build of torch"
        )
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise DeviceError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


class CTFlowPipeline:
    def __init__(
        self, config: ModelConfig, denoiser: STDiT, autoencoder: SliceAutoencoder, text_encoder: TextEncoder,
        model_id: str = "", weights_sha256: str = "", device: torch.device = torch.device("cpu"), card: str = "",
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
        self.weights_sha256 = weights_sha256
        self.device = device
        self.card = card  # the model folder's README.md: data, training, metrics, limits
        # Sample block k + 1 on a worker thread while block k is decoded and consumed. Off by default: on a
        # CPU both halves compete for the same cores; docs/BENCHMARKS.md says where it pays.
        self.decode_ahead = False

    @classmethod
    def from_pretrained(
        cls, model: str | os.PathLike | None = None, *, revision: str | None = None, device: str = "auto",
        dtype: torch.dtype | None = None, local_files_only: bool | None = None,
    ) -> "CTFlowPipeline":
        """Load a model folder or hub id (default: the bundled demo model), verifying its checksums first."""
        refuse_revision_for_folder(model, revision)
        folder = resolve_model(model if model is not None else default_model(), revision, local_files_only)
        checksums = verify_checksums(folder)
        config = read_config(folder)
        target = select_device(device)
        dtype = dtype or (torch.bfloat16 if target.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32)
        try:
            denoiser = load_denoiser(folder, config).to(target, dtype)
            autoencoder = SliceAutoencoder(load_vae(folder).to(target), config.autoencoder)
            text_encoder = TextEncoder.load(config.text, folder, local_files_only)
            text_encoder.model.to(target)
        except torch.OutOfMemoryError as exc:
            raise DeviceError(f"not enough {target.type} memory to load {folder.name}; try --device cpu") from exc
        model_id = str(model) if model is not None and not Path(model).is_dir() else config.name
        card = (folder / CARD).read_text(encoding="utf-8") if (folder / CARD).is_file() else ""
        return cls(config, denoiser, autoencoder, text_encoder, model_id, checksums[WEIGHTS], target, card)

    # -- planning -------------------------------------------------------------------------------------------

    def plan(self, request: GenerationRequest) -> GenerationPlan:
        """Validate the request and embed its text: fails fast, before any sampling."""
        resolved = with_defaults(request, self.config.sampling)
        if resolved.seed is None:
            resolved = dataclasses.replace(resolved, seed=secrets.randbelow(2**31))
        report = check_request(resolved, self.config)
        if request.embedding is not None:  # the report text is only recorded; the model sees the given vector
            tokens = self._given_embedding(request.embedding)
            return GenerationPlan(resolved, report.text, report.text, (), tokens, torch.ones(1, 1, dtype=torch.bool))
        # The released model never saw our meta lines (length, spacing): it gets the report sections alone.
        spacing = self.config.geometry.spacing[2]
        prompt = report.text if self.released_mode else render_prompt(report, resolved.slices, spacing)
        texts = [prompt] if resolved.guidance == 1.0 else [prompt, ""]  # "" is the empty-report embedding
        embedding = self.text_encoder.encode(texts)
        notices = []
        if report.truncated or embedding.truncated[0]:
            notices.append(
                f"the report is longer than the text encoder's {self.text_encoder.max_tokens}-token limit; "
                "only its beginning was used"
            )
        unknown = self.text_encoder.unknown_share(f"{report.findings} {report.impressions}")
        if unknown > UNKNOWN_TOKENS_NOTICE:
            notices.append(
                f"the text encoder does not know {unknown:.0%} of the report's tokens (it reads English): "
                "the volume will hardly follow the report"
            )
        return GenerationPlan(resolved, prompt, report.text, tuple(notices), embedding.tokens, embedding.mask)

    def _given_embedding(self, vectors: torch.Tensor) -> torch.Tensor:
        """A precomputed report embedding ([D], [N, D] or [1, N, D]) -> [1, 1, D]: its first row, L2-normalised, as
        the released CTFlow training read its embedding files."""
        width = self.config.denoiser.text_dim
        if self.text_encoder.mode == "tokens":
            raise RequestError(f"{self.config.name} reads token sequences, not one precomputed embedding vector")
        vectors = torch.as_tensor(vectors, dtype=torch.float32)
        if vectors.dim() == 0 or vectors.shape[-1] != width or not vectors.numel():
            raise RequestError(f"the embedding is {list(vectors.shape)}, but {self.config.name} reads "
                               f"{width}-d report embeddings")
        rows = vectors.reshape(-1, width)
        if not torch.isfinite(rows[0]).all() or not rows[0].any():
            raise RequestError("the embedding's first row is zero or not finite")
        return unit_cls(rows[:1])[None]

    # -- generation -----------------------------------------------------------------------------------------

    def stream(self, request: GenerationRequest | GenerationPlan, cancel: CancelFlag | None = None) -> Iterator[Block]:
        """Yield decoded blocks in order as soon as each is ready. Stops early (no error) when cancelled."""
        plan = request if isinstance(request, GenerationPlan) else self.plan(request)
        req = plan.request
        block_len = self.config.denoiser.block_slices
        expected = math.ceil((req.slices or self.config.typical_slices) / block_len)
        geometry = Geometry.centred(self.config.geometry.spacing, (1, self.autoencoder.config.image_size,
                                                                    self.autoencoder.config.image_size))
        provenance = Provenance(
            report=plan.report_text, prompt=plan.prompt, seed=req.seed, steps=req.steps, sampler=req.sampler,
            shift=req.shift, guidance=req.guidance, model=self.model_id, model_sha256=self.weights_sha256,
            ctflow_version=__version__, device=str(self.device), slices_requested=req.slices, block_slices=block_len,
        )
        stopped = threading.Event()  # set when the consumer stops iterating: ends a decode-ahead worker too
        is_cancelled = (lambda: stopped.is_set() or cancel.is_set()) if cancel is not None else stopped.is_set
        latents = self._latents(plan, is_cancelled)
        if self.decode_ahead:
            latents = _run_ahead(latents, stopped)
        started = block_start = time.perf_counter()
        made = index = 0
        try:
            for clean, last in latents:
                hu = self._decode(clean)
                real = len(hu) if req.slices or self.released_mode else real_slices(hu)
                if real < len(hu):  # the decoder draws an end marker plainly where the latent test may miss it
                    hu, last = hu[:real], True
                    if not real:
                        return  # the block starts with the end marker: the block before was the last
                now = time.perf_counter()
                made += hu.shape[0]
                index += 1
                expected = index if last else max(expected, index + 1)
                yield Block(
                    index=index - 1, start=made - hu.shape[0], stop=made, hu=hu, geometry=geometry,
                    provenance=provenance, blocks_done=index, blocks_expected=expected, elapsed_s=now - started,
                    block_s=now - block_start, eta_s=(now - started) / index * (expected - index),
                )
                if last or is_cancelled():
                    return
                block_start = time.perf_counter()
        except torch.OutOfMemoryError as exc:
            raise DeviceError(
                f"out of {self.device.type} memory while generating block {index + 1}; "
                "close other GPU programs or use --device cpu"
            ) from exc
        finally:
            stopped.set()
            latents.close()  # ends a decode-ahead worker before returning

    def generate(
        self, request: GenerationRequest | GenerationPlan, cancel: CancelFlag | None = None,
        on_block: Callable[[Block], None] | None = None,
    ) -> Volume:
        """Run the stream to the end and return the volume; cancelled runs return what was made, marked partial."""
        blocks = []
        for block in self.stream(request, cancel):
            blocks.append(block)
            if on_block is not None:
                on_block(block)
        cancelled = cancel is not None and cancel.is_set()
        if not blocks:
            raise CTFlowError("generation was cancelled before the first block was made" if cancelled else
                              "the model ended the volume before its first slice")
        provenance = dataclasses.replace(blocks[0].provenance, partial=cancelled)
        return Volume(np.concatenate([b.hu for b in blocks]), blocks[0].geometry, provenance)

    def compile(self, **options) -> "CTFlowPipeline":
        """torch.compile the denoiser (every block has the same shape, so it compiles once); the first block is slow."""
        self.denoiser = torch.compile(self.denoiser, **options)
        return self

    def info(self) -> dict[str, object]:
        """Model card facts: name, sizes, parameter counts, device."""
        return {
            "model": self.model_id,
            "weights_sha256": self.weights_sha256,
            "ctflow_version": __version__,
            "device": str(self.device),
            "denoiser_parameters": parameter_count(self.denoiser),
            "autoencoder_parameters": parameter_count(self.autoencoder.vae),
            "text_encoder": self.text_encoder.name,
            "text_encoder_parameters": parameter_count(self.text_encoder.model),
            "slice_size": self.autoencoder.config.image_size,
            "spacing_mm": list(self.config.geometry.spacing),
            "block_slices": self.config.denoiser.block_slices,
            "sampling": dataclasses.asdict(self.config.sampling),
            "description": self.config.description,
        }

    # -- internals ------------------------------------------------------------------------------------------

    @property
    def released_mode(self) -> bool:
        return self.config.sampling.mode == "released"

    def _end_markers(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The start block's slice latent and the white end-marker latent, each [C, h, w].

        The released generator draws both as VAE posterior samples (from the request's seed here); ours uses modes.
        """
        if not self.released_mode:
            return self.autoencoder.constant_latent(START_HU), self.autoencoder.constant_latent(END_HU)
        generator = torch.Generator("cpu").manual_seed(seed + MARKER_SEED_OFFSET)
        return (self.autoencoder.constant_latent(START_HU, generator),
                self.autoencoder.constant_latent(END_HU, generator))

    def _latents(self, plan: GenerationPlan, is_cancelled: Callable[[], bool]) -> Iterator[tuple[torch.Tensor, bool]]:
        """The volume's clean latents as consecutive pieces (latents [C, n, h, w], last), in the model's mode."""
        markers = self._end_markers(plan.request.seed)
        latents = self._latent_blocks(plan, markers, is_cancelled)
        if self.released_mode and not plan.request.slices:
            latents = _hold_back_white_tail(latents, markers[1], self.config.end_tolerance, self.config.end_fraction)
        return latents

    def _latent_blocks(
        self, plan: GenerationPlan, markers: tuple[torch.Tensor, torch.Tensor], is_cancelled: Callable[[], bool],
    ) -> Iterator[tuple[torch.Tensor, bool]]:
        """Sample block after block, each conditioned on the one before: yields (clean latents [C, kept, h, w], last).
        markers: the start and white latents [C, h, w] (_end_markers).

        Sampling only, no decoding, so it can run one block ahead of the decoder (decode_ahead).
        """
        req = plan.request
        block_len = self.config.denoiser.block_slices
        target = req.slices or self.config.max_slices
        generator = torch.Generator("cpu").manual_seed(req.seed)  # CPU noise: the same seed gives the same noise anywhere
        start, white = markers
        previous = start.to(self.device)[:, None].expand(-1, block_len, -1, -1)[None]  # [1, C, T, h, w]
        white = white.to(self.device)
        made = 0
        while made < target:
            noise = self._block_noise(previous.shape, generator)
            with torch.no_grad():  # per thread: the decode-ahead worker needs its own
                try:
                    clean = sample(self._velocity(previous, plan, made), noise, req.steps, req.sampler, req.shift, is_cancelled)
                except Cancelled:
                    return
                end = None if req.slices else self._end_frame(clean[0], white)
            keep = min(block_len, target - made, block_len if end is None else end)
            if not keep:
                return  # the new block starts with the end marker: the previous block was the last
            made += keep
            last = end is not None or made >= target
            yield clean[0, :, :keep], last
            if last:
                return
            previous = clean

    def _block_noise(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        """A block's starting noise, drawn on the CPU: the same seed gives the same noise on any device."""
        return torch.randn(shape, generator=generator).to(self.device)

    def _velocity(self, previous: torch.Tensor, plan: GenerationPlan, first_slice: int):
        """The velocity field for one block; its conditioning (previous block, text, position) is computed once here."""
        batch = plan.text.shape[0]  # 2 with guidance: [conditional; unconditional]
        cond = self.denoiser.prepare(previous.expand(batch, -1, -1, -1, -1), plan.text, plan.text_mask,
                                     torch.tensor(float(first_slice)))

        def model(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.denoiser(z, t.expand(z.shape[0]), cond)

        return model if batch == 1 else guided(model, plan.request.guidance)

    def _end_frame(self, block: torch.Tensor, white: torch.Tensor) -> int | None:
        """Where block [C, T, h, w] ends the volume, or None: our rule cuts at its first white frame; the released
        rule ends the volume after the block when its first frame is white (the block is kept whole)."""
        frames = torch.nonzero(white_frames(block, white, self.config.end_tolerance, self.config.end_fraction))
        if self.released_mode:
            return block.shape[1] if len(frames) and frames[0] == 0 else None
        return int(frames[0]) if len(frames) else None

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        hu = self.autoencoder.decode(latents.permute(1, 0, 2, 3))  # [T, h, w] latents -> [T, H, W] HU
        if not torch.isfinite(hu).all():  # would be cast to arbitrary integers, a volume that looks valid
            raise CTFlowError("the model produced non-finite values (NaN or inf): its weights or the sampling "
                              "options are broken; nothing was written")
        return hu.round().clamp(-32768, 32767).to(torch.int16).cpu().numpy()


def white_frames(block: torch.Tensor, white: torch.Tensor, tolerance: float, fraction: float) -> torch.Tensor:
    """[T] bool: the frames of block [C, T, h, w] whose latents lie within `tolerance` of the white marker white
    [C, h, w] for more than `fraction` of their elements (the released code's test, strict on both counts)."""
    close = ((block - white[:, None]).abs() < tolerance).float().mean(dim=(0, 2, 3))  # [T]
    return close > fraction


def _hold_back_white_tail(
    latents: Iterator[tuple[torch.Tensor, bool]], white: torch.Tensor, tolerance: float, fraction: float,
) -> Iterator[tuple[torch.Tensor, bool]]:
    """The released rule trims white frames off the end of the volume: hold back each block's trailing white run
    until a later frame shows it is not the end (then it goes out in front of that block); drop it at the end."""
    tail = None  # [C, n, h, w] white frames held back
    try:
        for block, last in latents:
            if tail is not None:
                block = torch.cat([tail, block], dim=1)
            is_white = white_frames(block, white.to(block.device), tolerance, fraction).tolist()
            content = len(is_white)
            while content and is_white[content - 1]:
                content -= 1
            tail = block[:, content:]
            if content:
                yield block[:, :content], last
    finally:
        latents.close()


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
