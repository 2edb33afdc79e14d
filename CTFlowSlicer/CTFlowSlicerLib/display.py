"""CT window presets for the slice views. Their HU values are ctflow.conventions.WINDOWS, shared with previews and
DICOM headers (the bundled ctflow: torch-free)."""

from ctflow.conventions import WINDOWS

SLICE_VIEW_WINDOWS = ("lung", "mediastinum", "bone")  # the panel's window buttons, in order


def applyWindow(volumeNode, preset: str) -> None:
    window = WINDOWS[preset]
    display = volumeNode.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(window.width, window.level)
