"""PySide6 standing in for Slicer's PythonQt, so that the real CTFlowSlicer.py runs in the panel test.

Only what the module touches and PySide6 spells differently is provided here:
- a `qt` module holding QtCore, QtGui, QtWidgets and QUiLoader, PythonQt's single namespace;
- QObject.name, PythonQt's spelling of objectName (slicer.util.childWidgetVariables reads it);
- QFileDialog.getSaveFileName returning the path alone, as PythonQt does (PySide6 returns (path, filter));
- slicer.app without a layout manager (there are no slice views offscreen), with processEvents and a
  temporary folder;
- slicer.ScriptedLoadableModule's four base classes, reduced to what the module uses;
- slicer.i18n's tr (no translations loaded: the source text);
- qMRMLNodeComboBox (a C++ widget of Slicer's), listing the scene's nodes of its nodeTypes, for .ui files;
- slicer.parameterNodeWrapper: typed fields stored in a vtkMRMLScriptedModuleNode, and connectGui binding the
  widgets whose SlicerParameterName property names a field (connectParametersToGui also takes a module's own
  GuiConnector). As in Slicer, only the widget/type pairs that Slicer's own connectors support bind (a
  QPlainTextEdit or a QRadioButton does not), a combo box shows an Enum's labels, unbounded spin boxes get the
  connectors' wide default ranges, and every change of the node writes every bound widget the way Slicer's
  connectors do (a QTextEdit's text is set again even when equal, which puts its cursor back to the start).
- Slicer's DICOM database for the tests that ask for it (conftest's dicom_database): ctk's ctkDICOMDatabase and
  ctkDICOMIndexer (C++, only in the Slicer application) as an index of the files copied into the database's
  folder, and DICOMLib.DICOMUtils's importDicom (Slicer 5.10/5.12's signature and behaviour) and
  TemporaryDICOMDatabase.
Everything else - slicer.util, MRML, the .ui file, the module's own code - is the real thing.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import logging
import os
import shutil
import sys
import tempfile
import types
import typing
import unittest
from pathlib import Path

import pydicom
import slicer
import vtk
from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets


def install(temporaryPath: str) -> QtWidgets.QApplication:
    application = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    qt = types.ModuleType("qt")
    for module in (QtCore, QtGui, QtWidgets):
        for name in dir(module):
            if name.startswith("Q"):
                setattr(qt, name, getattr(module, name))
    qt.Qt = QtCore.Qt
    qt.QUiLoader = UiLoader
    qt.QFileDialog = FileDialog
    QtCore.QObject.name = property(QtCore.QObject.objectName)
    sys.modules["qt"] = qt

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for base in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                 ScriptedLoadableModuleTest):
        setattr(scripted, base.__name__, base)
    sys.modules[scripted.__name__] = scripted
    slicer.ScriptedLoadableModule = scripted
    slicer.app = types.SimpleNamespace(
        layoutManager=lambda: None, processEvents=application.processEvents, temporaryPath=temporaryPath
    )
    slicer.qMRMLNodeComboBox = qMRMLNodeComboBox
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    for item in (parameterNodeWrapper, GuiConnector, Choice, Minimum, Maximum, WithinRange, Decimals, SingleStep):
        setattr(wrapper, item.__name__, item)
    for module in (i18n, wrapper):
        sys.modules[module.__name__] = module
        setattr(slicer, module.__name__.split(".")[1], module)
    return application


class UiLoader(QtUiTools.QUiLoader):
    """Knows Slicer's custom widgets that the module's .ui uses."""

    def __init__(self, *args):
        super().__init__(*args)
        self.registerCustomWidget(qMRMLNodeComboBox)


class qMRMLNodeComboBox(QtWidgets.QComboBox):
    """The scene's nodes of `nodeTypes` (dynamic properties from the .ui, as Slicer's Q_PROPERTYs), plus the
    noneDisplay entry when noneEnabled; currentNodeChanged(node or None). addAttribute keeps only the nodes that
    have an attribute (of a value, when given), looked at again whenever a node is modified, as Slicer's
    qMRMLSortFilterProxyModel does: a node gets its attributes after it is added."""

    currentNodeChanged = QtCore.Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None
        self._observers = []
        self._attributes: dict[str, tuple[str, str | None]] = {}  # node type -> (attribute, value or None: any)
        self._watched: dict[str, tuple[object, int]] = {}  # node id -> (node, ModifiedEvent observer)
        self.currentIndexChanged.connect(lambda _: self.currentNodeChanged.emit(self.currentNode()))

    def addAttribute(self, nodeType: str, attributeName: str, attributeValue=None) -> None:
        self._attributes[nodeType] = (attributeName, attributeValue)
        if self._scene is not None:
            self._refresh()

    def _accepts(self, nodeType: str, node) -> bool:
        if nodeType not in self._attributes:
            return True
        name, value = self._attributes[nodeType]
        found = node.GetAttribute(name)
        return found is not None and (value is None or found == value)

    def _watch(self, node) -> None:
        if node.GetID() not in self._watched:
            self._watched[node.GetID()] = (node, node.AddObserver(vtk.vtkCommand.ModifiedEvent,
                                                                  lambda *_: self._refresh()))

    def setMRMLScene(self, scene) -> None:
        for tag in self._observers:
            self._scene.RemoveObserver(tag)
        self._scene = scene
        self._observers = [scene.AddObserver(event, lambda *_: self._refresh())
                           for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent)]
        self._refresh()

    def _nodes(self) -> list:
        nodes = []
        for nodeType in self.property("nodeTypes") or []:
            for node in slicer.util.getNodesByClass(nodeType):
                if node.GetScene() is self._scene:
                    if nodeType in self._attributes:
                        self._watch(node)
                    if self._accepts(nodeType, node):
                        nodes.append(node)
        return nodes

    def _refresh(self) -> None:
        current = self.currentNode()
        self.blockSignals(True)
        self.clear()
        if self.property("noneEnabled"):
            self.addItem(self.property("noneDisplay") or "None", None)
        for node in self._nodes():
            self.addItem(node.GetName(), node.GetID())
        self.blockSignals(False)
        self.setCurrentNode(current)

    def currentNode(self):
        nodeId = self.currentData()
        return self._scene.GetNodeByID(nodeId) if nodeId and self._scene is not None else None

    def setCurrentNode(self, node) -> None:
        index = self.findData(node.GetID() if node is not None else None)
        self.setCurrentIndex(index if index >= 0 else (0 if self.property("noneEnabled") else -1))


@dataclasses.dataclass
class Choice:
    choices: typing.Sequence


@dataclasses.dataclass
class Minimum:
    minimum: float


@dataclasses.dataclass
class Maximum:
    maximum: float


@dataclasses.dataclass
class WithinRange:
    minimum: float
    maximum: float


@dataclasses.dataclass
class Decimals:
    value: int


@dataclasses.dataclass
class SingleStep:
    value: float


def _split(hint):
    if typing.get_origin(hint) is typing.Annotated:
        base, *annotations = typing.get_args(hint)
    else:
        base, annotations = hint, []
    if typing.get_origin(base) in (typing.Union, types.UnionType):  # Optional[node class]
        base = next(arg for arg in typing.get_args(base) if arg is not type(None))
    return base, annotations


def _first(annotations, kind):
    return next((a for a in annotations if isinstance(a, kind)), None)


def _isNode(base) -> bool:
    return isinstance(base, type) and issubclass(base, slicer.vtkMRMLNode)


def _validate(name, base, annotations, value):
    """Slicer's serializers' default validators: an instance of the field's type (a number field also takes an
    int, a node field None; a str is not an Enum member), WithinRange's bounds and Choice's members."""
    kinds = (int, float) if base is float else (base, type(None)) if _isNode(base) else base
    if not isinstance(value, kinds):
        raise TypeError(f"{name}: expected {base.__name__}, got {type(value).__name__} {value!r}")
    within = _first(annotations, WithinRange)
    if within is not None and not within.minimum <= value <= within.maximum:
        raise ValueError(f"{name}: {value!r} is not within [{within.minimum}, {within.maximum}]")
    choice = _first(annotations, Choice)
    if choice is not None and value not in choice.choices:
        raise ValueError(f"{name}: {value!r} is not one of {choice.choices}")


def parameterNodeWrapper(cls):
    """Fields are the class's annotations; their class attributes are the defaults."""
    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {name: getattr(cls, name, None) for name in hints}

    def make(name, base, annotations):
        def read(self):
            node = self.parameterNode
            if _isNode(base):
                return node.GetNodeReference(name)
            text = node.GetParameter(name)
            if issubclass(base, enum.Enum):
                return base[text]  # Slicer stores an Enum member by its name
            if base is bool:
                return text == "True"
            return base(text)

        def write(self, value):
            _validate(name, base, annotations, value)
            if _isNode(base):
                self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            else:
                self.parameterNode.SetParameter(name, str(value.name if isinstance(value, enum.Enum) else value))

        return property(read, write)

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        for name, hint in hints.items():
            base, _ = _split(hint)
            missing = (parameterNode.GetNodeReferenceID(name) is None) if _isNode(base) else \
                name not in parameterNode.GetParameterNames()
            if missing and defaults[name] is not None:
                setattr(self, name, defaults[name])

    def connectParametersToGui(self, mapping):
        """Bind each field to a widget (a connector made for it, as Slicer's registered ones are) or to a
        GuiConnector given. As Slicer's wrapper does, every change of the parameter node writes every bound widget,
        without comparing first, and the widgets' change signals are ignored while it does."""
        connectors = {name: value if isinstance(value, GuiConnector) else _Connector(value, *_split(hints[name]))
                      for name, value in mapping.items()}
        updating = [False]

        def writeAll():
            if updating[0]:
                return
            updating[0] = True
            try:
                for name, connector in connectors.items():
                    connector.write(getattr(self, name))
            finally:
                updating[0] = False

        def toNode(name, connector):
            def callback():
                if not updating[0]:
                    setattr(self, name, connector.read())
            return callback

        for name, connector in connectors.items():
            connector.write(getattr(self, name))
            connector.onChanged(toNode(name, connector))
        tag = self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda *_: writeAll())
        return (tag, connectors)

    def connectGui(self, gui):
        """Bind every widget of `gui` (a childWidgetVariables namespace) whose SlicerParameterName names a field."""
        return connectParametersToGui(self, {
            name: widget for widget in vars(gui).values()
            if (name := widget.property("SlicerParameterName") if isinstance(widget, QtCore.QObject) else None)})

    def disconnectGui(self, tag):
        self.parameterNode.RemoveObserver(tag[0])
        for connector in tag[1].values():
            connector.onChanged(None)

    members = {name: make(name, *_split(hint)) for name, hint in hints.items()}
    return type(cls.__name__, (), {**members, "__init__": __init__, "connectGui": connectGui,
                                   "connectParametersToGui": connectParametersToGui, "disconnectGui": disconnectGui,
                                   "__doc__": cls.__doc__, "__module__": cls.__module__, "fieldNames": tuple(hints)})


