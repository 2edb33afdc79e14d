"""CT window presets for the slice views (no torch or ctflow needed: a loaded scene can use them too)."""

WINDOW_PRESETS = {  # name: (window width, window level) in HU
    "lung": (1500.0, -600.0),
    "mediastinum": (350.0, 40.0),
    "bone": (1800.0, 400.0),
}


def applyWindow(volumeNode, preset: str) -> None:
    window, level = WINDOW_PRESETS[preset]
    display = volumeNode.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(window, level)
