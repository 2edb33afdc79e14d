"""The first-use install flow, with Slicer's installers recorded instead of run (nothing is installed here)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import slicer

from CTFlowSlicerLib import dependencies


@pytest.fixture
def installs(monkeypatch):
    """Records what would be installed, checking the staged ctflow copy and the constraints while they exist."""
    calls = []

    def record(requirements, constraints):
        source = Path(requirements[0].partition(" @ file://")[2])
        assert (source / "pyproject.toml").is_file() and (source / "ctflow" / "pipeline.py").is_file()
        calls.append({"requirements": requirements, "constraints": Path(constraints).read_text()})

    monkeypatch.setattr(dependencies, "missing", lambda: ["ctflow"] if not calls else [])
    return record, calls


def test_slicer_5_12_uses_pip_ensure_with_pinned_constraints(installs, monkeypatch):
    record, calls = installs
    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = lambda requirements, constraints, requester: record(requirements, constraints)
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    assert dependencies.ensure() is None
    assert calls[0]["requirements"][0].startswith("ctflow @ file://")
    assert f"numpy=={np.__version__}\n" in calls[0]["constraints"]


def test_older_slicer_asks_then_uses_pip_install(installs, monkeypatch):
    record, calls = installs
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # import fails, as in Slicer before 5.12
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, title: "CTFlow library" in text)
    monkeypatch.setattr(slicer.util, "pip_install", lambda args: record(args[:1], args[args.index("-c") + 1]))
    assert dependencies.ensure() is None
    assert "torch==" in calls[0]["constraints"]


def test_declining_leaves_a_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)
    monkeypatch.setattr(dependencies, "missing", lambda: ["ctflow"])
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, title: False)
    assert dependencies.ensure() == "CTFlow needs ctflow, which is not installed."


def test_torch_comes_from_the_pytorch_extension_when_present(monkeypatch):
    asked = []
    state = {"missing": ["torch", "ctflow"]}

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation, torchVersionRequirement):
            asked.append((askConfirmation, torchVersionRequirement))
            state["missing"] = ["ctflow"]

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    monkeypatch.setattr(dependencies, "missing", lambda: state["missing"])
    monkeypatch.setattr(dependencies, "installCTFlow", lambda: state.update(missing=[]))
    assert dependencies.ensure() is None
    assert asked == [(True, dependencies.TORCH_REQUIREMENT)]


def test_constraints_pin_what_slicer_runs():
    versions = dependencies.runningVersions()
    assert versions["numpy"] == np.__version__ and "torch" in versions
    assert dependencies.constraintsText({"numpy": "2.0.1", "SimpleITK": "2.4.0"}) == "SimpleITK==2.4.0\nnumpy==2.0.1\n"
    assert dependencies.missing() == []
    assert dependencies.describeTorch().startswith("Detected:")
