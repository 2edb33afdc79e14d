"""One generation as the panel sees it: its progress, its messages, and its blocks put into a volume node.

No torch and no thread here: the blocks come from the worker process (ctflow.worker) and are applied on
Slicer's main thread by CTFlowSlicerLogic.poll(), one per call, so the slice views fill in block by block.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import ctflow
import numpy as np
import slicer
import vtk

from .display import applyWindow

ATTRIBUTE_PREFIX = "CTFlow."
SYNTHETIC_ATTRIBUTE = "CTFlow.Synthetic"  # holds ctflow.SYNTHETIC_NOTICE; every volume CTFlow made has it
PROVENANCE_KEYS = tuple(f.name for f in dataclasses.fields(ctflow.Provenance))


@dataclass
class Progress:
    """What the panel shows after a poll."""

    state: str = "idle"  # idle, starting, loading, generating, then one of done, cancelled, failed
    message: str = ""
    node: object | None = None  # the vtkMRMLScalarVolumeNode being filled, once the first block is in
    blocksDone: int = 0
    blocksExpected: int = 0  # an estimate while the model decides where the volume ends
    slices: int = 0
    elapsed: float = 0.0
    eta: float = 0.0
    firstBlock: bool = False  # this poll put the first block in: the moment to fit the slice views
    blockLatency: float = 0.0  # seconds from the block's file being written to its slices being in the node

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled", "failed")

    @property
    def barText(self) -> str:
        text = f"{self.blocksDone} / {self.blocksExpected} blocks"
        return text if self.finished else f"{text}, about {formatDuration(self.eta)} left"


@dataclass
class Run:
    """One Generate: what was asked, and what has arrived from the worker so far."""

    runId: str
    settings: object  # the CTFlowSlicerParameterNode it was started with
    replace: object | None  # a volume node to overwrite, or None for a new one
    progress: Progress
    started: float = field(default_factory=time.perf_counter)
    planned: dict | None = None  # the worker's "planned" message
    cancelledAt: float | None = None  # monotonic time of the cancel request
    cancelGrace: float = 0.0  # how long the worker then has to stop before it is ended
    lastHeard: float = field(default_factory=time.monotonic)  # when the last message about this run was handled
    slowest: float = 0.0  # the longest the worker has taken to make a block of this run

    @property
    def folder(self) -> Path | None:
        return Path(self.planned["folder"]) if self.planned else None

    @property
    def notices(self) -> tuple[str, ...]:
        return tuple(self.planned["notices"]) if self.planned else ()

    def onLoading(self, message: dict) -> None:
        self.progress.state = "loading"
        self.progress.message = f"Loading model {message['model']} ..."

    def onPlanned(self, message: dict) -> None:
        self.planned = message
        self.progress.state = "generating"
        self.progress.message = withNotices(f"Generating with seed {message['seed']} ...", self.notices)

    def onBlock(self, message: dict) -> None:
        """Put the block's slices into the node (the first block makes or takes over the node)."""
        progress = self.progress
        hu = np.load(message["file"], allow_pickle=False)
        provenance = ctflow.Provenance.from_dict(message["provenance"])
        if progress.node is None:
            progress.node = startVolume(self.replace, hu, message["ijk_to_ras"], provenance, self.settings.window)
            progress.firstBlock = True
        else:
            appendBlock(progress.node, hu)
        progress.blockLatency = time.time() - message["time"]
        progress.blocksDone, progress.blocksExpected = message["blocks_done"], message["blocks_expected"]
        progress.slices, progress.eta = message["stop"], message["eta_s"]
        if self.cancelledAt is not None:  # a block made before the cancel: the message stays "Cancelling"
            return
        estimate = "~" if self.planned["slices"] is None else ""
        progress.message = withNotices(
            f"Block {progress.blocksDone} of {estimate}{progress.blocksExpected}: {progress.slices} slices, "
            f"{formatDuration(message['elapsed_s'])} elapsed, about {formatDuration(progress.eta)} left.",
            self.notices,
        )

    def finish(self, state: str, error: str = "") -> None:
        progress = self.progress
        progress.state = state
        progress.elapsed = time.perf_counter() - self.started
        if state == "done":  # the block count was an estimate: a volume may end where a block would start
            progress.blocksExpected = progress.blocksDone
        if progress.node is not None:
            progress.node.SetAttribute(attributeName("partial"), str(state != "done"))
        progress.message = finishedMessage(progress, self.planned, error)


def modelChoice(settings, bundledModel: Path | None) -> tuple[str, str | None]:
    """(model folder or hub id, revision) for the panel's Model row, or a ModelError that says what to do.

    The one rule for which model is used; the panel's model status line shows what it says.
    """
    from .resources import NO_BUNDLED_MODEL

    if settings.modelSource.value == "bundled":
        if bundledModel is None:
            raise ctflow.ModelError(NO_BUNDLED_MODEL)
        return str(bundledModel), None
    location = settings.modelLocation.strip()
    if settings.modelSource.value == "hub":
        hubId, _, revision = location.partition("@")
        if not hubId:
            raise ctflow.ModelError("type a hub id such as org/name (optionally org/name@revision) under Model")
        return hubId, revision or None
    if not location:
        raise ctflow.ModelError("choose a model folder (holding config.json) under Model")
    try:
        folder = Path(location).expanduser()
    except RuntimeError as exc:  # "~nosuchuser/..."
        raise ctflow.ModelError(f"the model folder {location!r} cannot be found: {exc}") from exc
    if not folder.is_dir():
        raise ctflow.ModelError(f"the model folder {location!r} does not exist: choose a folder holding config.json")
    return str(folder), None


