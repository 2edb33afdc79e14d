"""CTFlow in 3D Slicer: type a chest CT report, watch a synthetic CT volume fill the slice views block by block.

Generation runs in a worker process (`ctflow.worker`, started with Slicer's own Python), never on a thread of
Slicer's: Slicer's embedded Python keeps the GIL while the application idles, so a generation thread would
only run during the panel's own Python calls and crawl. A QTimer on the main thread takes what the worker
said without waiting and applies at most one block per tick to the volume node. The ctflow library is the
extension's own bundled copy; torch and the other third-party packages are installed on first use
(CTFlowSlicerLib.dependencies), so the module loads, and offers to install them, in a bare Slicer.

Qt properties are read with widget.property("name"): the same call works in Slicer's PythonQt and in the
PySide6 stand-in that the panel test runs this file with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.util import VTKObservationMixin

from CTFlowSlicerLib import dependencies, resources

resources.useBundledLibrary()  # ctflow comes from the extension itself, for the panel and for the worker

import ctflow  # noqa: E402 - the bundled copy; torch-free until a model is needed, which only the worker does
from ctflow.report import reading_of  # noqa: E402
from ctflow.worker import WorkerProcess  # noqa: E402

from CTFlowSlicerLib import dicom_export, generation  # noqa: E402
from CTFlowSlicerLib.display import SLICE_VIEW_WINDOWS, applyWindow  # noqa: E402
from CTFlowSlicerLib.generation import Progress, Run  # noqa: E402
from CTFlowSlicerLib.parameters import (  # noqa: E402
    CTFlowSlicerParameterNode, Device, ModelSource, PlainTextConnector, newSeed,
)

POLL_INTERVAL_MS = 100
CANCEL_GRACE_S = 3.0  # a cancelled run stops within a sampling step; a worker silent this long (or twice its
# slowest block so far) is ended
RUN_ENDINGS = ("done", "cancelled", "error")  # the worker's last message about a run
MODEL_PLACEHOLDERS = {"bundled": "", "folder": _("model folder"), "hub": _("org/name or org/name@revision")}
WINDOW_BUTTONS = {name: f"{name}WindowButton" for name in SLICE_VIEW_WINDOWS}
SAVE_BUTTONS = {"saveNrrdButton": (".nrrd", "NRRD (*.nrrd)"), "saveNiftiButton": (".nii.gz", "NIfTI (*.nii.gz)")}
CANCELLING = _("Cancelling: the model stops at its next sampling step ...")
CANCEL_TOOLTIP = _("Stop generating (Ctrl+Enter). The slices already made stay in the scene, marked partial.")
ERROR_STYLE = "color: #d32f2f;"

HELP_TEXT = _("""
Generates a <b>synthetic</b> chest CT volume from the text of a radiology report (Findings and Impressions)
with CTFlow, a latent flow-matching model that writes the volume block by block, like the frames of a video.
The slices appear in the red, yellow and green views as each block is decoded; Cancel keeps what was made.
<br><br>
The report, seed, sampling steps, guidance, side guidance, model and library version are stored with the volume
as node attributes named CTFlow.* (kept when the scene is saved) and in the header of files saved from the panel.
Export DICOM writes a series marked Synthetic Data YES and adds it to Slicer's DICOM database, from where the
DICOM module sends it to a PACS.
<br><br>
<b>The output is synthetic. It is not an image of a real patient and must not be used for diagnosis or
treatment.</b>
""")

ACKNOWLEDGEMENT_TEXT = _("""
Method: CTFlow, by Wang, Reynaud, Erick and Kainz, "CTFlow: Video-Inspired Latent Flow Matching for 3D CT
Synthesis" (ICCV 2025 workshop VLM3D, arXiv 2508.12900). The sample reports are written in the style of the
CT-RATE dataset. This extension is an independent implementation under the Apache-2.0 licence; it is not a
medical device, and every volume it makes is synthetic and not for diagnosis.
""")


class CTFlowSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CTFlow Text-to-CT")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Image Synthesis")]
        self.parent.dependencies = []
        self.parent.contributors = ["CTFlow for 3D Slicer contributors"]
        self.parent.helpText = HELP_TEXT
        self.parent.acknowledgementText = ACKNOWLEDGEMENT_TEXT


class CTFlowSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: its widgets are bound to the parameter node (SlicerParameterName); generation is the Logic's."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTags = []
        self._running = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CTFlowSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # only volumes CTFlow made can be overwritten (the Logic refuses any other): only they are offered
        self.ui.outputVolumeSelector.addAttribute("vtkMRMLScalarVolumeNode", generation.SYNTHETIC_ATTRIBUTE)
        self.ui.outputVolumeSelector.setMRMLScene(slicer.mrmlScene)
        self.logic = CTFlowSlicerLogic()
        self._generateTooltip = self.ui.generateButton.property("toolTip")
        self._connectGUI(uiWidget)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.timeout.connect(self.onPoll)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        try:
            if not dependencies.missing():  # the worker imports torch, which takes seconds, and reports the GPU
                self.logic.startWorker()
                self._timer.start()
            self._showDetectedDevice()
        except (ctflow.CTFlowError, OSError) as exc:  # no PythonSlicer, or it cannot be started
            self.ui.deviceLabel.setText(str(exc))

    def cleanup(self):
        self.removeObservers()
        self._timer.stop()
        self.logic.shutdown()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self._stopGeneration()  # returns at once: the worker stops the run by itself
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, parameterNode):
        """Bind the panel's widgets to `parameterNode` (or unbind them, None)."""
        if self._parameterNode is not None:
            for tag in self._parameterNodeGuiTags:
                self._parameterNode.disconnectGui(tag)
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self.onParametersChanged)
        self._parameterNode = parameterNode
        if parameterNode is not None:
            self._parameterNodeGuiTags = [parameterNode.connectGui(self.ui), parameterNode.connectParametersToGui(
                {"report": PlainTextConnector(self.ui.reportTextEdit),
                 "impressions": PlainTextConnector(self.ui.impressionsTextEdit)})]
            self.addObserver(parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParametersChanged)
            self.onParametersChanged()

    def onParametersChanged(self, *_):
        """What the parameters decide beyond the bound widgets: the report's reading, the model row, the window
        buttons, Save, Export."""
        parameters = self._parameterNode
        self._updateReading()
        self._updateModelRow()
        getattr(self.ui, WINDOW_BUTTONS.get(parameters.window, "lungWindowButton")).setChecked(True)
        self._updateWriteButtons()

    # -- set-up -------------------------------------------------------------------------------------------

    def _connectGUI(self, uiWidget):
        ui = self.ui
        ui.sampleReportComboBox.addItem(_("Choose a sample report ..."), "")
        for title, path in resources.sampleReports().items():
            ui.sampleReportComboBox.addItem(title, str(path))
        ui.sampleReportComboBox.activated.connect(self.onSampleReport)
        ui.newSeedButton.clicked.connect(self.onNewSeed)
        ui.browseModelButton.clicked.connect(self.onBrowseModel)
        ui.unloadModelButton.clicked.connect(self.onUnloadModel)
        ui.generateButton.clicked.connect(self.onGenerateButton)
        for preset, name in WINDOW_BUTTONS.items():
            getattr(ui, name).clicked.connect(lambda _checked=False, preset=preset: self.onWindow(preset))
        for name, (suffix, fileFilter) in SAVE_BUTTONS.items():
            getattr(ui, name).clicked.connect(lambda _checked=False, s=suffix, f=fileFilter: self.onSave(s, f))
        ui.exportDicomButton.clicked.connect(self.onExportDicom)
        self._shortcuts = [qt.QShortcut(qt.QKeySequence(keys), uiWidget) for keys in ("Ctrl+Return", "Ctrl+Enter")]
        for shortcut in self._shortcuts:
            shortcut.setContext(qt.Qt.WidgetWithChildrenShortcut)  # the panel's, not the whole main window's
            shortcut.activated.connect(self.onGenerateButton)

    def _updateWriteButtons(self):
        """Save: a volume CTFlow made (its file is marked synthetic), even while it grows. Export DICOM: the
        same, once no generation is running."""
        volume = self._parameterNode.generatedVolume if self._parameterNode is not None else None
        made = volume is not None and generation.madeByCTFlow(volume)
        for name in SAVE_BUTTONS:
            getattr(self.ui, name).setEnabled(made)
        self.ui.exportDicomButton.setEnabled(made and not self._running)

    def _updateReading(self):
        """What the report is read to say, as it is typed (ctflow.report.reading_of): what side and finding guidance
        will follow, so a misread word shows before Generate."""
        parameters = self._parameterNode
        try:
            said = reading_of(ctflow.parse_report(parameters.report, parameters.impressions))
        except ctflow.ReportError:  # empty: nothing to read yet
            said = ""
        self.ui.readingLabel.setText(said)

    def _updateModelRow(self):
        ui, parameters = self.ui, self._parameterNode
        source = parameters.modelSource.value
        ui.modelLocationLineEdit.setEnabled(source != "bundled")
        ui.browseModelButton.setEnabled(source == "folder")
        ui.modelLocationLineEdit.setPlaceholderText(MODEL_PLACEHOLDERS[source])
        problem, text = modelStatus(parameters)
        ui.modelStatusLabel.setText(text)
        ui.modelStatusLabel.setStyleSheet(ERROR_STYLE if problem else "")

    # -- actions ------------------------------------------------------------------------------------------

    def onSampleReport(self, *_args):
        """Load the chosen sample, after asking when that would replace what the user wrote. The box goes back to
        its placeholder: a menu, so a sample can be chosen again (and a stray wheel turn asks before it replaces)."""
        combo, parameters = self.ui.sampleReportComboBox, self._parameterNode
        path = combo.property("currentData")
        combo.setCurrentIndex(0)
        if not path:
            return
        samples = {p.read_text(encoding="utf-8") for p in resources.sampleReports().values()}
        written = (parameters.report.strip() or parameters.impressions.strip()) and not (
            parameters.report in samples and not parameters.impressions.strip())
        if written and qt.QMessageBox.question(
                self.parent, _("Replace the report?"), _("Replace the report you wrote with the sample report?"),
                qt.QMessageBox.Yes | qt.QMessageBox.No, qt.QMessageBox.No) != qt.QMessageBox.Yes:
            return
        parameters.report = Path(path).read_text(encoding="utf-8")
        parameters.impressions = ""

    def onNewSeed(self):
        self._parameterNode.seed = newSeed()

    def onBrowseModel(self):
        folder = qt.QFileDialog.getExistingDirectory(self.parent, _("Choose a CTFlow model folder"),
                                                     self._parameterNode.modelLocation)
        if folder:
            self._parameterNode.modelLocation = folder

    def onUnloadModel(self):
        if not self.logic.unloadModel():
            self._setStatus(_("No model is loaded."))
        elif self._running:
            self._setStatus(_("The model is unloaded when this generation ends; the next Generate loads it again."))
        else:
            self._setStatus(_("The model was unloaded; the next Generate loads it again."))

    def onGenerateButton(self):
        """Generate, or, while generating, cancel. Dependencies are installed here, on first use."""
        if self._running:
            self.logic.cancel()
            self.ui.generateButton.setEnabled(False)  # until the run has ended
            self._setStatus(CANCELLING)
            return
        if dependencies.installing():  # Generate pressed again during an install, ours or another extension's
            self._setStatus(dependencies.INSTALLING)
            return
        self.ui.generateButton.setEnabled(False)
        try:
            problem = dependencies.ensure()
        finally:
            self.ui.generateButton.setEnabled(True)
        if problem:
            self._setStatus(problem, error=True)
            return
        self.logic.start(self._parameterNode)
        self._setRunning(True)
        self._timer.start()

    def onPoll(self):
        """Timer tick: apply what the worker made, show progress, fit the views when due. Never waits."""
        self._showDetectedDevice()
        if not self._running:
            if not self.logic.workerStarting():
                self._timer.stop()
            return
        progress = self.logic.poll()
        self._showProgress(progress)
        if progress.firstBlock:
            slicer.util.setSliceViewerLayers(fit=True)
        if progress.finished:
            self._setRunning(False)
            if progress.node is not None:
                slicer.util.setSliceViewerLayers(fit=True)

    def onWindow(self, preset: str):
        self._parameterNode.window = preset
        volume = self._parameterNode.generatedVolume
        if volume is not None:
            applyWindow(volume, preset)

    def onSave(self, suffix: str, fileFilter: str):
        volume = self._parameterNode.generatedVolume
        if volume is None:
            self._setStatus(_("There is no generated volume to save: it was deleted."), error=True)
            return
        path = qt.QFileDialog.getSaveFileName(
            self.parent, _("Save the synthetic CT"), os.path.join(qt.QDir.homePath(), fileName(volume, suffix)),
            fileFilter
        )
        if not path:
            return
        asked = path.lower().endswith(suffix)  # the dialog asked before replacing this very name
        path = withSuffix(path, suffix)
        try:
            try:
                written = self.logic.saveVolume(volume, path, overwrite=asked)
            except ctflow.OutputExistsError:
                if not self._confirmReplace(path, _("Replace the file?"), _("{path} exists. Replace it?")):
                    self._setStatus(_("Not saved: {path} exists and was kept.").format(path=path))
                    return
                written = self.logic.saveVolume(volume, path, overwrite=True)
        except (ImportError, OSError, ctflow.CTFlowError) as exc:
            self._setStatus(_("Could not save: {error}").format(error=writeError(exc)), error=True)
            return
        self._setStatus(_("Saved {path} (provenance in the header).").format(path=written))

    def onExportDicom(self):
        """Write the series into a folder named after the volume, in a folder the user picks; then the database."""
        volume = self._parameterNode.generatedVolume
        if volume is None:
            self._setStatus(_("There is no generated volume to export: it was deleted."), error=True)
            return
        parent = qt.QFileDialog.getExistingDirectory(
            self.parent, _("Choose the folder to write the DICOM series in (as a folder named after the volume)"),
            qt.QDir.homePath()
        )
        if not parent:
            return
        folder = os.path.join(parent, fileName(volume, ".dcm"))
        try:
            export = self._writeSeries(volume, folder)
        except (ImportError, OSError, ctflow.CTFlowError) as exc:
            self._setStatus(_("Could not export: {error}").format(error=writeError(exc)), error=True)
            return
        if export is None:
            self._setStatus(_("Not exported: {folder} exists and was kept.").format(folder=folder))
            return
        self._setStatus(export.message)

    def _writeSeries(self, volume, folder: str):
        """The export; a folder that exists is replaced only when the user says so (else None)."""
        try:
            with waitCursor():
                return self.logic.exportDicom(volume, folder)
        except ctflow.OutputExistsError:
            if not self._confirmReplace(folder, _("Replace the DICOM series?"),
                                        _("{path} exists. Replace it with this series? A folder that holds anything "
                                          "but DICOM files is never replaced.")):
                return None
        with waitCursor():
            return self.logic.exportDicom(volume, folder, overwrite=True)

    def _confirmReplace(self, path: str, title: str, question: str) -> bool:
        answer = qt.QMessageBox.question(self.parent, title, question.format(path=path),
                                         qt.QMessageBox.Yes | qt.QMessageBox.No, qt.QMessageBox.No)
        return answer == qt.QMessageBox.Yes

    # -- display ------------------------------------------------------------------------------------------

    def _showProgress(self, progress):
        bar = self.ui.progressBar
        if progress.blocksExpected:
            bar.setMaximum(progress.blocksExpected)
            bar.setValue(progress.blocksDone)
            bar.setFormat(progress.barText)
        elif progress.finished:  # ended before the first block
            bar.setMaximum(1)
            bar.setValue(0)
            bar.setFormat("")
        else:
            bar.setMaximum(0)  # busy: loading the model or making the first block
        self._setStatus(progress.message, error=progress.state == "failed")

    def _setStatus(self, text: str, error: bool = False):
        self.ui.statusLabel.setText(text)
        self.ui.statusLabel.setStyleSheet(ERROR_STYLE if error else "")

    def _setRunning(self, running: bool):
        self._running = running
        self.ui.generateButton.setEnabled(True)
        self.ui.generateButton.setText(_("&Cancel") if running else _("&Generate"))
        self.ui.generateButton.setToolTip(CANCEL_TOOLTIP if running else self._generateTooltip)
        self._updateWriteButtons()

    def _showDetectedDevice(self):
        self.ui.deviceLabel.setText(self.logic.deviceDescription())

    def _stopGeneration(self):
        if self._running:
            self.logic.stop()
            self._setRunning(False)


