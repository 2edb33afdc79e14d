"""The panel with real Qt widgets: the real .ui and CTFlowSlicer.py, with PySide6 (offscreen) standing in for
Slicer's PythonQt (standin.py). Clicks go through Qt; blocks arrive through the widget's own QTimer."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import ctflow
import numpy as np
import pydicom
import slicer
from ctflow.conventions import WINDOWS
from PySide6 import QtCore, QtTest, QtWidgets

from CTFlowSlicerLib import generation, resources

INTERACTIVE = (QtWidgets.QAbstractButton, QtWidgets.QComboBox, QtWidgets.QAbstractSpinBox, QtWidgets.QLineEdit,
               QtWidgets.QTextEdit, QtWidgets.QProgressBar)


def wait_until(condition, timeout: float = 60.0) -> None:
    """Run the Qt event loop (the widget's timer included) until condition() holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the panel did not get there in time"
        QtWidgets.QApplication.processEvents()
        time.sleep(0.01)


def choose(combo: QtWidgets.QComboBox, text: str) -> None:
    index = combo.findText(text)
    assert index >= 0, text
    combo.setCurrentIndex(index)


def choose_sample(ui, title: str) -> None:
    """What a click on a sample report does: the box's index changes, then `activated`."""
    choose(ui.sampleReportComboBox, title)
    ui.sampleReportComboBox.activated.emit(ui.sampleReportComboBox.currentIndex())


def use_tiny_model(ui, tiny_model, slices: int) -> None:
    choose(ui.modelSourceComboBox, "Local folder")
    ui.modelLocationLineEdit.setText(str(tiny_model))
    choose(ui.deviceComboBox, "CPU")
    ui.slicesSpinBox.setValue(slices)
    ui.stepsSpinBox.setValue(2)
    ui.seedSpinBox.setValue(11)


def generate_normal_chest(ui, tiny_model, slices: int) -> None:
    """Generate from a normal report with the tiny model and wait for the end."""
    ui.reportTextEdit.setPlainText("Findings: Normal chest.")
    use_tiny_model(ui, tiny_model, slices=slices)
    ui.generateButton.click()
    wait_until(lambda: ui.generateButton.text() == "&Generate")


def answer_next_question(button, asked: list, tries: int = 200) -> None:
    """Press `button` in the message box that the next click opens (it runs its own event loop); its text goes to
    `asked`. Gives up after `tries` looks, 10 ms apart, when none opens."""
    def press(left=tries):
        box = QtWidgets.QApplication.activeModalWidget()
        if not isinstance(box, QtWidgets.QMessageBox):
            if left:
                QtCore.QTimer.singleShot(10, lambda: press(left - 1))
            return
        asked.append(box.text())
        box.button(button).click()

    QtCore.QTimer.singleShot(0, press)


def output_volume(panel):
    return panel._parameterNode.generatedVolume


def slices_in(node) -> int:
    return node.GetImageData().GetDimensions()[2]


def test_a_fresh_panel_shows_what_generate_will_use(panel):
    ui, parameters = panel.ui, panel._parameterNode
    assert ui.slicesSpinBox.value() == parameters.slices == 0
    assert ui.seedSpinBox.value() == parameters.seed > 0  # a fresh parameter node draws a seed
    assert ui.modelSourceComboBox.currentText() == "Bundled demo model" and parameters.modelSource == "bundled"
    assert [ui.deviceComboBox.itemText(i) for i in range(3)] == ["Automatic", "CUDA GPU", "CPU"]
    assert ui.outputVolumeSelector.currentText() == "Create a new volume" and parameters.outputVolume is None
    assert ui.lungWindowButton.isChecked() and parameters.window == "lung"
    assert ui.slicesSpinBox.maximum() == 2048 and ui.guidanceSpinBox.singleStep() == 0.5
    assert panel.ui.slicesSpinBox.text() == "Automatic" and panel.ui.stepsSpinBox.text() == "Model default"
    assert panel.ui.sideGuidanceSpinBox.text() == "Model default" and parameters.sideGuidance == -1.0
    assert panel.ui.findingGuidanceSpinBox.text() == "Model default" and parameters.findingGuidance == -1.0
    assert panel.ui.deviceLabel.text() == "Detecting PyTorch and the GPU ..."  # the worker imports torch, not Slicer
    wait_until(lambda: panel.ui.deviceLabel.text().startswith("Detected:"))
    assert not panel._timer.isActive()  # once the worker has answered, the panel idles


def test_typing_in_the_panel_keeps_every_key_where_it_was_typed(panel):
    """Each key stores the text in the parameter node, whose change writes every bound widget again (as Slicer's
    wrapper does): the report boxes must keep the cursor, the model line too when edited in the middle."""
    ui, parameters = panel.ui, panel._parameterNode
    for box, field in ((ui.reportTextEdit, "report"), (ui.impressionsTextEdit, "impressions")):
        box.setFocus()
        QtTest.QTest.keyClicks(box, "Findings: effusion")
        assert box.toPlainText() == getattr(parameters, field) == "Findings: effusion"
        setattr(parameters, field, "From a saved scene.")  # the node still drives the box
        assert box.toPlainText() == "From a saved scene."
    assert ui.readingLabel.text() == "no finding"  # nothing in "From a saved scene." reads as one
    ui.reportTextEdit.clear()
    QtTest.QTest.keyClicks(ui.reportTextEdit, "Findings: Small left pleural effusion. No emphysema.")
    assert ui.readingLabel.text() == "pleural effusion (left); negated: emphysema"  # read as it is typed
    QtTest.QTest.keyClicks(ui.impressionsTextEdit, " Cardiomegaly.")
    assert ui.readingLabel.text() == "pleural effusion (left), cardiomegaly; negated: emphysema"
    ui.reportTextEdit.clear()
    ui.impressionsTextEdit.clear()
    assert ui.readingLabel.text() == ""  # an empty report reads as nothing
    choose(ui.modelSourceComboBox, "Local folder")
    ui.modelLocationLineEdit.setText("/data/md")
    ui.modelLocationLineEdit.setCursorPosition(7)
    QtTest.QTest.keyClicks(ui.modelLocationLineEdit, "XY")
    assert ui.modelLocationLineEdit.text() == parameters.modelLocation == "/data/mXYd"


def test_generate_watch_the_volume_grow_then_cancel(panel, tiny_model, output_dir):
    ui = panel.ui
    choose_sample(ui, "Right pleural effusion")
    use_tiny_model(ui, tiny_model, slices=400)
    settings = panel._parameterNode
    assert settings.report.startswith("Findings:") and "right pleural effusion" in settings.report
    assert (settings.slices, settings.steps, settings.seed, settings.modelSource) == (400, 2, 11, "folder")

    threads = set(threading.enumerate())
    ui.generateButton.click()
    assert ui.generateButton.text() == "&Cancel"
    wait_until(lambda: ui.progressBar.value() >= 2)
    node = output_volume(panel)
    grown_to = slices_in(node)
    assert grown_to >= 8 and node.GetAttribute("CTFlow.partial") == "True"
    assert ui.saveNrrdButton.isEnabled() and not ui.exportDicomButton.isEnabled()  # no DICOM of a growing volume
    assert ui.progressBar.maximum() == 100 and "blocks, about" in ui.progressBar.format()
    assert ui.statusLabel.text().startswith("Block ")
    panel.parent.grab().save(str(output_dir / "slicer_panel.png"))

    ui.generateButton.click()
    assert ui.statusLabel.text().startswith("Cancelling:") and not ui.generateButton.isEnabled()
    wait_until(lambda: ui.generateButton.text() == "&Generate")
    assert ui.statusLabel.text().startswith("Cancelled: kept") and ui.generateButton.isEnabled()
    assert grown_to <= slices_in(node) < 400
    assert node.GetAttribute("CTFlow.partial") == "True"
    assert ui.exportDicomButton.isEnabled()  # a cancelled volume exports, marked INCOMPLETE (test_logic.py)
    assert set(threading.enumerate()) == threads  # generation ran in the worker process, on no thread of ours


def test_finish_then_window_save_and_replace(panel, tiny_model, tmp_path, monkeypatch):
    ui = panel.ui
    ui.reportTextEdit.setPlainText("Findings: Centrilobular emphysema in both upper lobes.")
    ui.impressionsTextEdit.setPlainText("Emphysema.")
    use_tiny_model(ui, tiny_model, slices=6)
    assert not ui.saveNrrdButton.isEnabled()

    ui.generateButton.click()
    wait_until(lambda: ui.generateButton.text() == "&Generate")
    node = output_volume(panel)
    assert ui.statusLabel.text().startswith("Done: 6 slices") and slices_in(node) == 6
    assert node.GetName() == "Synthetic CT (CTFlow) - Emphysema. - seed 11"
    assert (ui.progressBar.value(), ui.progressBar.format()) == (2, "2 / 2 blocks")

    ui.mediastinumWindowButton.click()
    display = node.GetDisplayNode()
    assert (display.GetWindow(), display.GetLevel()) == (WINDOWS["mediastinum"].width, WINDOWS["mediastinum"].level)
    assert panel._parameterNode.window == "mediastinum"

    monkeypatch.setattr(QtWidgets.QFileDialog, "getSaveFileName", lambda *args: (str(tmp_path / "ct"), "NRRD"))
    ui.saveNrrdButton.click()
    saved = ctflow.read_volume(tmp_path / "ct.nrrd")
    assert saved.provenance.seed == 11 and saved.hu.shape == (6, 16, 16)
    assert ui.statusLabel.text().startswith("Saved ")

    patient = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Patient CT")
    offered = [ui.outputVolumeSelector.itemText(k) for k in range(ui.outputVolumeSelector.count())]
    assert offered == ["Create a new volume", node.GetName()]  # a volume CTFlow did not make is not offered
    slicer.mrmlScene.RemoveNode(patient)
    ui.outputVolumeSelector.setCurrentIndex(ui.outputVolumeSelector.findText(node.GetName()))
    assert panel._parameterNode.outputVolume is node
    ui.newSeedButton.click()
    ui.generateButton.click()
    wait_until(lambda: ui.generateButton.text() == "&Generate")
    assert output_volume(panel) is node and len(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")) == 1
    assert node.GetAttribute("CTFlow.seed") == str(ui.seedSpinBox.value()) != "11"


def test_export_dicom_writes_a_synthetic_series_and_adds_it_to_the_database(panel, tiny_model, tmp_path, monkeypatch,
                                                                            dicom_database):
    ui = panel.ui
    assert not ui.exportDicomButton.isEnabled()
    ui.reportTextEdit.setPlainText("Findings: Small left pleural effusion.\nImpressions: Left effusion.")
    use_tiny_model(ui, tiny_model, slices=6)
    ui.generateButton.click()
    assert not ui.exportDicomButton.isEnabled()
    wait_until(lambda: ui.generateButton.text() == "&Generate")
    assert ui.exportDicomButton.isEnabled()
    node = output_volume(panel)

    monkeypatch.setattr(QtWidgets.QFileDialog, "getExistingDirectory", lambda *args: str(tmp_path))
    ui.exportDicomButton.click()
    folder = tmp_path / "Synthetic_CT_CTFlow_-_Left_effusion._-_seed_11.dcm"
    files = sorted(folder.iterdir())
    assert ui.statusLabel.text() == (
        f'Wrote the DICOM series {folder}: 6 instances, "SYNTHETIC CT (CTFlow) - NOT FOR DIAGNOSIS", Synthetic Data '
        "YES; added to the DICOM database (the DICOM module sends it to a PACS).")
    first = pydicom.dcmread(files[0])
    assert len(files) == 6 and first.SyntheticData == "YES" and first.PatientName == "SYNTHETIC^CTFLOW"
    series = ctflow.read_volume(folder)
    np.testing.assert_array_equal(series.hu, slicer.util.arrayFromVolume(node))
    np.testing.assert_allclose(series.geometry.ijk_to_ras(), generation.ijkToRAS(node), atol=1e-6)
    assert series.provenance == generation.provenanceOf(node) and series.provenance.seed == 11
    copies = dicom_database.filesForSeries(first.SeriesInstanceUID)  # the database indexed the folder just written
    assert sorted(Path(copy).read_bytes() for copy in copies) == sorted(file.read_bytes() for file in files)

    asked = []
    answer_next_question(QtWidgets.QMessageBox.No, asked)
    ui.exportDicomButton.click()
    assert asked == [f"{folder} exists. Replace it with this series? A folder that holds anything but DICOM files "
                     "is never replaced."]
    assert ui.statusLabel.text() == f"Not exported: {folder} exists and was kept."
    assert [file.read_bytes() for file in sorted(folder.iterdir())] == [file.read_bytes() for file in files]
    answer_next_question(QtWidgets.QMessageBox.Yes, asked)
    ui.exportDicomButton.click()
    replaced = pydicom.dcmread(sorted(folder.iterdir())[0], stop_before_pixels=True).SeriesInstanceUID
    assert replaced != first.SeriesInstanceUID and len(dicom_database.filesForSeries(replaced)) == 6
    assert ui.statusLabel.text().startswith(f"Wrote the DICOM series {folder}: 6 instances")

    (folder / "notes.txt").write_text("mine")  # never replaced, even when asked to
    answer_next_question(QtWidgets.QMessageBox.Yes, asked)
    ui.exportDicomButton.click()
    assert ui.statusLabel.text() == f"Could not export: {folder} is not a folder of DICOM files only; not replacing it"
    assert "color" in ui.statusLabel.styleSheet()
    assert (folder / "notes.txt").read_text() == "mine" and len(list(folder.iterdir())) == 7

    patient = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Patient CT")
    panel._parameterNode.generatedVolume = patient  # a volume CTFlow did not make is not written as synthetic
    assert not ui.saveNrrdButton.isEnabled() and not ui.exportDicomButton.isEnabled()


def test_errors_appear_in_the_panel(panel, monkeypatch):
    monkeypatch.setattr(resources, "bundledModel", lambda: None)  # an install that lacks the model
    ui = panel.ui
    choose(ui.modelSourceComboBox, "Local folder")
    choose(ui.modelSourceComboBox, "Bundled demo model")  # a change of source re-reads the model's status
    assert ui.modelStatusLabel.text() == resources.NO_BUNDLED_MODEL
    assert not ui.modelLocationLineEdit.isEnabled()

    ui.reportTextEdit.setPlainText("Findings: Small left pleural effusion.")
    ui.generateButton.click()
    wait_until(lambda: ui.generateButton.text() == "&Generate", timeout=10)
    assert ui.statusLabel.text() == f"Error: {resources.NO_BUNDLED_MODEL}"
    assert "color" in ui.statusLabel.styleSheet()
    assert output_volume(panel) is None

    choose(ui.modelSourceComboBox, "Local folder")
    ui.modelLocationLineEdit.setText("/no/such/folder")
    assert ui.modelStatusLabel.text().startswith("The model folder '/no/such/folder' does not exist")


def test_a_sample_report_asks_before_it_replaces_what_the_user_wrote(panel):
    ui, parameters, asked = panel.ui, panel._parameterNode, []
    choose_sample(ui, "Right pleural effusion")  # an empty box: no question
    assert "right pleural effusion" in parameters.report and ui.sampleReportComboBox.currentIndex() == 0
    normal = resources.sampleReports()["Normal chest"].read_text(encoding="utf-8")
    choose_sample(ui, "Normal chest")  # a sample replaced by another: nothing of the user's is lost
    assert parameters.report == ui.reportTextEdit.toPlainText() == normal
    ui.impressionsTextEdit.setPlainText("My own impression.")
    answer_next_question(QtWidgets.QMessageBox.No, asked)
    choose_sample(ui, "Right pleural effusion")
    assert asked == ["Replace the report you wrote with the sample report?"]
    assert parameters.impressions == "My own impression." and parameters.report == normal
    answer_next_question(QtWidgets.QMessageBox.Yes, asked)
    choose_sample(ui, "Right pleural effusion")
    assert len(asked) == 2 and "right pleural effusion" in parameters.report and parameters.impressions == ""


def test_generate_during_an_install_says_why_nothing_starts(panel, monkeypatch):
    from CTFlowSlicerLib import dependencies

    monkeypatch.setattr(dependencies, "installing", lambda: True)  # e.g. another extension's pip_ensure
    panel.ui.reportTextEdit.setPlainText("Findings: Normal chest.")
    panel.ui.generateButton.click()
    assert panel.ui.statusLabel.text() == dependencies.INSTALLING and panel.ui.generateButton.text() == "&Generate"


def test_the_panel_opens_when_the_generation_process_cannot_start(qt_application, scene, tmp_path, monkeypatch):
    import CTFlowSlicer

    launcher = tmp_path / "PythonSlicer"
    launcher.write_text("#!/bin/sh\n")  # not executable: Popen raises PermissionError
    monkeypatch.setattr(CTFlowSlicer, "workerPython", lambda: str(launcher))
    window = QtWidgets.QWidget()
    widget = CTFlowSlicer.CTFlowSlicerWidget(window)
    try:
        widget.setup()
        assert "Permission denied" in widget.ui.deviceLabel.text()
        assert widget.ui.generateButton.isEnabled()
    finally:
        widget.cleanup()
        window.close()


def test_every_control_has_a_tooltip_and_a_keyboard_path(panel, tiny_model):
    ui = panel.ui
    controls = [w for w in panel.parent.findChildren(QtWidgets.QWidget)
                if isinstance(w, INTERACTIVE) and w.objectName() and not w.objectName().startswith("qt_")]
    assert len(controls) >= 20
    assert [w.objectName() for w in controls if not w.toolTip()] == []
    for label in panel.parent.findChildren(QtWidgets.QLabel):
        if label.buddy() is not None:
            assert "&" in label.text(), label.objectName()
    assert ui.reportTextEdit.tabChangesFocus() and ui.impressionsTextEdit.tabChangesFocus()

    chain, widget = [], ui.sampleReportComboBox.nextInFocusChain()
    while widget.objectName() != "sampleReportComboBox":
        if isinstance(widget, INTERACTIVE) and widget.objectName() and widget.objectName() not in chain:
            chain.append(widget.objectName())
        widget = widget.nextInFocusChain()
    assert chain[:2] == ["reportTextEdit", "impressionsTextEdit"]
    assert chain.index("outputVolumeSelector") < chain.index("generateButton") < chain.index("saveNiftiButton")

    use_tiny_model(ui, tiny_model, slices=4)
    ui.reportTextEdit.setPlainText("Findings: Normal chest.")
    elsewhere = QtWidgets.QLineEdit()  # another part of the main window that holds the panel
    panel.parent.layout().addWidget(elsewhere)
    panel.parent.activateWindow()
    elsewhere.setFocus()
    QtWidgets.QApplication.processEvents()
    assert QtWidgets.QApplication.focusWidget() is elsewhere
    QtTest.QTest.keyClick(elsewhere, QtCore.Qt.Key_Return, QtCore.Qt.ControlModifier)
    assert ui.generateButton.text() == "&Generate"  # the shortcut belongs to the panel
    ui.reportTextEdit.setFocus()
    QtTest.QTest.keyClick(ui.reportTextEdit, QtCore.Qt.Key_Return, QtCore.Qt.ControlModifier)
    assert ui.generateButton.text() == "&Cancel"  # Ctrl+Enter generates from anywhere in the panel
    wait_until(lambda: ui.generateButton.text() == "&Generate")
    assert ui.statusLabel.text().startswith("Done: 4 slices")


def test_module_description_says_synthetic(qt_application):
    import CTFlowSlicer

    parent = types.SimpleNamespace()
    CTFlowSlicer.CTFlowSlicer(parent)
    assert parent.title == "CTFlow Text-to-CT" and parent.categories == ["Image Synthesis"]
    assert "must not be used for diagnosis" in parent.helpText
    assert "synthetic and not for diagnosis" in parent.acknowledgementText


def test_slicer_self_test_runs(qt_application, scene, tiny_model, dicom_database, capsys):
    """CTFlowSlicerTest is what a user runs in Slicer; here it runs against the stand-in with the session's model."""
    import CTFlowSlicer

    cache = Path(slicer.app.temporaryPath) / "CTFlowSlicerTest"
    cache.mkdir(exist_ok=True)
    (cache / "tiny").symlink_to(tiny_model)
    CTFlowSlicer.CTFlowSlicerTest().runTest()
    assert "Skipped" not in capsys.readouterr().out  # it ran, not skipped for a missing dependency


def test_unload_frees_the_model_and_the_next_run_loads_it_again(panel, tiny_model):
    ui = panel.ui
    generate_normal_chest(ui, tiny_model, slices=4)
    ui.unloadModelButton.click()
    assert ui.statusLabel.text().startswith("The model was unloaded")
    ui.slicesSpinBox.setValue(400)
    ui.generateButton.click()
    wait_until(lambda: ui.progressBar.value() >= 1)
    ui.unloadModelButton.click()  # the worker unloads once this run has ended
    assert ui.statusLabel.text().startswith("The model is unloaded when this generation ends")
    ui.generateButton.click()
    wait_until(lambda: ui.generateButton.text() == "&Generate")
    ui.slicesSpinBox.setValue(4)
    states = []
    ui.generateButton.click()
    wait_until(lambda: states.append(ui.statusLabel.text()) or ui.generateButton.text() == "&Generate")
    assert any(text.startswith("Loading model") for text in states)


def test_save_asks_before_replacing_a_file_the_dialog_did_not_ask_about(panel, tiny_model, monkeypatch, tmp_path):
    """The dialog confirmed "scan"; the suffix makes it "scan.nrrd", which is the user's own file."""
    ui = panel.ui
    generate_normal_chest(ui, tiny_model, slices=4)
    own = tmp_path / "scan.nrrd"
    own.write_bytes(b"the user's own file")
    monkeypatch.setattr(QtWidgets.QFileDialog, "getSaveFileName", lambda *args: (str(tmp_path / "scan"), "NRRD"))
    asked = []
    answer_next_question(QtWidgets.QMessageBox.No, asked)
    ui.saveNrrdButton.click()
    assert asked == [f"{own} exists. Replace it?"] and own.read_bytes() == b"the user's own file"
    assert ui.statusLabel.text() == f"Not saved: {own} exists and was kept."
    answer_next_question(QtWidgets.QMessageBox.Yes, asked)
    ui.saveNrrdButton.click()
    assert len(asked) == 2 and ctflow.read_volume(own).hu.shape == (4, 16, 16)
    monkeypatch.setattr(QtWidgets.QFileDialog, "getSaveFileName", lambda *args: (str(tmp_path / "x.nii"), "NIfTI"))
    ui.saveNiftiButton.click()
    assert (tmp_path / "x.nii.gz").is_file() and not (tmp_path / "x.nii.nii.gz").exists()


def test_leaving_the_module_while_it_generates_keeps_the_volume_for_save(panel, tiny_model):
    """The run goes on while another module is shown; back in the panel, Save acts on the volume it made."""
    ui = panel.ui
    ui.reportTextEdit.setPlainText("Findings: Normal chest.")
    use_tiny_model(ui, tiny_model, slices=10)
    errors = []
    hook, sys.excepthook = sys.excepthook, lambda kind, error, trace: errors.append(error)  # PySide6 slot errors
    try:
        ui.generateButton.click()
        panel.exit()
        wait_until(lambda: not panel.logic.isRunning() and ui.generateButton.text() == "&Generate")
    finally:
        sys.excepthook = hook
    panel.enter()
    node = panel._parameterNode.generatedVolume
    assert errors == [] and node is not None and slices_in(node) == 10
    assert ui.saveNrrdButton.isEnabled() and ui.exportDicomButton.isEnabled()


def test_save_without_the_writers_installed_says_what_to_do(panel, tiny_model, monkeypatch, tmp_path):
    ui = panel.ui
    generate_normal_chest(ui, tiny_model, slices=4)
    monkeypatch.setitem(sys.modules, "nrrd", None)  # a Slicer where pynrrd is not installed yet
    monkeypatch.setattr(QtWidgets.QFileDialog, "getSaveFileName", lambda *args: (str(tmp_path / "ct"), "NRRD"))
    ui.saveNrrdButton.click()
    assert ui.statusLabel.text() == "Could not save: nrrd is not installed yet; click Generate once to install it."


def test_reload_and_test_without_torch_says_skipped_instead_of_failing(qt_application, monkeypatch, capsys):
    import CTFlowSlicer

    monkeypatch.setattr(CTFlowSlicer.dependencies, "missing", lambda: ["torch>=2.5"])
    CTFlowSlicer.CTFlowSlicerTest().runTest()
    assert "Skipped: torch>=2.5 not installed yet" in capsys.readouterr().out


def test_opening_the_panel_never_imports_torch_in_slicers_process(tmp_path):
    """The panel asks the worker process which GPU there is; Slicer's own process never imports torch."""
    script = f"""
import importlib.util, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[2] / "CTFlowSlicer")!r})
spec = importlib.util.spec_from_file_location("standin", {str(Path(__file__).with_name("standin.py"))!r})
standin = importlib.util.module_from_spec(spec); sys.modules["standin"] = standin; spec.loader.exec_module(standin)
application = standin.install({str(tmp_path)!r})
import slicer
slicer.mrmlScene = slicer.vtkMRMLScene()
from PySide6 import QtWidgets
import CTFlowSlicer
window = QtWidgets.QWidget()
widget = CTFlowSlicer.CTFlowSlicerWidget(window)
widget.setup()
deadline = time.monotonic() + 120
while not widget.ui.deviceLabel.text().startswith("Detected:") and time.monotonic() < deadline:
    application.processEvents(); time.sleep(0.02)
print(widget.ui.deviceLabel.text(), "torch" in sys.modules)
widget.cleanup()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert result.stdout.strip().endswith("False") and "Detected:" in result.stdout, result.stdout + result.stderr
