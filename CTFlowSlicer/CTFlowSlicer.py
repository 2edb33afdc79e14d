"""CTFlow in 3D Slicer: type a chest CT report, watch a synthetic CT volume fill the slice views block by block.

Generation runs on a worker thread (CTFlowSlicerLib.logic); a QTimer on the main thread applies each
decoded block to the volume node. torch and ctflow are imported only once installed (CTFlowSlicerLib.dependencies),
so the module loads, and offers to install them, in a bare Slicer.

Qt properties are read with widget.property("name"): the same call works in Slicer's PythonQt and in the
PySide6 stand-in that the panel test runs this file with.
"""

import os
import re
import time
from pathlib import Path

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CTFlowSlicerLib import dependencies, resources
from CTFlowSlicerLib.display import applyWindow
from CTFlowSlicerLib.parameters import OUTPUT_VOLUME, GenerationSettings, newSeed

POLL_INTERVAL_MS = 100
DEVICE_CHOICES = (("auto", "Automatic"), ("cuda", "CUDA GPU"), ("cpu", "CPU"))
MODEL_CHOICES = (("bundled", "Bundled demo model"), ("folder", "Local folder"), ("hub", "Hub id"))
MODEL_PLACEHOLDERS = {"bundled": "", "folder": "model folder", "hub": "org/name or org/name@revision"}
WINDOW_BUTTONS = {"lung": "lungWindowButton", "mediastinum": "mediastinumWindowButton", "bone": "boneWindowButton"}
SAVE_BUTTONS = {"saveNrrdButton": (".nrrd", "NRRD (*.nrrd)"), "saveNiftiButton": (".nii.gz", "NIfTI (*.nii.gz)")}
CANCEL_TOOLTIP = "Stop generating (Ctrl+Enter). The slices already made stay in the scene, marked partial."
ERROR_STYLE = "color: #d32f2f;"

HELP_TEXT = """
Generates a <b>synthetic</b> chest CT volume from the text of a radiology report (Findings and Impressions)
with CTFlow, a latent flow-matching model that writes the volume block by block, like the frames of a video.
The slices appear in the red, yellow and green views as each block is decoded; Cancel keeps what was made.
<br><br>
The report, seed, sampling steps, guidance, model and library version are stored with the volume as node
attributes named CTFlow.* (kept when the scene is saved) and in the header of files saved from the panel.
<br><br>
<b>The output is synthetic. It is not an image of a real patient and must not be used for diagnosis or
treatment.</b>
"""

ACKNOWLEDGEMENT_TEXT = """
Method: CTFlow, by Wang, Reynaud, Erick and Kainz, "CTFlow: Video-Inspired Latent Flow Matching for 3D CT
Synthesis" (ICCV 2025 workshop VLM3D, arXiv 2508.12900). The sample reports are written in the style of the
CT-RATE dataset. This extension is an independent implementation under the Apache-2.0 licence; it is not a
medical device, and every volume it makes is synthetic and not for diagnosis.
"""


class CTFlowSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CTFlow Text-to-CT"
        self.parent.categories = ["Synthetic Data"]
        self.parent.dependencies = []
        self.parent.contributors = ["CTFlow for 3D Slicer contributors"]
        self.parent.helpText = HELP_TEXT
        self.parent.acknowledgementText = ACKNOWLEDGEMENT_TEXT


class CTFlowSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. The parameter node holds its settings; generation itself lives in the logic."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._showingSettings = False  # True while the GUI is being set from the parameter node
        self._running = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CTFlowSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.logic = CTFlowSlicerLogic()
        self._generateTooltip = self.ui.generateButton.property("toolTip")
        self._fillChoices()
        self._connectGUI(uiWidget)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.timeout.connect(self.onPoll)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        qt.QTimer.singleShot(0, self._showDetectedDevice)  # importing torch takes seconds: after the panel is up

    def cleanup(self):
        self.removeObservers()
        self._stopGeneration()

    def enter(self):
        self.initializeParameterNode()

    def onSceneStartClose(self, caller, event):
        self._stopGeneration()
        self._parameterNode = None

    def onSceneEndClose(self, caller, event):
        self.initializeParameterNode()

    def initializeParameterNode(self):
        self._parameterNode = self.logic.getParameterNode()
        settings = GenerationSettings.load(self._parameterNode)
        settings.save(self._parameterNode)  # a fresh node keeps the defaults it is shown with, its new seed included
        self._showSettings(settings)

    # -- set-up -------------------------------------------------------------------------------------------

    def _fillChoices(self):
        ui = self.ui
        ui.sampleReportComboBox.addItem("Choose a sample report ...", "")
        for title, path in resources.sampleReports().items():
            ui.sampleReportComboBox.addItem(title, str(path))
        for combo, choices in ((ui.deviceComboBox, DEVICE_CHOICES), (ui.modelSourceComboBox, MODEL_CHOICES)):
            for key, label in choices:
                combo.addItem(label, key)

    def _connectGUI(self, uiWidget):
        ui = self.ui
        for edit in (ui.reportTextEdit, ui.impressionsTextEdit):
            edit.textChanged.connect(self.updateParameterNodeFromGUI)
        for box in (ui.slicesSpinBox, ui.seedSpinBox, ui.stepsSpinBox, ui.guidanceSpinBox):
            box.valueChanged.connect(self.updateParameterNodeFromGUI)
        for combo in (ui.deviceComboBox, ui.modelSourceComboBox):
            combo.currentIndexChanged.connect(self.updateParameterNodeFromGUI)
        ui.modelLocationLineEdit.textChanged.connect(self.updateParameterNodeFromGUI)
        ui.replaceVolumeRadioButton.toggled.connect(self.updateParameterNodeFromGUI)
        ui.sampleReportComboBox.activated.connect(self.onSampleReport)
        ui.newSeedButton.clicked.connect(self.onNewSeed)
        ui.browseModelButton.clicked.connect(self.onBrowseModel)
        ui.generateButton.clicked.connect(self.onGenerateButton)
        for preset, name in WINDOW_BUTTONS.items():
            getattr(ui, name).clicked.connect(lambda _checked=False, preset=preset: self.onWindow(preset))
        for name, (suffix, fileFilter) in SAVE_BUTTONS.items():
            getattr(ui, name).clicked.connect(lambda _checked=False, s=suffix, f=fileFilter: self.onSave(s, f))
        self._shortcuts = [qt.QShortcut(qt.QKeySequence(keys), uiWidget) for keys in ("Ctrl+Return", "Ctrl+Enter")]
        for shortcut in self._shortcuts:
            shortcut.activated.connect(self.onGenerateButton)

    # -- parameter node <-> GUI ---------------------------------------------------------------------------

    def updateParameterNodeFromGUI(self, *_):
        if self._parameterNode is None or self._showingSettings:
            return
        self._settingsFromGUI().save(self._parameterNode)
        self._updateModelRow()

    def _settingsFromGUI(self) -> GenerationSettings:
        ui = self.ui
        return GenerationSettings(
            report=ui.reportTextEdit.toPlainText(),
            impressions=ui.impressionsTextEdit.toPlainText(),
            slices=ui.slicesSpinBox.property("value"),
            seed=ui.seedSpinBox.property("value"),
            steps=ui.stepsSpinBox.property("value"),
            guidance=ui.guidanceSpinBox.property("value"),
            device=ui.deviceComboBox.property("currentData"),
            modelSource=ui.modelSourceComboBox.property("currentData"),
            modelLocation=ui.modelLocationLineEdit.property("text"),
            replaceOutput=ui.replaceVolumeRadioButton.isChecked(),
            window=next(preset for preset, name in WINDOW_BUTTONS.items() if getattr(ui, name).isChecked()),
        )

    def _showSettings(self, settings: GenerationSettings):
        ui = self.ui
        self._showingSettings = True
        try:
            ui.reportTextEdit.setPlainText(settings.report)
            ui.impressionsTextEdit.setPlainText(settings.impressions)
            ui.slicesSpinBox.setValue(settings.slices)
            ui.seedSpinBox.setValue(settings.seed)
            ui.stepsSpinBox.setValue(settings.steps)
            ui.guidanceSpinBox.setValue(settings.guidance)
            ui.deviceComboBox.setCurrentIndex(max(ui.deviceComboBox.findData(settings.device), 0))
            ui.modelSourceComboBox.setCurrentIndex(max(ui.modelSourceComboBox.findData(settings.modelSource), 0))
            ui.modelLocationLineEdit.setText(settings.modelLocation)
            ui.replaceVolumeRadioButton.setChecked(settings.replaceOutput)
            ui.newVolumeRadioButton.setChecked(not settings.replaceOutput)
            getattr(ui, WINDOW_BUTTONS[settings.window]).setChecked(True)
        finally:
            self._showingSettings = False
        self._updateModelRow()
        self._updateSaveButtons()

    def _updateModelRow(self):
        ui = self.ui
        source = ui.modelSourceComboBox.property("currentData")
        location = ui.modelLocationLineEdit.property("text").strip()
        ui.modelLocationLineEdit.setEnabled(source != "bundled")
        ui.browseModelButton.setEnabled(source == "folder")
        ui.modelLocationLineEdit.setPlaceholderText(MODEL_PLACEHOLDERS[source])
        problem, text = modelStatus(source, location)
        ui.modelStatusLabel.setText(text)
        ui.modelStatusLabel.setStyleSheet(ERROR_STYLE if problem else "")

    def _updateSaveButtons(self):
        hasVolume = self._outputVolume() is not None
        for name in SAVE_BUTTONS:
            getattr(self.ui, name).setEnabled(hasVolume)

    def _outputVolume(self):
        return self._parameterNode.GetNodeReference(OUTPUT_VOLUME) if self._parameterNode is not None else None

    # -- actions ------------------------------------------------------------------------------------------

    def onSampleReport(self, *_):
        combo = self.ui.sampleReportComboBox
        path = combo.property("currentData")
        if path:
            self.ui.reportTextEdit.setPlainText(Path(path).read_text(encoding="utf-8"))
            self.ui.impressionsTextEdit.setPlainText("")

    def onNewSeed(self):
        self.ui.seedSpinBox.setValue(newSeed())

    def onBrowseModel(self):
        start = self.ui.modelLocationLineEdit.property("text")
        folder = qt.QFileDialog.getExistingDirectory(self.parent, "Choose a CTFlow model folder", start)
        if folder:
            self.ui.modelLocationLineEdit.setText(folder)

    def onGenerateButton(self):
        """Generate, or, while generating, cancel. Dependencies are installed here, on first use."""
        if self._running:
            self.logic.generation().cancel()
            self._setStatus("Cancelling: the model stops at its next sampling step ...")
            return
        problem = dependencies.ensure()
        self._showDetectedDevice()
        if problem:
            self._setStatus(problem, error=True)
            return
        settings = GenerationSettings.load(self._parameterNode)
        self.logic.generation().start(settings, self._outputVolume() if settings.replaceOutput else None)
        self._setRunning(True)
        self._timer.start()

    def onPoll(self):
        """Timer tick while generating: apply what the worker made, show progress, fit the views when due."""
        progress = self.logic.generation().poll()
        self._showProgress(progress)
        if progress.firstBlock:
            self._parameterNode.SetNodeReferenceID(OUTPUT_VOLUME, progress.node.GetID())
            self._updateSaveButtons()
            slicer.util.setSliceViewerLayers(fit=True)
        if progress.finished:
            self._timer.stop()
            self._setRunning(False)
            if progress.node is not None:
                slicer.util.setSliceViewerLayers(fit=True)

    def onWindow(self, preset: str):
        self.updateParameterNodeFromGUI()
        volume = self._outputVolume()
        if volume is not None:
            applyWindow(volume, preset)

    def onSave(self, suffix: str, fileFilter: str):
        import ctflow

        volume = self._outputVolume()
        if volume is None:
            self._setStatus("There is no generated volume to save: it was deleted.", error=True)
            return
        name = re.sub(r"[^\w.-]+", "_", volume.GetName()).strip("_") + suffix
        path = qt.QFileDialog.getSaveFileName(
            self.parent, "Save the synthetic CT", os.path.join(qt.QDir.homePath(), name), fileFilter
        )
        if not path:
            return
        if not path.lower().endswith(suffix):
            path += suffix
        try:
            written = self.logic.generation().saveVolume(volume, path)
        except (OSError, ctflow.CTFlowError) as exc:
            self._setStatus(f"Could not save: {exc}", error=True)
            return
        self._setStatus(f"Saved {written} (provenance in the header).")

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
        self.ui.generateButton.setText("&Cancel" if running else "&Generate")
        self.ui.generateButton.setToolTip(CANCEL_TOOLTIP if running else self._generateTooltip)

    def _showDetectedDevice(self):
        self.ui.deviceLabel.setText(dependencies.describeTorch())

    def _stopGeneration(self):
        if self._running:
            self._timer.stop()
            self.logic.generation().stop()
            self._setRunning(False)