def fileName(volume, suffix: str) -> str:
    """The volume's name as a file name: what the save and export dialogs propose."""
    return re.sub(r"[^\w.-]+", "_", volume.GetName()).strip("_") + suffix


def withSuffix(path: str, suffix: str) -> str:
    """The path the user typed with the format's suffix: "scan" and "scan.nii" become "scan.nii.gz"."""
    lower, first = path.lower(), suffix.rsplit(".", 1)[0]  # ".nii" of ".nii.gz"; "" of ".nrrd"
    if lower.endswith(suffix):
        return path
    return path + suffix[len(first):] if first and lower.endswith(first) else path + suffix


def writeError(exc: Exception) -> str:
    """The line for a write that failed; a writer's missing package is installed with the rest on first Generate."""
    if isinstance(exc, ImportError):
        return _("{name} is not installed yet; click Generate once to install it.").format(name=exc.name)
    return str(exc)


@contextlib.contextmanager
def waitCursor():
    qt.QApplication.setOverrideCursor(qt.QCursor(qt.Qt.WaitCursor))
    try:
        yield
    finally:
        qt.QApplication.restoreOverrideCursor()


def modelStatus(parameters) -> tuple[bool, str]:
    """(is it a problem, a line for the panel) about the chosen model: what generation.modelChoice says."""
    try:
        model, revision = generation.modelChoice(parameters, resources.bundledModel())
    except ctflow.ModelError as exc:
        source = parameters.modelSource.value
        if source == "bundled" or parameters.modelLocation.strip():
            return True, str(exc)[:1].upper() + str(exc)[1:]
        return False, {"folder": _("A folder with config.json, model.safetensors and checksums.sha256."),
                       "hub": _("A hub id such as org/name, optionally org/name@revision.")}[source]
    if parameters.modelSource.value == "bundled":
        return False, _("Bundled model: {name}.").format(name=Path(model).name)
    if parameters.modelSource.value == "hub":
        return False, _("Downloaded from the Hugging Face hub on first use (needs internet), then cached.")
    return False, _("Model folder found.")


