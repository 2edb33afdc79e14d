"""The panel's settings, kept in the module's parameter node so that a saved scene reopens with the same request."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

OUTPUT_VOLUME = "OutputVolume"  # parameter-node reference: the last generated volume, the one "replace" reuses
MAX_SEED = 2**31 - 1  # what a Qt spin box can hold


def newSeed() -> int:
    return random.SystemRandom().randrange(MAX_SEED + 1)


@dataclass
class GenerationSettings:
    """One generation request as the panel shows it; zero means "automatic" or "the model's default"."""

    report: str = ""  # Findings, or a whole report with Findings and Impressions headers
    impressions: str = ""
    slices: int = 0  # 0: the model decides where the volume ends
    seed: int = field(default_factory=newSeed)  # a fresh panel starts with a fresh seed
    steps: int = 0
    guidance: float = 0.0
    device: str = "auto"  # auto, cuda or cpu
    modelSource: str = "bundled"  # bundled, folder or hub
    modelLocation: str = ""  # a model folder, or a hub id "org/name" with an optional "@revision"
    replaceOutput: bool = False
    window: str = "lung"  # a key of display.WINDOW_PRESETS

    def save(self, node) -> None:
        """Write every field into a vtkMRMLScriptedModuleNode (parameters are strings)."""
        for item in dataclasses.fields(self):
            node.SetParameter(item.name, str(getattr(self, item.name)))

    @classmethod
    def load(cls, node) -> "GenerationSettings":
        """Read back what save() wrote; a field missing from the node keeps its default."""
        values = {}
        for item in dataclasses.fields(cls):
            text = node.GetParameter(item.name)
            if text:
                values[item.name] = _parse(item.type, text)
        return cls(**values)


def _parse(kind: str, text: str):
    if kind == "bool":
        return text == "True"
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    return text