def modelStatus(source: str, location: str) -> tuple[bool, str]:
    """(is it a problem, a line for the panel) about the chosen model."""
    if source == "bundled":
        folder = resources.bundledModel()
        return (True, resources.NO_BUNDLED_MODEL) if folder is None else (False, f"Bundled model: {folder.name}.")
    if source == "folder":
        if location and not Path(location).expanduser().is_dir():
            return True, "This folder does not exist."
        return False, "A folder with config.json, model.safetensors and checksums.sha256."
    return False, "Downloaded from the Hugging Face hub on first use (needs internet), then cached."


class CTFlowSlicerLogic(ScriptedLoadableModuleLogic):
    """The module's logic: its parameter node, and the streaming generation once torch and ctflow are installed."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._generation = None

    def generation(self):
        """CTFlowSlicerLib.logic.GenerationLogic, imported here because importing it needs torch and ctflow."""
        if self._generation is None:
            from CTFlowSlicerLib.logic import GenerationLogic

            self._generation = GenerationLogic()
        return self._generation


class CTFlowSlicerTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload and Test, or ctest): streams a tiny random model's volume into the scene."""

    REPORT = "Findings: Moderate right pleural effusion.\nImpressions: Right pleural effusion."

    def setUp(self):
        missing = dependencies.missing()
        if missing:
            self.skipTest(f"{' and '.join(missing)} not installed yet: click Generate once to install")
        slicer.mrmlScene.Clear()

    def runTest(self):
        """What Reload and Test calls; ctest runs the test_ methods itself."""
        for test in (self.test_StreamsVolumeIntoScene, self.test_CancelKeepsPartialVolume):
            self.setUp()
            test()

    def test_StreamsVolumeIntoScene(self):
        progress = self._generate(slices=10)
        node = progress.node
        self.assertEqual(progress.state, "done")
        self.assertEqual(node.GetImageData().GetDimensions()[2], 10)
        self.assertEqual(node.GetAttribute("CTFlow.seed"), "1")
        self.assertEqual(node.GetAttribute("CTFlow.partial"), "False")
        self.assertIn("not for diagnosis", node.GetAttribute("CTFlow.Synthetic"))
        self.delayDisplay("Synthetic volume streamed into the scene")

    def test_CancelKeepsPartialVolume(self):
        progress = self._generate(slices=400, cancelAfterFirstBlock=True)
        node = progress.node
        self.assertEqual(progress.state, "cancelled")
        self.assertLess(node.GetImageData().GetDimensions()[2], 400)
        self.assertEqual(node.GetAttribute("CTFlow.partial"), "True")
        self.delayDisplay("Cancelled generation kept a partial volume")

    def _generate(self, slices: int, cancelAfterFirstBlock: bool = False):
        generation = CTFlowSlicerLogic().generation()
        settings = GenerationSettings(
            report=self.REPORT, slices=slices, seed=1, steps=2, device="cpu", modelSource="folder",
            modelLocation=str(self._tinyModel()),
        )
        generation.start(settings)
        progress = generation.poll()
        while not progress.finished:
            slicer.app.processEvents()
            time.sleep(0.02)
            progress = generation.poll()
            if cancelAfterFirstBlock and progress.node is not None:
                generation.cancel()
        return progress

    @staticmethod
    def _tinyModel() -> Path:
        """A random-weight model of the smallest size, made once in Slicer's temporary folder."""
        folder = Path(slicer.app.temporaryPath) / "CTFlowSlicerTest" / "tiny"
        if not (folder / "config.json").is_file():
            import ctflow

            ctflow.create_random_model(folder, "tiny", overwrite=True)
        return folder
