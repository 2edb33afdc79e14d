"""Installing what generation needs into Slicer's Python: on the main thread, and only after the user agrees.

torch comes first, through the PyTorch extension when it is installed (it picks the CUDA build that fits
the GPU driver); then the bundled ctflow library with its requirements. Every install runs with a
constraints file pinning the numpy, SimpleITK and torch already in Slicer, so none of them is replaced.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

import slicer

from . import resources

REQUIRED = ("torch", "ctflow")
PINNED = ("numpy", "SimpleITK", "torch")  # Slicer's own copies (and a torch that works) must stay as they are
TORCH_REQUIREMENT = ">=2.4"
REQUESTER = "CTFlow"


def missing() -> list[str]:
    importlib.invalidate_caches()
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def ensure() -> str | None:
    """Offer to install what is missing. None when generation can run, else a sentence for the status line."""
    try:
        if "torch" in missing():
            installTorch()
        if "torch" not in missing() and "ctflow" in missing():
            installCTFlow()
    except subprocess.CalledProcessError as exc:
        logging.error("CTFlow: installing Python packages failed: %s", exc)
        return "Installing the Python packages failed; the Python console shows pip's messages."
    still = missing()
    if still:
        return f"CTFlow needs {' and '.join(still)}, which {'is' if len(still) == 1 else 'are'} not installed."
    return None


def describeTorch() -> str:
    """One line for the panel: the torch in Slicer and the accelerator it sees."""
    if importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed yet; it is offered when you first click Generate."
    import torch

    if not torch.cuda.is_available():
        return f"Detected: no CUDA GPU, CPU only (PyTorch {torch.__version__})."
    gpu = torch.cuda.get_device_properties(0)
    return f"Detected: {gpu.name}, {gpu.total_memory / 2**30:.0f} GB (PyTorch {torch.__version__})."


def installTorch() -> None:
    try:
        import PyTorchUtils
    except ImportError:
        pipInstall(
            [f"torch{TORCH_REQUIREMENT}"],
            "PyTorch from PyPI (about 1 to 3 GB). For the CUDA build that fits your GPU driver, cancel, install "
            "the PyTorch extension from the Extensions Manager, restart Slicer and click Generate again.",
        )
        return
    PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT)


def installCTFlow() -> None:
    library = resources.ctflowLibrary()
    if library is None:
        logging.error("CTFlow: this copy of the extension lacks its ctflow library (CTFlowLib); reinstall it")
        return
    # pip builds inside the source folder, which an installed extension may not be allowed to write: build a copy
    staging = Path(tempfile.mkdtemp(prefix="ctflow-build-"))
    try:
        skip = shutil.ignore_patterns("*.egg-info", "build")
        source = Path(shutil.copytree(library, staging / "CTFlowLib", ignore=skip))
        pipInstall(
            [f"ctflow @ {source.as_uri()}"],
            "the CTFlow library and its requirements (transformers, diffusers, safetensors, nibabel, pynrrd).",
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def pipInstall(requirements: list[str], what: str) -> None:
    """slicer.packaging.pip_ensure where Slicer has it (5.12 and later), else a confirmation and pip_install."""
    constraints = writeConstraints()
    try:
        packaging = importlib.import_module("slicer.packaging")
    except ImportError:
        packaging = None
    if packaging is not None:
        try:
            packaging.pip_ensure(requirements, constraints=constraints, requester=REQUESTER)
        except RuntimeError:  # the user declined
            logging.info("CTFlow: installation of %s declined", requirements)
        return
    if slicer.util.confirmOkCancelDisplay(f"CTFlow needs {what}\n\nInstall now?", "CTFlow - install Python packages"):
        slicer.util.pip_install(requirements + ["-c", str(constraints)])


def constraintsText(versions: dict[str, str]) -> str:
    return "".join(f"{name}=={version}\n" for name, version in sorted(versions.items()))


def runningVersions() -> dict[str, str]:
    """Installed versions of the pinned packages (those present)."""
    versions = {}
    for name in PINNED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def writeConstraints() -> Path:
    with tempfile.NamedTemporaryFile("w", prefix="ctflow-constraints-", suffix=".txt", delete=False) as handle:
        handle.write(constraintsText(runningVersions()))
    return Path(handle.name)
