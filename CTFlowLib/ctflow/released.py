"""The published CTFlow checkpoint (github WongJiayi/CTFlow, Hugging Face EnyaWoooo/CTFlow): read its diffusers-style
folder into this project's STDiT (variant "released", which reproduces the original forward pass).

A released folder holds config.json (`_class_name` DiffuserSTDiT, the model's sizes, EMA bookkeeping keys) and
diffusion_pytorch_model.safetensors (keys `model.*`; the 32-channel patch conv sees [noisy; previous] channels).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from .config import DenoiserConfig, from_json
from .denoiser import STDiT, parameter_count, sincos_1d, sincos_2d
from .errors import ModelError
from .io import read_text_file

RELEASED_CLASS = "DiffuserSTDiT"
RELEASED_CONFIG = "config.json"
RELEASED_WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
POSITION_TOLERANCE = 1e-6  # the stored position codes equal the recomputed ones (float64 sin/cos cast to float32)

# released key (after "model.") -> this project's key; {i} is a block index.
_BLOCK_KEYS = {
    "attn.qkv": "spatial.qkv", "attn.proj": "spatial.proj", "attn_temp.qkv": "temporal.qkv",
    "attn_temp.proj": "temporal.proj", "cross_attn.q_linear": "cross.q", "cross_attn.kv_linear": "cross.kv",
    "cross_attn.proj": "cross.proj", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2",
}
_TOP_KEYS = {
    "t_embedder.mlp.0": "t_embed.mlp.0", "t_embedder.mlp.2": "t_embed.mlp.2", "t_block.1": "t_block.1",
    "y_embedder.y_proj.fc1": "text_embed.0", "y_embedder.y_proj.fc2": "text_embed.2", "final_layer.linear": "final",
}
_BUFFERS = ("model.pos_embed", "model.pos_embed_temporal", "model.y_embedder.y_embedding")  # checked or unused


def released_denoiser_config(folder: Path) -> DenoiserConfig:
    """Sizes from a released config.json; refuses another model class and options the original code would not run."""
    path = Path(folder) / RELEASED_CONFIG
    if not path.exists():
        raise ModelError(f"{folder} is not a released CTFlow denoiser folder: it has no {RELEASED_CONFIG}")
    try:
        data = json.loads(read_text_file(path, ModelError))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ModelError(f"{path} nests too deeply to be a model config") from exc
    if not isinstance(data, dict) or data.get("_class_name") != RELEASED_CLASS:
        found = data.get("_class_name") if isinstance(data, dict) else None
        raise ModelError(f"{path} describes a {found or 'model without _class_name'}, not a released CTFlow "
                         f"denoiser ({RELEASED_CLASS})")
    try:
        slices, height, width = data["input_size"]
        channels, out_channels = int(data["in_channels"]), int(data["out_channels"])
        if height != width or channels != 2 * out_channels:
            raise ModelError(f"{path}: input_size {data['input_size']} / in_channels {channels} is not a square "
                             "latent block with its previous block as extra channels")
        if float(data.get("space_scale", 1.0)) != 1.0 or float(data.get("time_scale", 1.0)) != 1.0:
            raise ModelError(f"{path}: space_scale/time_scale other than 1 are not supported")
        sizes = {
            "latent_channels": out_channels, "hidden_size": data["hidden_size"], "depth": data["depth"],
            "num_heads": data["num_heads"], "patch_size": data["patch_size"], "mlp_ratio": data["mlp_ratio"],
            "text_dim": data["caption_channels"], "block_slices": slices, "latent_size": height, "variant": "released",
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path} is malformed: {exc!r}") from exc
    return from_json(DenoiserConfig, sizes, "denoiser.", str(path))  # the ranges a ctflow config.json must keep


def released_weights_file(folder: Path) -> Path:
    """The folder's safetensors file; a pickle checkpoint is refused, because loading one can run code."""
    folder = Path(folder)
    if folder.is_file():
        if folder.suffix in PICKLE_SUFFIXES:
            raise ModelError(f"{folder} is a pickle checkpoint; ctflow loads only safetensors, which cannot run code")
        raise ModelError(f"give the released denoiser's folder (with {RELEASED_CONFIG}), not the file {folder}")
    weights = folder / RELEASED_WEIGHTS
    if weights.is_file():
        return weights
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(f"{folder} holds only pickle weights ({pickles[0]}); ctflow loads only safetensors "
                         f"({RELEASED_WEIGHTS}), which cannot run code")
    raise ModelError(f"{folder} has no {RELEASED_WEIGHTS}")


