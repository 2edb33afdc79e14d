"""The published CTFlow checkpoint (github WongJiayi/CTFlow, Hugging Face EnyaWoooo/CTFlow): read its diffusers-style
folder into this project's STDiT (variant "released", which reproduces the original forward pass).

A released folder holds config.json (`_class_name` DiffuserSTDiT, the model's sizes, EMA bookkeeping keys) and
diffusion_pytorch_model.safetensors (keys `model.*`; the 32-channel patch conv sees [noisy; previous] channels).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .config import DenoiserConfig
from .denoiser import STDiT, sincos_1d, sincos_2d
from .errors import ModelError

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
_BUFFERS = ("model.pos_embed", "model.pos_embed_temporal", "model.y_embedding", "model.y_embedder.y_embedding")


def released_denoiser_config(folder: Path) -> DenoiserConfig:
    """Sizes from a released config.json; refuses another model class and options the original code would not run."""
    path = Path(folder) / RELEASED_CONFIG
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelError(f"{folder} is not a released CTFlow denoiser folder: it has no {RELEASED_CONFIG}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from exc
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
        return DenoiserConfig(
            latent_channels=out_channels, hidden_size=int(data["hidden_size"]), depth=int(data["depth"]),
            num_heads=int(data["num_heads"]), patch_size=tuple(int(p) for p in data["patch_size"]),
            mlp_ratio=float(data["mlp_ratio"]), text_dim=int(data["caption_channels"]), block_slices=int(slices),
            latent_size=int(height), variant="released",
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path} is malformed: {exc!r}") from exc


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
                converted["x_embed.weight"], converted["previous_embed.weight"] = (half.contiguous() for half in tensor.chunk(2, dim=1))
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
    pt, ph, pw = config.patch_size
    grid = config.latent_size // ph, config.latent_size // pw
    expected = {
        "model.pos_embed": sincos_2d(*grid, config.hidden_size, columns_first=True),
        "model.pos_embed_temporal": sincos_1d(config.block_slices // pt, config.hidden_size),
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
    missing, unexpected = model.load_state_dict(load_released_state(folder, config), strict=False, assign=True)
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
    pt, ph, pw = config.patch_size
    grid = config.latent_size // ph, config.latent_size // pw
    state["model.pos_embed"] = sincos_2d(*grid, config.hidden_size, columns_first=True)[None].clone()
    state["model.pos_embed_temporal"] = sincos_1d(config.block_slices // pt, config.hidden_size)[None].clone()
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
