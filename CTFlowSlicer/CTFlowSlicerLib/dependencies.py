"""Installing the third-party packages generation needs into Slicer's Python: on the main thread, after the
user has read what will be installed and agreed.

ctflow itself is not installed: it ships inside the extension (resources.useBundledLibrary). Its requirements
are read from the one file that its pyproject.toml reads too (CTFlowLib/requirements.txt). torch comes first,
through the PyTorch extension's PyTorchUtils (it picks the CUDA build that fits the driver); then the rest,
with a constraints file that pins the numpy and SimpleITK Slicer runs (and the torch just installed), so
none of Slicer's own packages is replaced. Slicer's VTK is not a pip package and no requirement names it.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import slicer

from . import resources

MINIMUM_PYTHON = (3, 10)  # ctflow's requires-python; Slicer 5.10 and later ship 3.12, 5.8 ships 3.9
PINNED = ("numpy", "SimpleITK", "torch")  # Slicer's own copies, and a torch that satisfies us, stay as they are
REQUESTER = "CTFlow"
INSTALLING = "Python packages are being installed; click Generate again when that has finished."
TOO_OLD_SLICER = (
    "CTFlow needs 3D Slicer 5.10 or later: this Slicer's Python is {version}, and the ctflow library needs "
    "Python 3.10 to 3.12. Install a current Slicer from download.slicer.org."
)
_installing = False


def requirements() -> list[str]:
    """The requirement lines of CTFlowLib/requirements.txt, torch first."""
    lines = (resources.ctflowLibrary() / "requirements.txt").read_text(encoding="utf-8").splitlines()
    found = [line.split("#")[0].strip() for line in lines]
    return sorted((line for line in found if line), key=lambda line: distribution(line) != "torch")


def parseRequirement(requirement: str):
    """A packaging Requirement; pip's vendored copy where Slicer's Python lacks the packaging distribution."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
    return Requirement(requirement)


def distribution(requirement: str) -> str:
    return parseRequirement(requirement).name


def unsatisfied(requirement: str) -> str | None:
    """None when installed in a version the requirement accepts, else what is wrong ("missing" or the version)."""
    parsed = parseRequirement(requirement)
    try:
        version = importlib.metadata.version(parsed.name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"
    return None if parsed.specifier.contains(version, prereleases=True) else version


def missing() -> list[str]:
    """The requirements not satisfied, each with the version installed if there is one (too old)."""
    problems = []
    for requirement in requirements():
        state = unsatisfied(requirement)
        if state is not None:
            problems.append(requirement if state == "missing" else f"{requirement} ({state} installed)")
    return problems


def installing() -> bool:
    """True while an install runs (ours, or another extension's where Slicer can say: slicer.pydeps, or
    slicer.packaging in early 5.12 builds)."""
    return _installing or any(getattr(module, "isPipInstallInProgress", lambda: False)()
                              for module in map(_slicerModule, ("pydeps", "packaging")) if module is not None)


def ensure() -> str | None:
    """Offer to install what is missing. None when generation can run, else a sentence for the status line."""
    global _installing
    if sys.version_info < MINIMUM_PYTHON:
        return TOO_OLD_SLICER.format(version=".".join(map(str, sys.version_info[:3])))
    if not missing():
        return None
    if installing():
        return INSTALLING
    _installing = True
    try:
        torch, others = requirements()[0], requirements()[1:]
        if unsatisfied(torch) is not None:
            installTorch(torch)
        if unsatisfied(torch) is None and any(unsatisfied(r) is not None for r in others):
            pipInstall([r for r in others if unsatisfied(r) is not None])
    except subprocess.CalledProcessError as exc:
        logging.error("CTFlow: installing Python packages failed: %s", exc)
        return "Installing the Python packages failed; the Python console shows pip's messages."
    finally:
        _installing = False
    still = missing()
    if still:
        return f"CTFlow needs {', '.join(still)}: not installed. Click Generate to be asked again."
    return None


def installTorch(requirement: str) -> None:
    """Only through the PyTorch extension, which picks the build that fits the GPU driver: PyPI's default build may
    not (and on Windows it has no CUDA at all), so without the extension the user is told how to get it."""
    specifier = requirement[len(distribution(requirement)):]
    try:
        import PyTorchUtils
    except ImportError:
        slicer.util.infoDisplay(
            f"CTFlow needs PyTorch {specifier}, which Slicer gets through the PyTorch extension (it picks the build "
            "that fits your GPU). Install it from View > Extensions Manager, restart Slicer and click Generate again.",
            "CTFlow - install PyTorch")
        return
    old = unsatisfied(requirement)
    if old not in (None, "missing"):
        slicer.util.infoDisplay(
            f"CTFlow needs PyTorch {specifier}; this Slicer has {old}. The PyTorch extension will now offer to "
            "replace it (restart Slicer afterwards if other modules have already imported torch).",
            "CTFlow - upgrade PyTorch")
    logic = PyTorchUtils.PyTorchUtilsLogic()
    logic.installTorch(askConfirmation=True, torchVersionRequirement=specifier)


def pipInstall(needed: list[str]) -> None:
    """Our own explanation first (pip_ensure's prompt cannot carry it); then pip_ensure where Slicer has it
    (slicer.pydeps, 5.11+; slicer.packaging in early 5.12 builds), else slicer.util.pip_install."""
    sizes = "about 200 MB: transformers, diffusers, safetensors, nibabel, pynrrd, pydicom and the MiniLM text encoder"
    if not slicer.util.confirmOkCancelDisplay(
            f"CTFlow needs these Python packages ({sizes}):\n\n" + "\n".join(needed) +
            "\n\nSlicer's own numpy, SimpleITK and the installed PyTorch are kept as they are. Install now?",
            "CTFlow - install Python packages"):
        logging.info("CTFlow: installation of %s declined", needed)
        return
    constraints = writeConstraints()
    try:
        installer = _slicerModule("pydeps") or _slicerModule("packaging")
        if installer is not None and hasattr(installer, "pip_ensure"):
            options = {"constraints": str(constraints), "requester": REQUESTER}
            if "prompt_install" in inspect.signature(installer.pip_ensure).parameters:
                options["prompt_install"] = False  # the user has just agreed to our own, fuller question
            installer.pip_ensure([parseRequirement(r) for r in needed], **options)
        else:
            slicer.util.pip_install(needed + ["-c", str(constraints)])
    finally:
        constraints.unlink(missing_ok=True)


def constraintsText(versions: dict[str, str]) -> str:
    return "".join(f"{name}=={version}\n" for name, version in sorted(versions.items()))


def runningVersions(names=PINNED) -> dict[str, str]:
    """Installed versions of the pinned packages (those present)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def writeConstraints() -> Path:
    """A constraints file pinning what Slicer runs; the caller removes it."""
    handle, name = tempfile.mkstemp(prefix="ctflow-constraints-", suffix=".txt")
    with os.fdopen(handle, "w") as file:
        file.write(constraintsText(runningVersions(PINNED)))
    return Path(name)


def _slicerModule(name: str):
    try:
        return importlib.import_module(f"slicer.{name}")
    except ImportError:
        return None