def convert_released_state(state: dict[str, torch.Tensor], config: DenoiserConfig) -> dict[str, torch.Tensor]:
    """Released `model.*` tensors -> this project's STDiT keys; checks the stored position codes on the way."""
    check_position_codes(state, config)
    converted = {}
    for key, tensor in state.items():
        if key in _BUFFERS:
            continue
        name = key.removeprefix("model.")
        if name.startswith("x_embedder.proj."):
            if name.endswith("weight"):  # [D, 2C, pt, ph, pw]: noisy channels first, then the previous block
                noisy, previous = tensor.chunk(2, dim=1)
                converted["x_embed.weight"] = noisy.contiguous()
                converted["previous_embed.weight"] = previous.contiguous()
            else:
                converted["x_embed.bias"] = tensor
            continue
        converted[_project_key(name) or key] = tensor.contiguous()  # an unknown key stays, and is reported
    return converted


def _project_key(name: str) -> str | None:
    """A released key without its "model." prefix -> this project's key (None if it has no counterpart)."""
    if name == "final_layer.scale_shift_table":
        return "final_table"
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 3:  # blocks.{i}.{module}.{weight|bias}
        inner = _BLOCK_KEYS.get(".".join(parts[2:-1]))
        return f"blocks.{parts[1]}.{inner}.{parts[-1]}" if inner else None
    if parts[0] == "blocks":  # blocks.{i}.scale_shift_table
        return name
    stem, _, leaf = name.rpartition(".")
    return f"{_TOP_KEYS[stem]}.{leaf}" if stem in _TOP_KEYS else None


def check_position_codes(state: dict[str, torch.Tensor], config: DenoiserConfig) -> None:
    """The stored sin/cos codes must be the ones the variant recomputes, or the file is not what it claims to be."""
    expected = {
        "model.pos_embed": sincos_2d(*config.patch_grid, config.hidden_size, columns_first=True),
        "model.pos_embed_temporal": sincos_1d(config.block_slices // config.patch_size[0], config.hidden_size),
    }
    for key, code in expected.items():
        if key in state and (state[key].shape[1:] != code.shape or
                             (state[key][0].float() - code).abs().max() > POSITION_TOLERANCE):
            raise ModelError(f"the stored {key.removeprefix('model.')} is not the published code's position code: "
                             "this is not a released CTFlow checkpoint of the configured size")


def load_released_state(folder: Path, config: DenoiserConfig) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = released_weights_file(folder)
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"cannot read {weights}: {exc}") from exc
    return convert_released_state(state, config)


def build_released_stdit(folder: str | Path, dtype: torch.dtype = torch.float32) -> STDiT:
    """The released folder as this project's STDiT (variant "released"), weights strictly checked."""
    folder = Path(folder)
    if not folder.exists():
        raise ModelError(f"released denoiser folder {folder} does not exist")
    weights_file = released_weights_file(folder)  # refuses pickles before reading anything else
    config = released_denoiser_config(folder)
    with torch.device("meta"):
        model = STDiT(config)
    try:
        missing, unexpected = model.load_state_dict(load_released_state(folder, config), strict=False, assign=True)
    except RuntimeError as exc:  # a tensor of another shape than the config gives
        reason = str(exc).splitlines()[-1].strip()
        raise ModelError(f"{weights_file} does not fit its {RELEASED_CONFIG}: {reason}") from exc
    if missing or unexpected:
        raise ModelError(f"{weights_file} does not fit its {RELEASED_CONFIG} (missing {len(missing)} tensors, "
                         f"unexpected {len(unexpected)}), e.g. {(missing or unexpected)[:3]}")
    return model.to(dtype).eval().requires_grad_(False)


