"""Trusting a model folder: every file must be listed with its sha256 in checksums.sha256 (sha256sum format) and
match it before anything is loaded; code and pickle files are refused even when listed, so a downloaded model can
never run code."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .errors import CorruptModelError
from .io import read_text_file

CHECKSUMS = "checksums.sha256"
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


def verify_checksums(folder: Path, required: tuple[str, ...] = ()) -> dict[str, str]:
    """Check that checksums.sha256 lists every file of the folder (and the `required` ones) and that each matches;
    returns {path: sha256}."""
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
    for name in required:
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
    text = read_text_file(manifest, CorruptModelError, "; re-download the model")
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
