"""Files the extension ships beside the module, found in an installed extension or in the source tree.

An installed extension keeps them in the module's Resources folder (CMakeLists.txt copies them there);
a source checkout added through "Additional module paths" has them at the repository root.
"""

from __future__ import annotations

import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]
NO_BUNDLED_MODEL = (
    "No trained CTFlow model is bundled with this installation (its Resources/Models/ctflow-demo is missing): "
    "reinstall the extension, or under Model choose 'Local folder' or 'Hub id'."
)
_IN_SOURCE_TREE = {  # name in an installed module's Resources -> path from the repository root
    "SampleReports": "Resources/SampleReports",
    "Models/ctflow-demo": "Resources/Models/ctflow-demo",
    "CTFlowLib": "CTFlowLib",
}


def shipped(name: str) -> Path | None:
    for candidate in (MODULE_DIR / "Resources" / name, MODULE_DIR.parent / _IN_SOURCE_TREE[name]):
        if candidate.exists():
            return candidate
    return None


def sampleReports() -> dict[str, Path]:
    """Title -> report file, e.g. "RUL nodule" for RUL_nodule.txt."""
    folder = shipped("SampleReports")
    files = sorted(folder.glob("*.txt"), key=lambda path: path.stem.lower()) if folder else []
    return {_title(path.stem): path for path in files}


def bundledModel() -> Path | None:
    """The demo model folder, or None when an install lacks it."""
    folder = shipped("Models/ctflow-demo")
    return folder if folder is not None and (folder / "config.json").is_file() else None


def ctflowLibrary() -> Path:
    """The folder holding the bundled ctflow package and its requirements.txt."""
    folder = shipped("CTFlowLib")
    if folder is None:
        raise RuntimeError(
            "this copy of the CTFlow extension lacks its ctflow library (Resources/CTFlowLib): reinstall it")
    return folder


def useBundledLibrary() -> None:
    """Import ctflow from the extension's own copy: an update updates it, an uninstall removes it."""
    folder = str(ctflowLibrary())
    if folder not in sys.path:
        sys.path.insert(0, folder)


def _title(stem: str) -> str:
    words = stem.replace("_", " ")
    return words[:1].upper() + words[1:]
