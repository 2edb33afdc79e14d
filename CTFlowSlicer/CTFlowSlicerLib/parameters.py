"""The module's parameter node: one generation request as the panel shows it, kept in the scene, so a saved
scene reopens with the same request. The .ui binds its widgets to these fields by their SlicerParameterName, but
for the two report boxes (PlainTextConnector)."""

from __future__ import annotations

import enum
import random
from typing import Annotated

from ctflow.conventions import MAX_GUIDANCE, MAX_SLICES, MAX_STEPS
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, Decimals, GuiConnector, SingleStep, WithinRange, parameterNodeWrapper

from .display import SLICE_VIEW_WINDOWS

MAX_SEED = 2**31 - 1  # what a Qt spin box can hold


class Device(str, enum.Enum):
    AUTO = "auto"
    CUDA = "cuda"
    CPU = "cpu"

    def label(self) -> str:
        return {"auto": "Automatic", "cuda": "CUDA GPU", "cpu": "CPU"}[self.value]


class ModelSource(str, enum.Enum):
    BUNDLED = "bundled"
    FOLDER = "folder"
    HUB = "hub"

    def label(self) -> str:
        return {"bundled": "Bundled demo model", "folder": "Local folder", "hub": "Hub id"}[self.value]


def newSeed() -> int:
    return random.SystemRandom().randrange(MAX_SEED + 1)


@parameterNodeWrapper
class CTFlowSlicerParameterNode:
    """Zero means "automatic" or "the model's default".

    report - Findings, or a whole report with Findings and Impressions headers.
    slices - 0: the model decides where the volume ends.
    sideGuidance - -1: the model's default (0 turns side guidance off).
    findingGuidance - -1: the model's default (0 turns finding guidance off).
    modelLocation - a model folder, or a hub id "org/name" with an optional "@revision".
    outputVolume - the volume Generate overwrites; None: a new volume each time.
    window - one of display.SLICE_VIEW_WINDOWS, for the current and the next volumes.
    generatedVolume - the volume generated last: what Save and the window buttons act on.
    """

    report: str = ""
    impressions: str = ""
    slices: Annotated[int, WithinRange(0, MAX_SLICES)] = 0
    seed: Annotated[int, WithinRange(0, MAX_SEED)] = 0  # a fresh parameter node draws one (the Logic)
    steps: Annotated[int, WithinRange(0, MAX_STEPS)] = 0
    guidance: Annotated[float, WithinRange(0.0, MAX_GUIDANCE), Decimals(1), SingleStep(0.5)] = 0.0
    sideGuidance: Annotated[float, WithinRange(-1.0, MAX_GUIDANCE), Decimals(1), SingleStep(0.5)] = -1.0
    findingGuidance: Annotated[float, WithinRange(-1.0, MAX_GUIDANCE), Decimals(1), SingleStep(0.5)] = -1.0
    device: Device = Device.AUTO
    modelSource: ModelSource = ModelSource.BUNDLED
    modelLocation: str = ""
    outputVolume: vtkMRMLScalarVolumeNode
    window: Annotated[str, Choice(SLICE_VIEW_WINDOWS)] = "lung"
    generatedVolume: vtkMRMLScalarVolumeNode


class PlainTextConnector(GuiConnector):
    """A QTextEdit bound to a str field, its text set only when it differs. Slicer's own QTextEdit connector sets
    the text on every change of the parameter node, so typing would put the cursor back to the start after each
    key (and the report would come out reversed). Passed to connectParametersToGui; never registered."""

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return False  # only where the module asks for it

    @staticmethod
    def create(widget, datatype):
        return None

    def __init__(self, widget) -> None:
        super().__init__()
        self._widget = widget

    def _connect(self):
        self._widget.textChanged.connect(self.changed)

    def _disconnect(self):
        self._widget.textChanged.disconnect(self.changed)

    def widget(self):
        return self._widget

    def read(self) -> str:
        return self._widget.toPlainText()

    def write(self, value: str) -> None:
        if value != self._widget.toPlainText():
            self._widget.setPlainText(value)
