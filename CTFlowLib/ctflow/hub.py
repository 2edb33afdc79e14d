"""Finding a model folder: a local path, the bundled demo model, or a hub id fetched into the local cache
(revision-pinned; only data files are downloaded, never code or pickles)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ModelError
from .model_folder import CONFIG

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
    if is_hub_id(model):
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


def is_hub_id(model: str | os.PathLike) -> bool:
    """"org/name" that names no local path: a model to fetch from the hub."""
    return isinstance(model, str) and bool(HUB_ID.match(model)) and not Path(model).expanduser().exists()