class GuiConnector(abc.ABC):
    """slicer.parameterNodeWrapper.GuiConnector: reads and writes one widget for one field. A module may pass its
    own to connectParametersToGui."""

    @staticmethod
    @abc.abstractmethod
    def canRepresent(widget, datatype) -> bool: ...

    @staticmethod
    @abc.abstractmethod
    def create(widget, datatype): ...

    def __init__(self):
        self._callback = None

    def onChanged(self, callback):
        self._callback = callback
        self._connect() if callback is not None else self._disconnect()

    def changed(self, *_):
        if self._callback:
            self._callback()

    @abc.abstractmethod
    def _connect(self): ...

    @abc.abstractmethod
    def _disconnect(self): ...

    @abc.abstractmethod
    def widget(self): ...

    @abc.abstractmethod
    def read(self): ...

    @abc.abstractmethod
    def write(self, value) -> None: ...


class _Connector(GuiConnector):
    """Slicer's own connectors, for the widget/type pairs they support, writing as they do: a QTextEdit's text is
    set whatever it holds (the cursor goes back to the start), a QLineEdit's only when it differs; the other
    widgets' setters do nothing for the value they show."""

    canRepresent = create = None  # made directly by connectParametersToGui

    def __init__(self, widget, base, annotations):
        super().__init__()
        self._widget = widget
        kind = type(widget)
        if kind is QtWidgets.QTextEdit and base is str:
            self.get, self.set, signal = widget.toPlainText, widget.setPlainText, widget.textChanged
        elif kind is QtWidgets.QLineEdit and base is str:
            self.get, signal = widget.text, widget.textChanged
            self.set = lambda value: widget.setText(value) if value != widget.text() else None
        elif kind in (QtWidgets.QSpinBox, QtWidgets.QDoubleSpinBox) and base is (
                int if kind is QtWidgets.QSpinBox else float):
            self._range(widget, annotations, base)
            self.get, self.set, signal = widget.value, widget.setValue, widget.valueChanged
        elif kind is QtWidgets.QComboBox and isinstance(base, type) and issubclass(base, enum.Enum):
            label = getattr(base, "label", lambda member: member.name)
            members = list(base)
            widget.clear()
            for member in members:
                widget.addItem(label(member))
            self.get = lambda: members[widget.currentIndex()]
            self.set = lambda value: widget.setCurrentIndex(members.index(value))
            signal = widget.currentIndexChanged
        elif kind in (QtWidgets.QCheckBox, QtWidgets.QPushButton) and base is bool:
            widget.setCheckable(True)
            self.get, self.set, signal = widget.isChecked, widget.setChecked, widget.toggled
        elif kind is qMRMLNodeComboBox and _isNode(base):
            widget.setProperty("nodeTypes", [base.__name__])
            widget._refresh()
            self.get, self.set, signal = widget.currentNode, widget.setCurrentNode, widget.currentNodeChanged
        else:
            raise RuntimeError(f"Unable to create GUI connector from datatype '{base}' to widget type '{kind}'")
        self.signal = signal

    def _connect(self):
        self.signal.connect(self.changed)

    def _disconnect(self):
        self.signal.disconnect(self.changed)

    def widget(self):
        return self._widget

    def read(self):
        return self.get()

    def write(self, value) -> None:
        self.set(value)

    @staticmethod
    def _range(widget, annotations, base):
        within, low, high = (_first(annotations, k) for k in (WithinRange, Minimum, Maximum))
        wide = (-2**31, 2**31 - 1) if base is int else (float("-inf"), float("inf"))
        widget.setRange(within.minimum if within else low.minimum if low else wide[0],
                        within.maximum if within else high.maximum if high else wide[1])
        for kind, setter in ((Decimals, "setDecimals"), (SingleStep, "setSingleStep")):
            annotation = _first(annotations, kind)
            if annotation is not None:
                getattr(widget, setter)(annotation.value)


