"""Model folders: config.json + model.safetensors (+ vae/, optional text encoder) + checksums.sha256.

A folder is found locally or fetched from a model hub (cached, revision-pinned). Every file listed in
checksums.sha256 is verified before anything is loaded, and weights load from safetensors only, so a
downloaded model can never run code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from .config import DENOISER_PRESETS, AutoencoderConfig, ModelConfig, TextConfig
from .errors import CorruptModelError, ModelError
from .io import atomic_folder

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
VAE_FOLDER = "vae"
CHECKSUMS = "checksums.sha256"
CARD = "README.md"
MINILM_DIM = 384  # the default text encoder's width
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


BUNDLED_MODEL = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "ctflow-demo"


def default_model() -> Path:
    """$CTFLOW_MODEL if set, else the demo model bundled in the repository's Resources/Models/."""
    if os.environ.get("CTFLOW_MODEL"):
        return Path(os.environ["CTFLOW_MODEL"])
    if (BUNDLED_MODEL / CONFIG).is_file():
        return BUNDLED_MODEL
    raise ModelError(
        f"no trained model is bundled at {BUNDLED_MODEL} (an incomplete checkout or install?); "
        "pass --model FOLDER_OR_HUB_ID or set CTFLOW_MODEL"
    )


def resolve_model(model: str | os.PathLike, revision: str | None = None, local_files_only: bool | None = None) -> Path:
    """A local model folder for `model`: a folder path, or a hub id "org/name" (optionally pinned by revision)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if isinstance(model, str) and _HUB_ID.match(model) and not path.exists():
        return resolve_hub(model, revision, local_files_only)
    raise ModelError(f"model {str(model)!r} not found: give a model folder (with {CONFIG}) or a hub id like org/name")


HUB_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.sha256", "*.md", "*.model")  # never pickles or code


def resolve_hub(
    repo_id: str, revision: str | None, local_files_only: bool | None, patterns: tuple[str, ...] = HUB_PATTERNS,
) -> Path:
    """Download (or find in the local cache) a hub snapshot; offline (HF_HUB_OFFLINE=1) only the cache is used."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, local_files_only=local_files_only,
                allow_patterns=list(patterns),
            )
        )
    except LocalEntryNotFoundError as exc:
        raise ModelError(
            f"{repo_id}{'@' + revision if revision else ''} is not in the local model cache and the hub cannot be "
            "reached (offline); download it once on a connected machine or give a local folder"
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelError(f"cannot fetch {repo_id} from the model hub: {exc}") from exc


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(folder: Path) -> Path:
    """List every file of a model folder with its sha256 in checksums.sha256 (sha256sum format)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}" for p in files]
    (folder / CHECKSUMS).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / CHECKSUMS


def verify_checksums(folder: Path) -> dict[str, str]:
    """Check every file in checksums.sha256 (sha256sum format); returns {relative path: sha256}."""
    manifest = folder / CHECKSUMS
    if not manifest.is_file():
        raise CorruptModelError(f"{folder} has no {CHECKSUMS}; refusing to load unverified weights")
    expected = {}
    for line in manifest.read_text().splitlines():
        if line.strip():
            digest, _, name = line.partition("  ")
            expected[name.strip()] = digest.strip()
    for name, digest in expected.items():
        file = folder / name
        if not file.is_file():
            raise CorruptModelError(f"{file} is listed in {CHECKSUMS} but missing; re-download the model")
        if sha256_file(file) != digest:
            raise CorruptModelError(f"{file} does not match its checksum: the download is damaged or was modified")
    if WEIGHTS not in expected:
        raise CorruptModelError(f"{CHECKSUMS} in {folder} does not cover {WEIGHTS}")
    return expected


def read_config(folder: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(json.loads((folder / CONFIG).read_text()))
    except FileNotFoundError as exc:
        raise ModelError(f"{folder} is not a CTFlow model folder: it has no {CONFIG}") from exc
    except json.JSONDecodeError as exc:
        raise CorruptModelError(f"{folder / CONFIG} is not valid JSON: {exc}") from exc


def load_denoiser(folder: Path, config: ModelConfig):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .denoiser import STDiT

    model = STDiT(config.denoiser)
    try:
        state = load_file(folder / WEIGHTS)
    except (SafetensorError, OSError) as exc:
        raise CorruptModelError(f"cannot read {folder / WEIGHTS}: {exc}") from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CorruptModelError(
            f"{folder / WEIGHTS} does not fit the denoiser in {CONFIG} "
            f"(missing {len(missing)} tensors, unexpected {len(unexpected)}), e.g. {(missing or unexpected)[:3]}"
        )
    return model.eval().requires_grad_(False)


def load_vae(folder: Path):
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(folder / VAE_FOLDER, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise CorruptModelError(f"cannot load the slice autoencoder from {folder / VAE_FOLDER}: {exc}") from exc


def save_model(
    folder: str | os.PathLike, config: ModelConfig, denoiser, vae, card: str = "", overwrite: bool = False,
    subfolders: dict[str, Path] | None = None,
) -> Path:
    """Write a complete model folder atomically (built beside the target, then renamed into place).

    subfolders: {name: folder} copied in and covered by the checksums, e.g. a text encoder (its data files only).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise ModelError(f"{folder} already exists; choose another folder or allow overwriting")

    def fill(staging: Path) -> None:
        (staging / CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in denoiser.state_dict().items()}
        save_file(state, staging / WEIGHTS, metadata={"format": "pt", "ctflow_config": CONFIG})
        vae.save_pretrained(staging / VAE_FOLDER, safe_serialization=True)
        for name, source in (subfolders or {}).items():
            shutil.copytree(source, staging / name, ignore=_not_data_files)
        (staging / CARD).write_text(card or default_card(config))
        write_checksums(staging)

    return atomic_folder(folder, fill)


def _not_data_files(folder: str, names: list[str]) -> list[str]:
    """shutil.copytree filter: keep JSON, safetensors and text files (configs, weights, vocabularies)."""
    return [n for n in names if not (Path(folder, n).is_dir() or n.endswith((".json", ".safetensors", ".txt")))]


def default_card(config: ModelConfig) -> str:
    return (
        f"# {config.name}\n\n{config.description or 'A CTFlow text-to-CT model.'}\n\n"
        "Generates SYNTHETIC chest CT volumes from report text. Not a medical device; not for diagnosis.\n"
    )


def create_random_model(
    folder: str | os.PathLike, preset: str = "tiny", vae_preset: str | None = None, image_size: int | None = None,
    seed: int = 0, overwrite: bool = False,
) -> Path:
    """A model folder with random weights of a named size: for tests, benchmarks and as a training start point."""
    from diffusers import AutoencoderKL

    from .autoencoder import VAE_PRESETS
    from .denoiser import STDiT

    if preset not in DENOISER_PRESETS:
        raise ModelError(f"unknown preset {preset!r}: choose one of {', '.join(DENOISER_PRESETS)}")
    vae_preset = vae_preset or {"tiny": "tiny", "cpu": "cpu"}.get(preset, "flux")
    denoiser_config = DENOISER_PRESETS[preset]
    vae_config = VAE_PRESETS[vae_preset]
    downsample = 2 ** (len(vae_config["block_out_channels"]) - 1)
    image_size = image_size or denoiser_config.latent_size * downsample
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config)
    config = ModelConfig(
        name=f"random-{preset}",
        denoiser=dataclasses.replace(denoiser_config, latent_size=image_size // downsample, text_dim=MINILM_DIM),
        autoencoder=AutoencoderConfig(image_size=image_size),
        text=TextConfig(),
        description=f"Random weights ({preset} denoiser, {vae_preset} VAE): produces noise-like volumes, not anatomy.",
    )
    denoiser = STDiT(config.denoiser)
    with torch.no_grad():  # random, not zero, output layers: the volume then depends on seed and text
        for parameter in denoiser.parameters():
            if parameter.dim() > 1 and not parameter.abs().sum():
                parameter.normal_(0, 0.02)
    return save_model(folder, config, denoiser, vae, overwrite=overwrite)