class CTFlowSlicerLogic(ScriptedLoadableModuleLogic):
    """The module's API, without GUI: generate what a parameter node asks into a volume node, one block per poll().

    The worker process is started on first use and kept, with its model loaded, for the next runs; a worker
    that died is replaced at the next start(). Every call but shutdown() returns at once: nothing here waits on a
    running worker.

        logic = CTFlowSlicerLogic()
        parameters = logic.getParameterNode()           # CTFlowSlicerParameterNode
        parameters.report = "Findings: ..."
        logic.start(parameters)
        while not (progress := logic.poll()).finished:   # the panel calls poll() from a QTimer
            slicer.app.processEvents()
        progress.node                                    # the vtkMRMLScalarVolumeNode, also parameters.generatedVolume
        logic.exportDicom(progress.node, "chest.dcm")     # a series marked synthetic, added to the DICOM database
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._worker: WorkerProcess | None = None
        self._workerInfo: dict | None = None  # the worker's "ready" message: versions and the GPU it sees
        self._run: Run | None = None
        self._abandoned: dict[str, Path | None] = {}  # runs dropped by stop(): their folders go when they end
        self._inbox: list[dict] = []  # what the worker said that poll() has not handled yet
        self._runIds = itertools.count(1)
        self._modelLoaded = False  # the worker holds a model: a run of it got as far as its plan

    def getParameterNode(self) -> CTFlowSlicerParameterNode:
        """The module's parameter node; a new one draws a fresh seed."""
        node = ScriptedLoadableModuleLogic.getParameterNode(self)
        fresh = "seed" not in node.GetParameterNames()
        parameters = CTFlowSlicerParameterNode(node)
        if fresh:
            parameters.seed = newSeed()
        return parameters

    # -- the worker process -----------------------------------------------------------------------------------

    def startWorker(self) -> None:
        """Start the worker unless one is running. Loads no model: that waits for the first run. Raises
        ctflow.CTFlowError when Slicer's Python cannot be found."""
        if self._worker is not None and self._worker.returncode is None and not self._worker.ended:
            return
        if self._worker is not None:
            self._worker.kill()
        folder = Path(slicer.app.temporaryPath) / "CTFlow"
        folder.mkdir(parents=True, exist_ok=True)
        self._worker = WorkerProcess(python=workerPython(), log=folder / "worker.log",
                                     path=(str(resources.ctflowLibrary()),))
        self._workerInfo = None
        self._inbox = []
        self._modelLoaded = False

    def deviceDescription(self) -> str:
        """One line for the panel: the torch in the worker and the accelerator it sees."""
        self._receive()
        info = self._workerInfo
        if info is None and self._worker is not None and self._worker.ended:
            return _("The generation process stopped before it could detect PyTorch and the GPU ({exit}); last "
                     "words: {said}. The next Generate starts a new one.").format(**self._lastWords())
        if info is None:
            return _("Detecting PyTorch and the GPU ...") if self._worker is not None else \
                _("PyTorch and the GPU are detected when the generation process starts (at the first Generate).")
        version = info["torch_version"]
        if info["cuda"]:
            return _("Detected: {gpu}, {memory:.0f} GB (PyTorch {version}).").format(
                gpu=info["gpu"], memory=info["gpu_memory_gb"], version=version)
        if version.endswith("+cpu"):
            return _("Detected: CPU only: this PyTorch ({version}) is a CPU-only build; for an NVIDIA GPU, reinstall "
                     "PyTorch with the PyTorch extension.").format(version=version)
        return _("Detected: no CUDA GPU, CPU only (PyTorch {version}).").format(version=version)

    def workerStarting(self) -> bool:
        """True until the worker has said which torch and GPU it has (or has died trying)."""
        self._receive()
        return self._worker is not None and self._workerInfo is None and not self._worker.ended

    def unloadModel(self) -> bool:
        """Free the model's memory (GPU memory included); the next run loads it again. The worker does so once a
        running generation ends. False: no model is loaded, nor is one being loaded for a run."""
        if self._worker is None or self._worker.ended or not (self._modelLoaded or self.isRunning()):
            return False
        self._worker.send({"type": "unload"})
        self._modelLoaded = False
        return True

    def shutdown(self) -> None:
        """Slicer is closing or the module is reloaded: the worker gets a second to exit, then it is ended."""
        self.stop()
        if self._worker is not None:
            self._worker.close(timeout=1.0)
            self._worker = None
        for folder in self._abandoned.values():
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        self._abandoned.clear()

    # -- runs -------------------------------------------------------------------------------------------------

    def start(self, settings: CTFlowSlicerParameterNode) -> None:
        """Begin generating; progress, the volume and errors arrive through poll(). Its outputVolume, if set, is
        overwritten; else a new volume is made."""
        if self.isRunning():
            raise RuntimeError("a generation is already running; cancel it first")
        replace = settings.outputVolume
        run = Run(f"run-{next(self._runIds)}", settings, replace, Progress("starting", _("Starting ...")))
        self._run = run
        try:
            ctflow.parse_report(settings.report, settings.impressions)  # a bad report fails before a slow start
            if replace is not None and not generation.madeByCTFlow(replace):
                raise ctflow.CTFlowError(
                    f"{replace.GetName()} was not made by CTFlow: Generate overwrites only a volume CTFlow made "
                    "(a synthetic one); choose it, or \"Create a new volume\", under Output volume")
            model, revision = generation.modelChoice(settings, resources.bundledModel())
            self.startWorker()
        except (ctflow.CTFlowError, OSError) as exc:  # OSError: the worker's program could not be started
            run.finish("failed", str(exc))
            return
        if self._workerInfo is None:
            run.progress.message = _("Starting the generation process ...")
        self._worker.send({"type": "generate", "id": run.runId, "model": model, "revision": revision,
                           "device": settings.device.value, "request": generation.requestFields(settings)})

    def isRunning(self) -> bool:
        return self._run is not None and not self._run.progress.finished

    def cancel(self) -> None:
        """Ask the worker to stop: it does within one sampling step, or after the block decode or model load it is
        in; the blocks made stay, marked partial. A worker that has not stopped within twice the longest it took
        to make a block of this run (CANCEL_GRACE_S at least) is ended; one still loading the model has nothing to
        keep and gets CANCEL_GRACE_S."""
        run = self._run
        if self.isRunning() and run.cancelledAt is None:
            run.cancelledAt = time.monotonic()
            making = run.cancelledAt - run.lastHeard if run.progress.state == "generating" else 0.0  # this block
            run.cancelGrace = max(CANCEL_GRACE_S, 2 * max(run.slowest, making))
            run.progress.message = CANCELLING
            self._worker.send({"type": "cancel", "id": run.runId})

    def stop(self) -> None:
        """Cancel and forget the run at once (the scene or the panel is going away); its files go when it ends,
        at once if the worker has already said so."""
        self._receive()
        run, self._run = self._run, None
        if run is None or run.progress.finished:
            return
        said = [message for message in self._inbox if message.get("id") == run.runId]
        self._inbox = [message for message in self._inbox if message.get("id") != run.runId]
        folder = next((Path(m["folder"]) for m in said if m["type"] == "planned"), run.folder)
        if self._ended(run.runId, said) or self._worker is None:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            return
        self._worker.send({"type": "cancel", "id": run.runId})
        self._abandoned[run.runId] = folder

    def _ended(self, runId: str, messages: list[dict] | None = None) -> bool:
        """Whether the worker's messages not yet handled (or `messages`) hold the run's end."""
        return any(m.get("id") == runId and m["type"] in RUN_ENDINGS for m in
                   (self._inbox if messages is None else messages))

    def poll(self) -> Progress:
        """Apply what the worker said since the last call, up to one block or the start of a model load (so the
        panel shows that it is loading even when the load is quick); returns a snapshot. Never waits."""
        self._receive()
        run = self._run
        if run is None:
            return Progress()
        run.progress.firstBlock = False
        while not run.progress.finished and self._inbox:
            message = self._inbox.pop(0)
            try:
                self._handle(run, message)
            except Exception as exc:  # a block the volume cannot take: stop there, keep what it has (partial)
                self._failedToApply(run, message, exc)
            if message["type"] in ("block", "loading"):
                break
        if run.progress.firstBlock:  # on the run's parameter node, so it holds while the panel is away
            run.settings.generatedVolume = run.progress.node
        if not run.progress.finished:
            if not self._inbox and self._worker.ended:
                self._workerDied(run)
            elif run.cancelledAt is not None and time.monotonic() - run.cancelledAt > run.cancelGrace \
                    and not self._ended(run.runId):  # its end may wait behind blocks a busy main thread left
                self._worker.kill()
                run.finish("cancelled", f"The generation process did not stop within {run.cancelGrace:.0f} s "
                                        "and was ended; the next Generate starts a new one.")
            else:
                run.progress.elapsed = time.perf_counter() - run.started
        if run.progress.finished and run.folder is not None:
            shutil.rmtree(run.folder, ignore_errors=True)
        return dataclasses.replace(run.progress)

    def _receive(self) -> None:
        if self._worker is None:
            return
        for message in self._worker.messages():
            if message["type"] == "ready":
                self._workerInfo = message
            elif message.get("id") in self._abandoned:
                if message["type"] in RUN_ENDINGS:
                    folder = self._abandoned.pop(message["id"])
                    if folder is not None:
                        shutil.rmtree(folder, ignore_errors=True)
                elif message["type"] == "planned":
                    self._abandoned[message["id"]] = Path(message["folder"])
            elif message["type"] != "unloaded":
                self._inbox.append(message)

    def _handle(self, run: Run, message: dict) -> None:
        kind = message["type"]
        if message.get("id") != run.runId:
            if kind == "error":  # not about a run: the worker did not understand us
                logging.error("CTFlow worker: %s", message["message"])
            return
        heard = time.monotonic()
        if kind == "block":  # the time it took to make (and decode) this block
            run.slowest = max(run.slowest, heard - run.lastHeard)
        run.lastHeard = heard
        if kind == "loading":
            run.onLoading(message)
        elif kind == "planned":
            self._modelLoaded = True
            run.onPlanned(message)
        elif kind == "block":
            run.onBlock(message)
        elif kind == "done":
            run.finish("done")
        elif kind == "cancelled":
            run.finish("cancelled")
        elif kind == "error":
            run.finish("failed", message["message"])

    def _failedToApply(self, run: Run, message: dict, exc: Exception) -> None:
        """The worker's message could not be applied to the scene: the run ends failed with the volume it has, and
        the worker stops it (its files go when it says so)."""
        logging.exception("CTFlow: applying the worker's %r message failed", message["type"])
        run.finish("failed", f"the {message['type']} the generation process sent could not be applied "
                             f"({ctflow.errors.first_line(exc)})")
        if self._worker is not None and not self._worker.ended:
            self._worker.send({"type": "cancel", "id": run.runId})
            self._abandoned[run.runId] = run.folder

    def _workerDied(self, run: Run) -> None:
        run.finish("failed", "the generation process stopped unexpectedly ({exit}); last words: {said}. The next "
                             "Generate starts a new one.".format(**self._lastWords()))

    def _lastWords(self) -> dict:
        """How the worker that ended exited ("exit") and the last it wrote ("said")."""
        worker = self._worker
        try:
            code = worker.process.wait(1.0)
        except Exception:  # still exiting after closing its output: say so without the code
            code = None
        said = worker.log_tail() or (f"its last message was {worker.last_message['type']!r}"
                                     if worker.last_message else "it said nothing")
        return {"exit": describeExit(code), "said": said}

    # -- volumes ----------------------------------------------------------------------------------------------

    provenanceOf = staticmethod(generation.provenanceOf)
    saveVolume = staticmethod(generation.saveVolume)
    exportDicom = staticmethod(dicom_export.exportDicom)  # (node, folder, overwrite=False) -> DicomExport