class FileDialog(QtWidgets.QFileDialog):
    @staticmethod
    def getSaveFileName(*args) -> str:
        return QtWidgets.QFileDialog.getSaveFileName(*args)[0]


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


class ScriptedLoadableModuleWidget:
    def __init__(self, parent):
        self.parent = parent
        parent.isEntered = True  # qSlicerScriptedLoadableModuleWidget's property: the module is shown
        self.layout = parent.layout() or QtWidgets.QVBoxLayout(parent)

    def resourcePath(self, filename: str) -> str:
        moduleFile = sys.modules[type(self).__module__].__file__
        return os.path.join(os.path.dirname(moduleFile), "Resources", filename)

    def setup(self) -> None:
        """Slicer adds its Reload and Test buttons here."""


class ScriptedLoadableModuleLogic:
    def __init__(self):
        self.moduleName = type(self).__name__.removesuffix("Logic")

    def getParameterNode(self):
        """The module's singleton vtkMRMLScriptedModuleNode, as Slicer's base class keeps it."""
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node = slicer.mrmlScene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message: str, msec: int = 1000) -> None:
        print(message)


class ctkDICOMDatabase:
    """An open DICOM database in `directory`: which files (copied under directory/dicom) hold which series. The
    real one keeps this index in SQLite; DICOMUtils and the module use isOpen, databaseDirectory and these calls."""

    def __init__(self, directory) -> None:
        self.databaseDirectory = str(directory)
        self.isOpen = True
        self._seriesFiles: dict[str, list[str]] = {}

    def filesForSeries(self, seriesUID: str) -> list[str]:
        return list(self._seriesFiles.get(seriesUID, []))

    def seriesForFile(self, path: str) -> str:
        return next((uid for uid, files in self._seriesFiles.items() if path in files), "")


