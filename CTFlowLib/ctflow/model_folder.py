"""Model folders: config.json + model.safetensors (+ vae/, optional text encoder) + checksums.sha256.

A folder is found locally or fetched from a model hub (cached, revision-pinned). Every file in it must be listed
in checksums.sha256 and is verified before anything is loaded; code and pickle files are refused even when
listed, and weights load from safetensors only, so a downloaded model can never run code.
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
_MANIFEST_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")  # sha256sum's text and binary modes
# Files that are, or may hold, executable code or pickles: refused in a model folder even when listed.
CODE_SUFFIXES = frozenset({
    ".py", ".pyc", ".pyo", ".pyd", ".pyw", ".pyz", ".so", ".dylib", ".dll", ".exe", ".sh", ".bat", ".cmd", ".ps1",
    ".pkl", ".pickle", ".joblib", ".dill", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".h5", ".keras", ".pb",
    ".whl", ".egg", ".jar", ".ipynb",
})
# Written by file browsers, git and huggingface_hub's --local-dir downloads, never read by ctflow: tolerated unlisted.
TOOL_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", ".gitattributes"})
TOOL_FOLDERS = frozenset({".git", ".cache"})


PACKAGED_MODEL = Path(__file__).resolve().parent / "models" / "ctflow-demo"  # in a wheel: setup.py puts it there
BUNDLED_MODEL = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "ctflow-demo"  # in the repository


def default_model() -> Path:
    """$CTFLOW_MODEL if set, else the bundled demo model: inside an installed package, or in a source checkout."""
    if os.environ.get("CTFLOW_MODEL"):
        return Path(os.environ["CTFLOW_MODEL"])
    for folder in (PACKAGED_MODEL, BUNDLED_MODEL):
        if (folder / CONFIG).is_file():
            return folder
    raise ModelError(
        f"no trained model is bundled at {PACKAGED_MODEL} or {BUNDLED_MODEL} (an incomplete checkout or install?); "
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
    """Check that checksums.sha256 lists every file of the folder and that each matches; returns {path: sha256}."""
    expected = read_manifest(folder)
    listed = set(expected)
    unexpected = []
    for name in folder_files(folder):
        if Path(name).suffix.lower() in CODE_SUFFIXES:
            raise CorruptModelError(
                f"{folder / name} is a code or pickle file; a model folder holds only safetensors weights and "
                "JSON/text files, so it is refused"
            )
        parts = name.split("/")
        if name not in listed and parts[-1] not in TOOL_FILES and parts[0] not in TOOL_FOLDERS:
            unexpected.append(name)
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise CorruptModelError(
            f"{folder} holds files not listed in {CHECKSUMS}: {', '.join(unexpected[:3])}{more}; unverified files "
            "are refused: remove them, or get the model again from its publisher"
        )
    for name in (CONFIG, WEIGHTS):
        if name not in expected:
            raise CorruptModelError(f"{CHECKSUMS} in {folder} does not cover {name}")
    for name, digest in expected.items():
        file = folder / name
        if not file.is_file():
            raise CorruptModelError(f"{file} is listed in {CHECKSUMS} but missing; re-download the model")
        if sha256_file(file) != digest:
            raise CorruptModelError(f"{file} does not match its checksum: the download is damaged or was modified")
    return expected


def read_manifest(folder: Path) -> dict[str, str]:
    """{relative path: sha256} from checksums.sha256; a line that is not a plain path inside the folder is refused."""
    manifest = folder / CHECKSUMS
    if not manifest.is_file():
        raise CorruptModelError(f"{folder} has no {CHECKSUMS}; refusing to load unverified weights")
    try:
        text = manifest.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptModelError(f"{manifest} is not UTF-8 text (byte {exc.start}); re-download the model") from exc
    except OSError as exc:
        raise CorruptModelError(f"cannot read {manifest}: {exc.strerror}") from exc
    expected: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _MANIFEST_LINE.fullmatch(line)
        if not match:
            raise CorruptModelError(f"{manifest} line {number} is not '<sha256>  <file>': {line[:80]!r}")
        digest, name = match.groups()
        if name.startswith("/") or "\\" in name or any(part in ("", ".", "..") for part in name.split("/")):
            raise CorruptModelError(
                f"{manifest} line {number} names {name!r}, not a plain path inside the model folder"
            )
        if name in expected:
            raise CorruptModelError(f"{manifest} lists {name} twice")
        expected[name] = digest.lower()
    return expected


def folder_files(folder: Path) -> list[str]:
    """Every file under the folder but the manifest, as sorted relative POSIX paths (links to folders refused)."""
    names = []
    for root, dirs, files in os.walk(folder):  # does not follow links to folders
        base = Path(root).relative_to(folder)
        for name in dirs:
            if (Path(root) / name).is_symlink():
                raise CorruptModelError(f"{Path(root) / name} is a link to a folder; a model folder holds plain files")
        names += [(base / name).as_posix() for name in files]
    return sorted(name for name in names if name != CHECKSUMS)


def read_config(folder: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(json.loads((folder / CONFIG).read_text(encoding="utf-8")))
    except FileNotFoundError as exc:
        raise ModelError(f"{folder} is not a CTFlow model folder: it has no {CONFIG}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptModelError(f"{folder / CONFIG} is not valid JSON: {exc}") from exc
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
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(folder / VAE_FOLDER, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError, TypeError) as exc:  # RuntimeError: weights of another shape
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptModelError(f"cannot load the slice autoencoder from {folder / VAE_FOLDER}: {reason}") from exc


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