def workerPython() -> str:
    """Slicer's own Python launcher (it sets up Slicer's environment): on the PATH or beside the application;
    outside Slicer, this interpreter. Never the Slicer application itself, which would open a second window."""
    found = shutil.which("PythonSlicer") or shutil.which("PythonSlicer", path=str(Path(sys.executable).parent))
    if found:
        return found
    if Path(sys.executable).name.lower().startswith("python"):
        return sys.executable
    raise ctflow.CTFlowError(
        f"Slicer's Python launcher (PythonSlicer) is not beside {sys.executable}: reinstall Slicer")


def describeExit(code: int | None) -> str:
    if code is None:
        return "exit code unknown"
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = ": out of memory, or ended by another program" if name == "SIGKILL" else ""
        return f"exit code {code}, killed by {name}{hint}"
    return f"exit code {code}"


class CTFlowSlicerTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload and Test, or ctest): streams a tiny random model's volume into the scene."""

    REPORT = "Findings: Moderate right pleural effusion.\nImpressions: Right pleural effusion."

    def setUp(self):
        if self.missing():
            self.skipTest(self.missing())
        slicer.mrmlScene.Clear()

    def runTest(self):
        """What Reload and Test calls (it would show a skip as a failure, so it says why and returns)."""
        if self.missing():
            self.delayDisplay(f"Skipped: {self.missing()}")
            return
        for test in (self.test_StreamsVolumeIntoScene, self.test_CancelKeepsPartialVolume):
            self.setUp()
            test()

    @staticmethod
    def missing() -> str:
        missing = dependencies.missing()
        return f"{', '.join(missing)} not installed yet: click Generate once to install" if missing else ""

    def test_StreamsVolumeIntoScene(self):
        progress = self._generate(slices=10)
        node = progress.node
        self.assertEqual(progress.state, "done")
        self.assertEqual(node.GetImageData().GetDimensions()[2], 10)
        self.assertEqual(node.GetAttribute("CTFlow.seed"), "1")
        self.assertEqual(node.GetAttribute("CTFlow.partial"), "False")
        self.assertIn("not for diagnosis", node.GetAttribute("CTFlow.Synthetic"))
        self.delayDisplay("Synthetic volume streamed into the scene")
        import pydicom
        from DICOMLib import DICOMUtils

        folder = Path(tempfile.mkdtemp(dir=slicer.app.temporaryPath)) / "series.dcm"
        with DICOMUtils.TemporaryDICOMDatabase() as database:  # the user's own database stays untouched
            export = CTFlowSlicerLogic.exportDicom(node, folder, database=database)
            self.assertTrue(export.imported, export.message)
            self.assertEqual(export.instances, 10)
            uid = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID
            self.assertEqual(len(database.filesForSeries(uid)), 10)  # copied into the database and indexed
        self.delayDisplay("Exported as a synthetic DICOM series into a temporary DICOM database")

    def test_CancelKeepsPartialVolume(self):
        progress = self._generate(slices=400, cancelAfterFirstBlock=True)
        node = progress.node
        self.assertEqual(progress.state, "cancelled")
        self.assertLess(node.GetImageData().GetDimensions()[2], 400)
        self.assertEqual(node.GetAttribute("CTFlow.partial"), "True")
        self.delayDisplay("Cancelled generation kept a partial volume")

    def _generate(self, slices: int, cancelAfterFirstBlock: bool = False):
        logic = CTFlowSlicerLogic()
        settings = logic.getParameterNode()
        settings.report, settings.slices, settings.seed, settings.steps = self.REPORT, slices, 1, 2
        settings.device, settings.modelSource = Device.CPU, ModelSource.FOLDER
        settings.modelLocation = str(self._tinyModel())
        try:
            logic.start(settings)
            progress = logic.poll()
            while not progress.finished:
                slicer.app.processEvents()
                time.sleep(0.02)
                progress = logic.poll()
                if cancelAfterFirstBlock and progress.node is not None:
                    logic.cancel()
        finally:
            logic.shutdown()
        return progress

    @staticmethod
    def _tinyModel() -> Path:
        """A random-weight model of the smallest size, made once in Slicer's temporary folder (by Slicer's Python,
        as the worker would: importing torch here is fine in a test)."""
        folder = Path(slicer.app.temporaryPath) / "CTFlowSlicerTest" / "tiny"
        if not (folder / "config.json").is_file():
            from ctflow.testing import create_random_model

            create_random_model(folder, "tiny", overwrite=True)
        return folder
