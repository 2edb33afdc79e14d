"""Streaming generation into MRML, with no GUI code: a worker thread runs ctflow, the main thread fills the node.

The scene may only be touched from the main thread, so the worker never touches it: it puts what happens
on a queue, and poll() - called by the panel's QTimer, or by a test - takes it off and applies each decoded
block to a vtkMRMLScalarVolumeNode, one block per call, so the slice views fill in block by block.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ctflow
import numpy as np
import slicer
import torch
import vtk

from . import resources
from .display import applyWindow
from .parameters import GenerationSettings

ATTRIBUTE_PREFIX = "CTFlow."
SYNTHETIC_ATTRIBUTE = "CTFlow.Synthetic"  # holds ctflow.SYNTHETIC_NOTICE; every volume CTFlow made has it
PROVENANCE_KEYS = tuple(f.name for f in dataclasses.fields(ctflow.Provenance))
THREAD_NAME = "CTFlow generation"


@dataclass
class Progress:
    """What the panel shows after a poll."""

    state: str = "idle"  # idle, loading, generating, then one of done, cancelled, failed
    message: str = ""
    node: object | None = None  # the vtkMRMLScalarVolumeNode being filled, once the first block is in
    blocksDone: int = 0
    blocksExpected: int = 0  # an estimate while the model decides where the volume ends
    slices: int = 0
    elapsed: float = 0.0
    eta: float = 0.0
    firstBlock: bool = False  # this poll put the first block in: the moment to fit the slice views

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled", "failed")

    @property
    def barText(self) -> str:
        text = f"{self.blocksDone} / {self.blocksExpected} blocks"
        return text if self.finished else f"{text}, about {formatDuration(self.eta)} left"


@dataclass
class _Job:
    settings: GenerationSettings
    replace: object | None  # a volume node to overwrite, or None for a new one
    progress: Progress
    cancel: threading.Event = field(default_factory=threading.Event)
    messages: queue.Queue = field(default_factory=queue.Queue)
    started: float = field(default_factory=time.perf_counter)
    plan: ctflow.GenerationPlan | None = None
    thread: threading.Thread | None = None

    def post(self, kind: str, payload: object = None) -> None:
        self.messages.put((kind, payload))


class GenerationLogic:
    """Runs one generation at a time off the main thread and streams it into a volume node."""

    def __init__(self) -> None:
        self._loaded: tuple[tuple, ctflow.CTFlowPipeline] | None = None  # the last model, kept for the next run
        self._job: _Job | None = None

    def start(self, settings: GenerationSettings, replace=None) -> None:
        """Begin generating; progress, the volume and errors arrive through poll(). `replace`: a node to overwrite."""
        if self.isRunning():
            raise RuntimeError("a generation is already running; cancel it first")
        job = _Job(settings, replace, Progress("loading", "Starting ..."))
        job.thread = threading.Thread(target=self._work, args=(job,), name=THREAD_NAME, daemon=True)
        self._job = job
        job.thread.start()

    def isRunning(self) -> bool:
        return self._job is not None and not self._job.progress.finished

    def cancel(self) -> None:
        """Ask the worker to stop: it does within one sampling step; the blocks made stay, marked partial."""
        if self._job is not None:
            self._job.cancel.set()

    def stop(self, timeout: float = 60.0) -> None:
        """Cancel, wait for the worker and drop what it has not delivered: the scene or the panel is going away."""
        job, self._job = self._job, None
        if job is not None:
            job.cancel.set()
            job.thread.join(timeout)

    def poll(self) -> Progress:
        """Apply what the worker delivered since the last call, at most one block; returns a snapshot."""
        job = self._job
        if job is None:
            return Progress()
        handlers = {"loading": self._onLoading, "planned": self._onPlanned, "block": self._onBlock,
                    "end": self._onEnd, "failed": self._onFailed}
        job.progress.firstBlock = False
        while not job.progress.finished:
            try:
                kind, payload = job.messages.get_nowait()
            except queue.Empty:
                break
            handlers[kind](job, payload)
            if kind == "block":
                break
        if not job.progress.finished:
            job.progress.elapsed = time.perf_counter() - job.started
        return dataclasses.replace(job.progress)

    @staticmethod
    def provenanceOf(node) -> ctflow.Provenance | None:
        """Provenance read back from the node's attributes (saved scenes keep them); None if CTFlow did not make it."""
        if node.GetAttribute(SYNTHETIC_ATTRIBUTE) is None:
            return None
        values = {key: node.GetAttribute(attributeName(key)) for key in PROVENANCE_KEYS}
        return ctflow.Provenance.from_dict({key: value for key, value in values.items() if value is not None})

    @staticmethod
    def saveVolume(node, path: str | Path) -> Path:
        """Write .nrrd or .nii.gz with the provenance in the header; ctflow's writers also mark the file synthetic."""
        volume = ctflow.Volume(
            slicer.util.arrayFromVolume(node).astype(np.int16),
            ctflow.Geometry.from_ijk_to_ras(ijkToRAS(node)),
            GenerationLogic.provenanceOf(node),
        )
        return ctflow.write_volume(volume, path, overwrite=True)

    # -- worker thread: never touches the scene ---------------------------------------------------------------

    def _work(self, job: _Job) -> None:
        """Everything the worker learns goes on the queue; its last message is always "end" or "failed"."""
        outcome = ("failed", "the generation stopped unexpectedly (details in the Python console)")
        try:
            settings = job.settings
            ctflow.parse_report(settings.report, settings.impressions)  # a bad report fails before a slow model load
            pipeline = self._pipeline(job)
            plan = pipeline.plan(generationRequest(settings))
            job.post("planned", plan)
            for block in pipeline.stream(plan, job.cancel):
                job.post("block", block)
            outcome = ("end", job.cancel.is_set())
        except ctflow.CTFlowError as exc:
            outcome = ("failed", str(exc))
        except torch.cuda.OutOfMemoryError:
            outcome = ("failed", "out of GPU memory: choose CPU under Device, or close other programs using the GPU")
        except Exception as exc:  # the thread boundary: anything else would vanish and leave the panel waiting
            logging.exception("CTFlow generation failed")
            outcome = ("failed", f"unexpected {type(exc).__name__}: {exc} (details in the Python console)")
        finally:
            job.post(*outcome)

    def _pipeline(self, job: _Job) -> ctflow.CTFlowPipeline:
        """The chosen model, loaded, or the one loaded last time when model and device are the same."""
        model, revision = modelChoice(job.settings)
        key = (model, revision, job.settings.device)
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None  # free the previous model before loading the next one
            download = " (downloaded from the hub the first time)" if job.settings.modelSource == "hub" else ""
            job.post("loading", f"Loading model {model}{download} ...")
            pipeline = ctflow.CTFlowPipeline.from_pretrained(model, revision=revision, device=job.settings.device)
            self._loaded = (key, pipeline)
        return self._loaded[1]

    # -- main thread: applies the worker's messages -----------------------------------------------------------

    def _onLoading(self, job: _Job, text: str) -> None:
        job.progress.state, job.progress.message = "loading", text

    def _onPlanned(self, job: _Job, plan: ctflow.GenerationPlan) -> None:
        job.plan = plan
        job.progress.state = "generating"
        job.progress.message = withNotices(f"Generating with seed {plan.request.seed} ...", plan)

    def _onBlock(self, job: _Job, block: ctflow.Block) -> None:
        progress = job.progress
        if progress.node is None:
            progress.node = startVolume(job.replace, block, job.settings.window)
            progress.firstBlock = True
        else:
            appendBlock(progress.node, block)
        progress.blocksDone, progress.blocksExpected = block.blocks_done, block.blocks_expected
        progress.slices, progress.eta = block.stop, block.eta_s
        estimate = "~" if job.plan.request.slices is None else ""
        progress.message = withNotices(
            f"Block {block.blocks_done} of {estimate}{block.blocks_expected}: {block.stop} slices, "
            f"{formatDuration(block.elapsed_s)} elapsed, about {formatDuration(block.eta_s)} left.",
            job.plan,
        )

    def _onEnd(self, job: _Job, cancelled: bool) -> None:
        self._finish(job, "cancelled" if cancelled else "done")

    def _onFailed(self, job: _Job, error: str) -> None:
        self._finish(job, "failed", error)

    def _finish(self, job: _Job, state: str, error: str = "") -> None:
        progress = job.progress
        progress.state = state
        progress.elapsed = time.perf_counter() - job.started
        if state == "done":  # the block count was an estimate: a volume may end where a block would start
            progress.blocksExpected = progress.blocksDone
        if progress.node is not None:
            progress.node.SetAttribute(attributeName("partial"), str(state != "done"))
        progress.message = finishedMessage(progress, job.plan, error)
        job.thread.join(5.0)  # the worker posted its last message as its last act: this returns at once


