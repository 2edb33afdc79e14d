"""Model folders, read and written: config.json + model.safetensors (+ vae/, optional text encoder) + checksums.sha256
+ README.md (the model card). Finding one is hub.py's job, trusting it checksums.py's; weights load from
safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .checksums import CHECKSUMS, sha256_file, verify_checksums, write_checksums
from .config import ModelConfig
from .devices import is_out_of_memory
from .errors import CorruptModelError, ModelError, first_line
from .io import atomic_folder, read_text_file, refuse_foreign_folder

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
VAE_FOLDER = "vae"
CARD = "README.md"


def verify_model_folder(folder: Path) -> dict[str, str]:
    """verify_checksums, with the config and the weights required to be covered; returns {path: sha256}."""
    return verify_checksums(folder, required=(CONFIG, WEIGHTS))


def model_sha256(checksums: dict[str, str]) -> str:
    """One SHA-256 for every file a model folder's checksums list (config, denoiser, autoencoder, a text encoder or
    its tuned layers) but the card, which only describes. Provenance records it, so two folders whose files differ
    never share it (the denoiser's weights alone would). A text encoder from a package or the hub is covered by its
    name in config.json, not by its weights: those are pinned by the package's version or the hub revision."""
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(checksums.items()) if name != CARD)
    return hashlib.sha256(lines.encode()).hexdigest()


def copy_model_files(folder: Path, checksums: dict[str, str], staging: Path) -> None:
    """Copy the files a model folder's checksums list (verify_model_folder's answer) into `staging`, each checked
    again as copied: nothing else the folder may hold, and nothing changed since it was verified."""
    for name, digest in checksums.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / name, staging / name)
        if sha256_file(staging / name) != digest:
            raise CorruptModelError(f"{folder / name} changed while it was copied; nothing is written")


def read_config(folder: Path) -> ModelConfig:
    """The folder's config.json, read before its checksums are (a command checks options against it first): so
    every value is checked, and the file is read only if it is a text file of sensible size."""
    path = folder / CONFIG
    if not path.exists():
        raise ModelError(f"{folder} is not a CTFlow model folder: it has no {CONFIG}")
    text = read_text_file(path, CorruptModelError, "; re-download the model")
    try:
        return ModelConfig.from_dict(json.loads(text))
    except json.JSONDecodeError as exc:
        raise CorruptModelError(f"{path} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise CorruptModelError(f"{folder / CONFIG} nests too deeply to be a model config") from exc


def load_denoiser(folder: Path, config: ModelConfig):
    """The denoiser with its weights, after checking every tensor's shape against the config without allocating:
    a config and weights that disagree (or a config asking for absurd sizes) end in one CorruptModelError."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from .denoiser import STDiT

    with torch.device("meta"):
        wanted = {name: tuple(tensor.shape) for name, tensor in STDiT(config.denoiser).state_dict().items()}
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as handle:
            found = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise CorruptModelError(f"cannot read {folder / WEIGHTS}: {exc}") from exc
    missing, unexpected = sorted(wanted.keys() - found.keys()), sorted(found.keys() - wanted.keys())
    if missing or unexpected:
        raise CorruptModelError(
            f"{folder / WEIGHTS} does not fit the denoiser in {CONFIG} "
            f"(missing {len(missing)} tensors, unexpected {len(unexpected)}), e.g. {(missing or unexpected)[:3]}"
        )
    for name, shape in wanted.items():
        if found[name] != shape:
            raise CorruptModelError(
                f"{folder / WEIGHTS} does not fit the denoiser in {CONFIG}: {name} is {list(found[name])}, "
                f"the config makes it {list(shape)}"
            )
    model = STDiT(config.denoiser)
    try:
        model.load_state_dict(load_file(folder / WEIGHTS))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CorruptModelError(f"cannot read {folder / WEIGHTS}: {str(exc).strip().splitlines()[-1]}") from exc
    return model.eval().requires_grad_(False)


def load_vae(folder: Path):
    """The slice autoencoder of a model folder."""
    return load_autoencoder_kl(folder / VAE_FOLDER)


def load_autoencoder_kl(vae_folder: Path):
    """A diffusers AutoencoderKL folder (a model folder's vae/, or a VAE training run's): safetensors only, never
    from a hub; a missing folder says so, where diffusers would advise an internet connection."""
    from diffusers import AutoencoderKL

    if not (vae_folder / CONFIG).is_file():
        raise CorruptModelError(f"cannot load the slice autoencoder from {vae_folder}: it holds no {CONFIG}")
    try:
        return AutoencoderKL.from_pretrained(vae_folder, use_safetensors=True, local_files_only=True)
    except Exception as exc:  # a damaged or hostile config fails anywhere inside diffusers
        if is_out_of_memory(exc):
            raise
        raise CorruptModelError(f"cannot load the slice autoencoder from {vae_folder}: {first_line(exc)}") from exc


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
    refuse_foreign_folder(folder, (CONFIG, CHECKSUMS), "a model folder", ModelError)

    def fill(staging: Path) -> None:
        (staging / CONFIG).write_text(config.to_json(), encoding="utf-8")
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in denoiser.state_dict().items()}
        save_file(state, staging / WEIGHTS, metadata={"format": "pt"})  # one key: safetensors orders keys anew each save
        vae.save_pretrained(staging / VAE_FOLDER, safe_serialization=True)
        _drop_source_path(staging / VAE_FOLDER / CONFIG)
        for name, source in (subfolders or {}).items():
            shutil.copytree(source, staging / name, ignore=_not_data_files)
        (staging / CARD).write_text(card or default_card(config), encoding="utf-8")
        write_checksums(staging)

    return atomic_folder(folder, fill, overwrite)


def _drop_source_path(config: Path) -> None:
    """diffusers records where a model was loaded from (`_name_or_path`): a path of the machine that exported it,
    which a published folder has no use for and should not disclose."""
    data = json.loads(config.read_text(encoding="utf-8"))
    if data.pop("_name_or_path", None) is not None:
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _not_data_files(folder: str, names: list[str]) -> list[str]:
    """shutil.copytree filter: keep JSON, safetensors and text files (configs, weights, vocabularies)."""
    return [n for n in names if not (Path(folder, n).is_dir() or n.endswith((".json", ".safetensors", ".txt")))]


def default_card(config: ModelConfig) -> str:
    return (
        f"# {config.name}\n\n{config.description or 'A CTFlow text-to-CT model.'}\n\n"
        "Generates SYNTHETIC chest CT volumes from report text. Not a medical device; not for diagnosis.\n"
    )
