"""PySide6 standing in for Slicer's PythonQt, so that the real CTFlowSlicer.py runs in the panel test.

Only what the module touches and PySide6 spells differently is provided here:
- a `qt` module holding QtCore, QtGui, QtWidgets and QUiLoader, PythonQt's single namespace;
- QObject.name, PythonQt's spelling of objectName (slicer.util.childWidgetVariables reads it);
- QFileDialog.getSaveFileName returning the path alone, as PythonQt does (PySide6 returns (path, filter));
- slicer.app without a layout manager (there are no slice views offscreen), with processEvents and a
  temporary folder;
- slicer.ScriptedLoadableModule's four base classes, reduced to what the module uses.
Everything else - slicer.util, MRML, the .ui file, the module's own code - is the real thing.
"""

from __future__ import annotations

import os
import sys
import types
import unittest

import slicer
from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets


def install(temporaryPath: str) -> QtWidgets.QApplication:
    application = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    qt = types.ModuleType("qt")
    for module in (QtCore, QtGui, QtWidgets):
        for name in dir(module):
            if name.startswith("Q"):
                setattr(qt, name, getattr(module, name))
    qt.Qt = QtCore.Qt
    qt.QUiLoader = QtUiTools.QUiLoader
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
    return application


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