class ReleasedDenoiser(nn.Module):
    """Called like the original: model(x, t, text, cond) -> velocity [B, C, T, H, W].

    x: noisy latent block [B, C, T, H, W]; t: flow time in [0, 1] (1 = noise), 0-dim or [B]; text: [B, M, text_dim]
    (M = 1 for the released checkpoint); cond: the previous clean block, shaped like x.
    """

    def __init__(self, stdit: STDiT) -> None:
        super().__init__()
        self.stdit = stdit

    @property
    def config(self) -> DenoiserConfig:
        return self.stdit.config

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, text: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if text.dim() != 3 or text.shape[-1] != self.config.text_dim:
            raise ModelError(f"text embedding must be [B, M, {self.config.text_dim}], not {list(text.shape)}")
        if cond.shape != x.shape:
            raise ModelError(f"the previous block {list(cond.shape)} must be shaped like x {list(x.shape)}")
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
        mask = torch.ones(text.shape[:2], dtype=torch.bool, device=x.device)
        return self.stdit(x, t, self.stdit.prepare(cond, text, mask))


def load_released_denoiser(folder: str | Path, dtype: torch.dtype = torch.float32) -> ReleasedDenoiser:
    """A released CTFlow denoiser folder (e.g. checkpoint-680000/denoiser_ema), any size, as a torch module."""
    return ReleasedDenoiser(build_released_stdit(folder, dtype))


def save_released_layout(model: STDiT, folder: str | Path) -> Path:
    """Write a variant-"released" STDiT in the published folder layout (config.json + safetensors, `model.*` keys):
    what benchmarks and tests load in place of the real download."""
    config = model.config
    if config.variant != "released":
        raise ModelError("only a denoiser of variant 'released' has the published layout")
    blocks = {ours: theirs for theirs, ours in _BLOCK_KEYS.items()}
    top = {ours: theirs for theirs, ours in _TOP_KEYS.items()}
    state = {}
    for name, tensor in model.state_dict().items():
        stem, _, leaf = name.rpartition(".")
        parts = stem.split(".")
        if name == "final_table":
            key = "final_layer.scale_shift_table"
        elif parts[0] == "blocks" and len(parts) > 2:
            key = f"blocks.{parts[1]}.{blocks['.'.join(parts[2:])]}.{leaf}"
        elif parts[0] == "blocks" or name.startswith(("x_embed.", "previous_embed.")):
            key = name
        else:
            key = f"{top[stem]}.{leaf}"
        state[f"model.{key}"] = tensor.detach().float().cpu().contiguous()
    state["model.x_embedder.proj.weight"] = torch.cat([state.pop("model.x_embed.weight"),
                                                       state.pop("model.previous_embed.weight")], dim=1)
    state["model.x_embedder.proj.bias"] = state.pop("model.x_embed.bias")
    state["model.pos_embed"] = sincos_2d(*config.patch_grid, config.hidden_size, columns_first=True)[None].clone()
    state["model.pos_embed_temporal"] = sincos_1d(config.block_slices // config.patch_size[0],
                                                  config.hidden_size)[None].clone()
    state["model.y_embedder.y_embedding"] = torch.zeros(1, config.text_dim)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(state, folder / RELEASED_WEIGHTS, metadata={"format": "pt"})
    (folder / RELEASED_CONFIG).write_text(json.dumps({
        "_class_name": RELEASED_CLASS, "input_size": [config.block_slices, config.latent_size, config.latent_size],
        "in_channels": 2 * config.latent_channels, "out_channels": config.latent_channels,
        "patch_size": list(config.patch_size), "hidden_size": config.hidden_size, "depth": config.depth,
        "num_heads": config.num_heads, "mlp_ratio": config.mlp_ratio, "class_dropout_prob": 0.0,
        "caption_channels": config.text_dim, "model_max_length": 1, "space_scale": 1.0, "time_scale": 1.0,
    }, indent=2) + "\n")
    return folder


# -- import: a released checkpoint + VAE + text encoder -> a ctflow model folder ------------------------------

SIZE_NAMES = {384: "S", 768: "B", 1024: "L"}  # hidden size -> the paper's model name
# Inferred, not documented (docs/released_model.md): CT-RATE as CT-CLIP preprocesses it (0.75 x 0.75 x 1.5 mm,
# 480 x 480 slices) resized to 256 x 256.
RELEASED_SPACING = (480 * 0.75 / 256, 480 * 0.75 / 256, 1.5)