class ctkDICOMIndexer:
    """Indexes every DICOM file under a folder into a database, copying it there first when asked; files that
    are not DICOM are passed over, as ctk does."""

    def addDirectory(self, database: ctkDICOMDatabase, directoryName: str, copyFiles: bool = False) -> None:
        if not isinstance(directoryName, str):  # PythonQt converts a str, not a Path, to the QString it takes
            raise TypeError(f"ctkDICOMIndexer.addDirectory(): the folder must be a str, not {type(directoryName)}")
        if not database.isOpen:
            raise RuntimeError("the DICOM database is not open")
        for path in sorted(p for p in Path(directoryName).rglob("*") if p.is_file()):
            try:
                dataset = pydicom.dcmread(path, stop_before_pixels=True)
            except pydicom.errors.InvalidDicomError:
                continue
            target = path
            if copyFiles:
                target = Path(database.databaseDirectory, "dicom", dataset.StudyInstanceUID,
                              dataset.SeriesInstanceUID, dataset.SOPInstanceUID)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
            database._seriesFiles.setdefault(dataset.SeriesInstanceUID, []).append(str(target))

    def waitForImportFinished(self) -> None:
        """addDirectory has finished: it indexes synchronously."""


def importDicom(dicomDataDir, dicomDatabase=None, copyFiles=False):
    """DICOMUtils.importDicom: index a folder into `dicomDatabase` (slicer.dicomDatabase by default) with ctk's
    indexer; on any error, log it and return False."""
    try:
        indexer = ctkDICOMIndexer()
        indexer.addDirectory(dicomDatabase if dicomDatabase is not None else slicer.dicomDatabase, dicomDataDir,
                             copyFiles)
        indexer.waitForImportFinished()
    except Exception:
        logging.exception("Failed to import DICOM folder %s", dicomDataDir)
        return False
    return True


class TemporaryDICOMDatabase:
    """DICOMUtils.TemporaryDICOMDatabase: an empty database in Slicer's temporary folder is slicer.dicomDatabase
    inside the with block; then it is closed and the previous one is back."""

    def __enter__(self) -> ctkDICOMDatabase:
        self._previous = getattr(slicer, "dicomDatabase", None)
        slicer.dicomDatabase = ctkDICOMDatabase(tempfile.mkdtemp(prefix="TempDICOMDatabase",
                                                                 dir=slicer.app.temporaryPath))
        return slicer.dicomDatabase

    def __exit__(self, *exception) -> None:
        slicer.dicomDatabase.isOpen = False
        slicer.dicomDatabase = self._previous


DICOMUtils = types.ModuleType("DICOMLib.DICOMUtils")
DICOMUtils.importDicom = importDicom
DICOMUtils.TemporaryDICOMDatabase = TemporaryDICOMDatabase
DICOMLib = types.ModuleType("DICOMLib")
DICOMLib.DICOMUtils = DICOMUtils