def requestFields(settings) -> dict:
    """The protocol's request: zero in the panel means "the model's default" (null), but for side and finding
    guidance, where zero turns it off and -1 is the default."""
    return {"report": settings.report, "impressions": settings.impressions or None, "slices": settings.slices or None,
            "seed": settings.seed, "steps": settings.steps or None, "guidance": settings.guidance or None,
            "side_guidance": None if settings.sideGuidance < 0 else settings.sideGuidance,
            "finding_guidance": None if settings.findingGuidance < 0 else settings.findingGuidance}


def startVolume(replace, hu: np.ndarray, ijkToRas, provenance: ctflow.Provenance, window: str):
    """The first block: a new volume node (or `replace`), with geometry, provenance and window, shown in the views."""
    scene = slicer.mrmlScene
    name = volumeName(provenance)
    if replace is not None and replace.GetScene() is scene:
        node = replace
        node.SetName(name)
    else:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(ijkToRas)))
    for key, value in {**provenance.as_dict(), "partial": "True"}.items():
        node.SetAttribute(attributeName(key), value)
    slicer.util.updateVolumeFromArray(node, hu)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    applyWindow(node, window)
    slicer.util.setSliceViewerLayers(background=node)
    return node


def appendBlock(node, hu: np.ndarray) -> None:
    """Grow the volume along k; its IJK-to-RAS stays, so slice 0 remains the most superior one."""
    slicer.util.updateVolumeFromArray(node, np.concatenate([slicer.util.arrayFromVolume(node), hu]))


def attributeName(key: str) -> str:
    return SYNTHETIC_ATTRIBUTE if key == "synthetic" else ATTRIBUTE_PREFIX + key


def ijkToRAS(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def volumeName(provenance: ctflow.Provenance, limit: int = 40) -> str:
    """'Synthetic CT (CTFlow) - <impressions, else findings, shortened> - seed N'."""
    report = ctflow.parse_report(provenance.report)
    text = report.impressions or report.findings
    short = text if len(text) <= limit else text[: limit - 3].rstrip() + "..."
    return f"Synthetic CT (CTFlow) - {short} - seed {provenance.seed}"


def madeByCTFlow(node) -> bool:
    return node.GetAttribute(SYNTHETIC_ATTRIBUTE) is not None


def provenanceOf(node) -> ctflow.Provenance | None:
    """Provenance read back from the node's attributes (saved scenes keep them); None if CTFlow did not make it.
    Raises ctflow.CTFlowError for attributes edited into something that is not a provenance."""
    if not madeByCTFlow(node):
        return None
    values = {key: node.GetAttribute(attributeName(key)) for key in PROVENANCE_KEYS}
    try:
        return ctflow.Provenance.from_dict({key: value for key, value in values.items() if value is not None})
    except (TypeError, ValueError) as exc:
        name = node.GetName()
        raise ctflow.CTFlowError(f"the CTFlow.* attributes of {name} do not read as a provenance: {exc}") from exc


def volumeOf(node) -> ctflow.Volume:
    """The node as a ctflow Volume: voxels [k, j, i] in int16 HU, its IJK-to-RAS, and the provenance stored on it."""
    return ctflow.Volume(
        slicer.util.arrayFromVolume(node).astype(np.int16),
        ctflow.Geometry.from_ijk_to_ras(ijkToRAS(node)),
        provenanceOf(node),
    )


def saveVolume(node, path: str | Path, overwrite: bool = False) -> Path:
    """Write .nrrd or .nii.gz with the provenance in the header, which marks the file synthetic; only a volume
    CTFlow made (one whose mark was removed would be written unmarked). A file that exists is replaced only with
    `overwrite` (else ctflow.OutputExistsError)."""
    if not madeByCTFlow(node):
        raise ctflow.CTFlowError(f"{node.GetName()} has no {SYNTHETIC_ATTRIBUTE} attribute, so its file could not "
                                 "say that it is synthetic: save it with Slicer's own Save Data")
    return ctflow.write_volume(volumeOf(node), path, overwrite=overwrite)


def withNotices(text: str, notices: tuple[str, ...]) -> str:
    return " ".join([text, *(f"Note: {notice}." for notice in notices)])


def finishedMessage(progress: Progress, planned: dict | None, error: str) -> str:
    made = f"{progress.slices} slices ({progress.blocksDone} blocks)"
    if progress.state == "done":
        text = f"Done: {progress.slices} slices in {formatDuration(progress.elapsed)}, seed {planned['seed']}. " \
               "Synthetic image: not for diagnosis."
    elif progress.state == "cancelled":
        text = f"Cancelled: kept {made}, marked partial." if progress.node else "Cancelled before the first block."
        text += f" {error}" if error else ""
    else:
        text = f"Error: {error}" + (f" The {made} made so far were kept, marked partial." if progress.node else "")
    return withNotices(text, tuple(planned["notices"]) if planned else ())


def formatDuration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"