def resolve_source(spec: str, what: str, patterns: tuple[str, ...] = ("*.json", "*.safetensors")) -> tuple[Path, str]:
    """A folder for FOLDER or hub id "org/name[/subfolder][@revision]", and where it came from (with the commit).
    From the hub only files matching `patterns` are fetched: never pickles or code."""
    from .hub import resolve_hub

    path = Path(spec).expanduser()
    if path.exists():
        return path, str(path.resolve())
    if spec.startswith(("/", ".", "~")) or path.is_absolute() or path.drive:  # "D:/models/vae" on Windows
        raise ModelError(f"{what} folder {spec} does not exist")
    name, _, revision = spec.partition("@")
    parts = name.strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise ModelError(f"{what} {spec!r} is neither a folder nor a hub id org/name[/subfolder][@revision]")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    root = resolve_hub(repo, revision or None, None, tuple(f"{sub}/{p}" for p in patterns) if sub else patterns)
    folder = root / sub if sub else root
    if not folder.is_dir():
        raise ModelError(f"{what}: the hub repo {repo} has no subfolder {sub!r}")
    return folder, f"{repo}{'/' + sub if sub else ''} at commit {root.name}"


def import_released(
    denoiser: str, vae: str, text_encoder: str | Path, out: str | Path, overwrite: bool = False,
    spacing: tuple[float, float, float] = RELEASED_SPACING, pixel_range: tuple[float, float] = (0.0, 1.0),
) -> Path:
    """Build a ctflow model folder that runs the released checkpoint exactly as the original code does."""
    from diffusers import AutoencoderKL

    from .config import AutoencoderConfig, GeometryConfig, ModelConfig, SamplingConfig, TextConfig, option_value
    from .checksums import sha256_file
    from .model_folder import save_model

    out = Path(out)
    if out.exists() and not overwrite:
        raise ModelError(f"{out} already exists; choose another folder or pass --overwrite")
    spacing = option_value(tuple(spacing), tuple[float, float, float], "geometry.spacing", "--spacing")
    pixel_range = option_value(tuple(pixel_range), tuple[float, float], "autoencoder.pixel_range", "--pixel-range")
    intensities = AutoencoderConfig(pixel_range=pixel_range)  # checked before any download
    text_folder = Path(text_encoder)
    denoiser_folder, denoiser_source = resolve_source(denoiser, "--denoiser")
    config = released_denoiser_config(denoiser_folder)  # refuses another class before reading 2 GB of weights
    released_weights_file(denoiser_folder)
    width = _text_width(text_folder)
    if width != config.text_dim:
        raise ModelError(f"the text encoder in {text_folder} gives {width}-d embeddings, but the denoiser reads "
                         f"{config.text_dim}-d ones (CT-CLIP's CXR-BERT is 768-d)")
    vae_folder, vae_source = resolve_source(vae, "--vae")
    try:
        autoencoder = AutoencoderKL.from_pretrained(vae_folder, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a diffusers AutoencoderKL (safetensors) from {vae_folder}: {exc}") from exc
    if autoencoder.config.latent_channels != config.latent_channels:
        raise ModelError(f"the VAE in {vae_folder} has {autoencoder.config.latent_channels} latent channels; the "
                         f"denoiser needs {config.latent_channels} (the FLUX.1 VAE)")
    stdit = build_released_stdit(denoiser_folder)
    size = SIZE_NAMES.get(config.hidden_size, f"D{config.hidden_size}")
    downsample = 2 ** (len(autoencoder.config.block_out_channels) - 1)
    model_config = ModelConfig(
        name=f"ctflow-released-{size}", denoiser=config,
        autoencoder=dataclasses.replace(intensities, image_size=config.latent_size * downsample),
        text=TextConfig(source="folder:text_encoder", mode="cls", max_tokens=512),
        sampling=SamplingConfig(steps=200, method="euler", shift=1.0, mode="released", guidance_supported=False),
        geometry=GeometryConfig(spacing=tuple(spacing)), max_slices=20 * config.block_slices, typical_slices=201,
        end_fraction=0.9, end_tolerance=0.1,
        description=f"The published CTFlow-{size} checkpoint (Wang et al., ICCV 2025 workshop VLM3D), imported.",
    )
    card = released_card(model_config, denoiser_source, sha256_file(released_weights_file(denoiser_folder)),
                         vae_source, str(text_folder.resolve()), parameter_count(stdit))
    return save_model(out, model_config, stdit, autoencoder, card, overwrite, subfolders={"text_encoder": text_folder})


def _text_width(folder: Path) -> int:
    """The hidden size of a transformers text-encoder folder, which must hold safetensors weights."""
    if folder.is_dir() and not list(folder.glob("*.safetensors")):
        raise ModelError(f"--text-encoder {folder} holds no safetensors weights; make it with `ctflow convert-ct-clip`")
    try:
        return int(json.loads((folder / "config.json").read_text(encoding="utf-8"))["hidden_size"])
    except FileNotFoundError as exc:
        raise ModelError(f"--text-encoder {folder} is not a transformers model folder (no config.json); make one "
                         "with `ctflow convert-ct-clip`") from exc
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelError(f"{folder / 'config.json'} has no usable hidden_size: {exc!r}") from exc


def released_card(config, denoiser_source: str, denoiser_sha256: str, vae_source: str, text_source: str,
                  parameters: int) -> str:
    low, high = config.autoencoder.hu_window
    bottom, top = config.autoencoder.pixel_range
    spacing = " x ".join(f"{s:g}" for s in config.geometry.spacing)
    return f"""# {config.name}

The published CTFlow checkpoint (Wang, Reynaud, Erick, Kainz: "CTFlow: Video-Inspired Latent Flow Matching for
3D CT Synthesis", ICCV 2025 workshop VLM3D), imported by `ctflow import-released`. It generates SYNTHETIC chest CT
volumes from report text. Not a medical device; not for clinical use or diagnosis.

## Source
- Denoiser: {denoiser_source} (diffusion_pytorch_model.safetensors sha256 {denoiser_sha256}),
  {parameters:,} parameters, run with this project's STDiT in its "released" variant, which reproduces the original
  forward pass (checked against outputs of the original code in ctflow's tests).
- VAE: {vae_source} (the FLUX.1 VAE; FLUX.1-schnell's is Apache-2.0).
- Text encoder: {text_source}: CT-CLIP's fine-tuned CXR-BERT text tower, [CLS] output, L2-normalised, 768-d.

## Licence status
The original code (github WongJiayi/CTFlow) has no licence file and the checkpoint's licence is not stated in a
form ctflow could verify: ask the authors before any use beyond research. It was trained on CT-RATE
(CC BY-NC-SA 4.0), as was CT-CLIP: at most non-commercial use, share-alike.

## Documented vs inferred
- Documented (code): the forward pass, 200 Euler steps on linspace(1, 0, 201), blocks of {config.denoiser.block_slices}
  latent slices each conditioned on the previous block, start block = VAE encoding of an all-zero image, the stop
  test on the first slice of each new block against the encoded all-ones image, trailing white slices trimmed, at
  most {config.max_slices // config.denoiser.block_slices} blocks, no classifier-free guidance (trained without text
  dropout: ctflow refuses guidance other than 1 for this model).
- Inferred (not documented): the HU mapping HU {low:g}..{high:g} <-> VAE image {bottom:g}..{top:g}
  (autoencoder.hu_window and pixel_range in config.json). The original writes clamp(306 x image, 0, 255) PNGs; under
  the mapping HU -1000..1000 <-> 0..1 a PNG value p is HU 6.536 p - 1000, and ctflow keeps values above the PNG's
  +667 HU saturation;
  the voxel spacing {spacing} mm (CT-RATE as CT-CLIP preprocesses it, resized to
  {config.autoencoder.image_size} x {config.autoencoder.image_size}); which report text (findings and/or
  impressions) the training embeddings were made from.
- Differences: random draws (noise, the start/stop markers' posterior samples) come from the request's seed, not
  the global torch RNG, so a seed gives another volume than the original would; the volume is not padded to 201
  frames. docs/released_model.md says how to check the HU mapping against CT-RATE data.
"""