def generationRequest(settings: GenerationSettings) -> ctflow.GenerationRequest:
    return ctflow.GenerationRequest(
        settings.report, impressions=settings.impressions or None, slices=settings.slices or None,
        seed=settings.seed, steps=settings.steps or None, guidance=settings.guidance or None,
    )


def modelChoice(settings: GenerationSettings) -> tuple[str, str | None]:
    """(model folder or hub id, revision) for the panel's Model row, or a ModelError that says what to do."""
    if settings.modelSource == "bundled":
        folder = resources.bundledModel()
        if folder is None:
            raise ctflow.ModelError(resources.NO_BUNDLED_MODEL)
        return str(folder), None
    location = settings.modelLocation.strip()
    if settings.modelSource == "hub":
        hubId, _, revision = location.partition("@")
        if not hubId:
            raise ctflow.ModelError("type a hub id such as org/name (optionally org/name@revision) under Model")
        return hubId, revision or None
    if not Path(location).expanduser().is_dir():
        raise ctflow.ModelError(f"the model folder {location!r} does not exist: choose a folder holding config.json")
    return str(Path(location).expanduser()), None


def startVolume(replace, block: ctflow.Block, window: str):
    """The first block: a new volume node (or `replace`), with geometry, provenance and window, shown in the views."""
    scene = slicer.mrmlScene
    name = volumeName(block.provenance)
    if replace is not None and replace.GetScene() is scene:
        node = replace
        node.SetName(name)
    else:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(block.geometry.ijk_to_ras()))
    for key, value in {**block.provenance.as_dict(), "partial": "True"}.items():
        node.SetAttribute(attributeName(key), value)
    slicer.util.updateVolumeFromArray(node, block.hu)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    applyWindow(node, window)
    slicer.util.setSliceViewerLayers(background=node)
    return node


def appendBlock(node, block: ctflow.Block) -> None:
    """Grow the volume along k; its IJK-to-RAS stays, so slice 0 remains the most superior one."""
    slicer.util.updateVolumeFromArray(node, np.concatenate([slicer.util.arrayFromVolume(node), block.hu]))


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


def withNotices(text: str, plan: ctflow.GenerationPlan | None) -> str:
    notices = plan.notices if plan is not None else ()
    return " ".join([text, *(f"Note: {notice}." for notice in notices)])


def finishedMessage(progress: Progress, plan: ctflow.GenerationPlan | None, error: str) -> str:
    made = f"{progress.slices} slices ({progress.blocksDone} blocks)"
    if progress.state == "done":
        text = f"Done: {progress.slices} slices in {formatDuration(progress.elapsed)}, seed {plan.request.seed}. " \
               "Synthetic image: not for diagnosis."
    elif progress.state == "cancelled":
        text = f"Cancelled: kept {made}, marked partial." if progress.node else "Cancelled before the first block."
    else:
        text = f"Error: {error}" + (f" The {made} made so far were kept, marked partial." if progress.node else "")
    return withNotices(text, plan)


def formatDuration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"
