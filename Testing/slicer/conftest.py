"""Fixtures for the Slicer module: a real MRML scene from slicer-core, the module's code importable, and, for the
panel, PySide6 standing in for Slicer's PythonQt (standin.py). The tiny model comes from Testing/conftest.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "CTFlowSlicer"
sys.path.insert(0, str(MODULE_DIR))

REPORT = (
    "Findings: There is a moderate right pleural effusion with compressive atelectasis of the right lower lobe.\n"
    "Impressions: Moderate right pleural effusion."
)


@pytest.fixture
def scene():
    """A fresh scene as slicer.mrmlScene, with the three slice views' composite nodes (red, yellow, green)."""
    import slicer

    slicer.mrmlScene = slicer.vtkMRMLScene()
    for view in ("Red", "Yellow", "Green"):
        composite = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(view)
    return slicer.mrmlScene


def change(parameters, **values):
    """Set fields of a parameter node; returns it (tests build requests with it)."""
    for name, value in values.items():
        setattr(parameters, name, value)
    return parameters


@pytest.fixture(name="change")
def change_fixture():
    return change


@pytest.fixture
def settings(qt_application, scene, tiny_model):
    """The module's parameter node asking for ten slices (three blocks of the tiny model) from a local model
    folder, two sampling steps, on the CPU."""
    from CTFlowSlicerLib.parameters import CTFlowSlicerParameterNode, Device, ModelSource

    parameters = CTFlowSlicerParameterNode(scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode"))
    return change(parameters, report=REPORT, slices=10, seed=5, steps=2, device=Device.CPU,
                  modelSource=ModelSource.FOLDER, modelLocation=str(tiny_model))


@pytest.fixture(scope="session")
def logic(qt_application):
    """One CTFlowSlicerLogic for the logic tests: its worker process keeps the model loaded between runs, as in
    Slicer. Tests that break the worker leave the next test a fresh one (start() replaces a dead worker)."""
    import CTFlowSlicer

    logic = CTFlowSlicer.CTFlowSlicerLogic()
    yield logic
    logic.shutdown()


def load_helper(name: str):
    """A helper module of this folder (pytest's importlib mode puts none of them on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"ctflow_slicer_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and typing look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def standin():
    return load_helper("standin")


@pytest.fixture(scope="session")
def qt_application(standin, tmp_path_factory):
    """Slicer's Qt world stood in by PySide6 (offscreen); must come before CTFlowSlicer.py is imported."""
    return standin.install(str(tmp_path_factory.mktemp("slicer-temporary")))


@pytest.fixture
def dicom_database(standin, tmp_path, monkeypatch):
    """Slicer's DICOM database, open and empty, as slicer.dicomDatabase, with DICOMLib.DICOMUtils importable
    (standin.py: ctk's database and indexer exist only in the Slicer application)."""
    import slicer

    database = standin.ctkDICOMDatabase(tmp_path / "SlicerDICOMDatabase")
    monkeypatch.setitem(sys.modules, "DICOMLib", standin.DICOMLib)
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    return database


@pytest.fixture(scope="session")
def pythonqt_host():
    """A main thread that holds the GIL while idle, as Slicer's does (pythonqt_host.py)."""
    return load_helper("pythonqt_host")


@pytest.fixture(scope="session")
def slice_views():
    """Offscreen rendering of the red, yellow and green views by Slicer's slice logic (slice_views.py)."""
    return load_helper("slice_views")


@pytest.fixture
def panel(qt_application, scene):
    """The module's real widget, set up from the real .ui file in a visible (offscreen) window."""
    from PySide6 import QtWidgets

    import CTFlowSlicer

    window = QtWidgets.QWidget()
    widget = CTFlowSlicer.CTFlowSlicerWidget(window)
    widget.setup()
    window.resize(460, 980)
    window.show()
    qt_application.processEvents()
    yield widget
    widget.cleanup()
    window.close()
