"""The module's Logic against a real MRML scene (slicer-core, no Slicer application), a real worker process and a
tiny real model. Polling here sleeps in Python; test_pythonqt_host.py polls the way Slicer's main thread does."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import ctflow
import numpy as np
import pydicom
import pytest
import slicer
import torch
from ctflow.conventions import WINDOWS

from CTFlowSlicerLib import generation, resources
from CTFlowSlicerLib.display import SLICE_VIEW_WINDOWS, applyWindow


def run(logic, settings, onProgress=lambda progress: None, timeout=120.0, firstPollAfter=0.0):
    """Start, then poll as the panel's timer does until the end; returns every snapshot."""
    logic.start(settings)
    time.sleep(firstPollAfter)
    snapshots = []
    deadline = time.monotonic() + timeout
    while not (snapshots and snapshots[-1].finished):
        assert time.monotonic() < deadline, "generation did not finish"
        snapshots.append(logic.poll())
        onProgress(snapshots[-1])
        time.sleep(0.005)
    return snapshots


def expected_volume(tiny_pipeline, settings) -> ctflow.Volume:
    """What the library itself makes for these settings."""
    fields = generation.requestFields(settings)
    return tiny_pipeline.generate(ctflow.GenerationRequest(**{k: v for k, v in fields.items() if v is not None}))


def run_folders() -> set[str]:
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("ctflow-run-*")}


def test_blocks_stream_into_the_node_with_the_library_output(scene, logic, settings, tiny_pipeline):
    expected = expected_volume(tiny_pipeline, settings)
    seen = []

    def check(progress):
        if progress.node is None:
            return
        node = progress.node
        slices = slicer.util.arrayFromVolume(node).shape[0]
        if seen and seen[-1] == slices:
            return
        seen.append(slices)
        assert node.GetImageData().GetDimensions() == (16, 16, slices)
        assert node.GetSpacing() == pytest.approx((1.5, 1.5, 2.5))
        np.testing.assert_allclose(generation.ijkToRAS(node), expected.geometry.ijk_to_ras())
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), expected.hu[:slices])
        if slices < 10:
            assert node.GetAttribute("CTFlow.partial") == "True"

    snapshots = run(logic, settings, onProgress=check)
    assert seen == [4, 8, 10]  # one block per poll: the views fill in block by block
    assert [s.firstBlock for s in snapshots].count(True) == 1
    final = snapshots[-1]
    assert (final.state, final.blocksDone, final.blocksExpected, final.slices) == ("done", 3, 3, 10)
    assert final.message.startswith("Done: 10 slices") and "not for diagnosis" in final.message


def test_the_worker_keeps_the_model_between_runs(scene, logic, settings, change):
    run(logic, settings)
    again = run(logic, change(settings, seed=6))
    assert "loading" not in {s.state for s in again} and again[-1].state == "done"
    assert logic.unloadModel() and not logic.unloadModel()  # the second finds nothing loaded
    reloaded = run(logic, settings, firstPollAfter=3.0)  # the whole tiny run is in before the first poll
    assert "loading" in {s.state for s in reloaded} and reloaded[-1].state == "done"


def test_the_node_carries_name_provenance_and_window(scene, logic, settings, change):
    node = run(logic, change(settings, window="bone"))[-1].node
    assert node.GetName() == "Synthetic CT (CTFlow) - Moderate right pleural effusion. - seed 5"
    assert node.GetAttribute("CTFlow.Synthetic") == ctflow.SYNTHETIC_NOTICE
    assert node.GetAttribute("CTFlow.seed") == "5"
    assert node.GetAttribute("CTFlow.steps") == "2"
    assert node.GetAttribute("CTFlow.guidance") == "1.0"  # the tiny model's default
    assert node.GetAttribute("CTFlow.model") == "random-tiny"
    assert node.GetAttribute("CTFlow.ctflow_version") == ctflow.__version__
    assert node.GetAttribute("CTFlow.partial") == "False"
    assert "right pleural effusion" in node.GetAttribute("CTFlow.report")
    provenance = logic.provenanceOf(node)
    assert (provenance.seed, provenance.steps, provenance.partial) == (5, 2, False)
    display = node.GetDisplayNode()
    assert (display.GetWindow(), display.GetLevel()) == (WINDOWS["bone"].width, WINDOWS["bone"].level)
    assert not display.GetAutoWindowLevel()
    composites = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
    assert [c.GetBackgroundVolumeID() for c in composites] == [node.GetID()] * 3


def test_cancel_stops_within_a_block_and_keeps_a_partial_volume(scene, logic, settings, change):
    state = {}

    def cancel_after_first_block(progress):
        if progress.firstBlock:
            state["at_cancel"] = progress.blocksDone
            logic.cancel()

    # Enough steps that a block takes longer than a poll: the worker cannot race blocks ahead of the node, even
    # on a loaded machine, so the bound below holds whatever the timing.
    snapshots = run(logic, change(settings, slices=400, steps=300), onProgress=cancel_after_first_block)
    final = snapshots[-1]
    assert final.state == "cancelled"
    assert final.blocksDone <= state["at_cancel"] + 2  # at most the block already queued: the one in work is dropped
    assert slicer.util.arrayFromVolume(final.node).shape[0] == final.slices < 400
    assert final.node.GetAttribute("CTFlow.partial") == "True"
    assert final.message.startswith("Cancelled: kept")


def test_replace_mode_reuses_the_last_node(scene, logic, settings, tiny_pipeline, change):
    first = run(logic, settings)[-1].node
    again = change(settings, seed=6, slices=6, outputVolume=first)
    second = run(logic, again)[-1].node
    assert second is first
    assert len(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")) == 1
    assert first.GetName().endswith("seed 6") and first.GetAttribute("CTFlow.seed") == "6"
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(first), expected_volume(tiny_pipeline, again).hu)
    third = run(logic, change(settings, outputVolume=None))[-1].node
    assert third is not first and len(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")) == 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"report": "  "}, "the report is empty"),
        ({"modelSource": "BUNDLED"}, "No trained CTFlow model is bundled"),
        ({"modelSource": "FOLDER", "modelLocation": "/no/such/model"}, "does not exist"),
        ({"modelSource": "HUB", "modelLocation": ""}, "type a hub id"),
        ({"device": "CUDA"}, "CUDA was requested"),
        ({"slices": 1000}, "more than this model makes"),  # the node holds up to 2048; the tiny model 512
    ],
)
def test_errors_end_as_a_message_without_a_node(scene, logic, settings, monkeypatch, fields, message, change):
    from CTFlowSlicerLib.parameters import Device, ModelSource

    monkeypatch.setattr(resources, "bundledModel", lambda: None)
    if fields.get("device") == "CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    members = {"modelSource": ModelSource, "device": Device}  # fields named by their Enum member
    fields = {name: members[name][value] if name in members else value for name, value in fields.items()}
    final = run(logic, change(settings, **fields))[-1]
    assert final.state == "failed"
    assert final.message.startswith("Error:") and message in final.message
    assert final.node is None and not slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")


def test_a_worker_that_dies_gives_one_line_and_the_next_run_a_new_worker(scene, logic, settings, change):
    def kill_after_first_block(progress):
        if progress.firstBlock:
            os.kill(logic._worker.process.pid, signal.SIGKILL)  # what the kernel's OOM killer does

    final = run(logic, change(settings, slices=400), onProgress=kill_after_first_block)[-1]
    assert final.state == "failed" and final.node is not None
    assert "stopped unexpectedly (exit code -9, killed by SIGKILL" in final.message
    assert "The next Generate starts a new one." in final.message
    assert final.node.GetAttribute("CTFlow.partial") == "True"
    assert slicer.util.arrayFromVolume(final.node).shape[0] == final.slices > 0
    again = run(logic, change(settings, slices=10))[-1]
    assert again.state == "done" and again.slices == 10


def test_a_block_the_scene_cannot_take_ends_the_run_with_what_it_has(scene, logic, settings, change, monkeypatch):
    appended = generation.appendBlock

    def append_then_run_out_of_memory(node, hu):
        monkeypatch.setattr(generation, "appendBlock", appended)  # the next run appends again
        raise MemoryError("Unable to allocate 512 MiB for an array")

    monkeypatch.setattr(generation, "appendBlock", append_then_run_out_of_memory)
    final = run(logic, change(settings, slices=400, steps=50))[-1]
    assert final.state == "failed" and final.blocksDone == 1  # not "done" with a block missing
    assert final.message.startswith("Error: the block the generation process sent could not be applied (Unable "
                                    "to allocate 512 MiB")
    assert final.node.GetAttribute("CTFlow.partial") == "True"
    assert slicer.util.arrayFromVolume(final.node).shape[0] == final.slices < 400
    again = run(logic, change(settings, slices=10))[-1]  # the worker stopped that run and takes the next
    assert again.state == "done" and again.slices == 10


def test_a_stuck_worker_is_ended_after_the_cancel_grace(scene, logic, settings, change):
    """The grace is twice the longest the worker took between two messages of the run (a block, a model load):
    a model whose blocks take long is not ended while it finishes one."""
    state = {}

    def freeze_then_cancel(progress):
        if progress.firstBlock:
            logic._run.slowest = 2.5  # as if its blocks took 2.5 s each (the tiny model's take less)
            state["pid"] = logic._worker.process.pid
            os.kill(state["pid"], signal.SIGSTOP)  # a worker stuck in a long native call
            state["cancelled"] = time.monotonic()
            logic.cancel()
            assert logic.poll().message.startswith("Cancelling:")  # the blocks that follow do not replace it

    final = run(logic, change(settings, slices=400), onProgress=freeze_then_cancel)[-1]
    waited = time.monotonic() - state["cancelled"]
    assert 5.0 <= waited  # never ended before the grace; how soon after is the machine's
    assert final.state == "cancelled" and "did not stop within 5 s and was ended" in final.message
    assert final.node.GetAttribute("CTFlow.partial") == "True"
    with pytest.raises(ProcessLookupError):
        os.killpg(state["pid"], 0)  # the worker's whole process group is gone
    assert run(logic, change(settings, slices=10))[-1].state == "done"


def test_a_cancel_the_worker_obeyed_is_not_ended_after_a_busy_main_thread(scene, logic, settings, change):
    """The main thread may be busy past the cancel grace while the worker has already stopped: its "cancelled"
    waits behind blocks not yet applied, and the worker (with its loaded model) is kept."""
    import CTFlowSlicer

    logic.start(change(settings, slices=400))
    while logic.poll().node is None:
        time.sleep(0.01)
    worker = logic._worker
    logic.cancel()
    time.sleep(CTFlowSlicer.CANCEL_GRACE_S + 1)  # Slicer busy elsewhere: no poll
    while not (final := logic.poll()).finished:
        pass
    assert final.state == "cancelled" and "did not stop" not in final.message
    assert logic._worker is worker and worker.returncode is None and not worker.ended


def test_stop_after_the_worker_ended_the_run_removes_its_folder_at_once(scene, logic, settings, change):
    logic.start(change(settings, slices=10))
    while logic.poll().node is None:
        time.sleep(0.01)
    run = logic._run
    deadline = time.monotonic() + 60
    while not logic._ended(run.runId):  # the worker has made the rest and said "done"; nothing more is applied
        assert time.monotonic() < deadline, "the worker did not finish the run"
        logic._receive()
        time.sleep(0.05)
    folder = run.folder
    assert folder.is_dir() and len(list(folder.glob("block-*.npy"))) >= 2  # blocks made but not yet applied
    logic.stop()  # the scene closes before the panel applied the rest
    assert not folder.exists() and not logic.isRunning()


def test_generate_overwrites_only_a_volume_ctflow_made(scene, logic, settings, change):
    """A patient's volume chosen as the output would take synthetic voxels under its own identity and file."""
    patient = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Patient CT")
    patient.SetAttribute("DICOM.PatientName", "Doe^Jane")
    final = run(logic, change(settings, outputVolume=patient))[-1]
    assert final.state == "failed" and final.node is None
    assert "Patient CT was not made by CTFlow" in final.message and "Create a new volume" in final.message
    assert patient.GetName() == "Patient CT" and patient.GetImageData() is None
    assert not [name for name in patient.GetAttributeNames() if name.startswith("CTFlow.")]


def test_a_start_that_fails_outside_ctflow_ends_the_run_and_the_next_one_works(scene, settings, change, tmp_path,
                                                                              monkeypatch):
    """"~nosuchuser" cannot be expanded (RuntimeError) and a worker program that cannot run raises OSError: each
    ends the run with one line, and the Logic is free for the next Generate."""
    import CTFlowSlicer

    logic = CTFlowSlicer.CTFlowSlicerLogic()
    folder = settings.modelLocation
    try:
        change(settings, modelLocation="~nosuchuser_ctflow/model")
        assert CTFlowSlicer.modelStatus(settings)[0]  # a problem, said on the model row
        final = run(logic, settings)[-1]
        assert final.state == "failed" and "cannot be found" in final.message
        notExecutable = tmp_path / "PythonSlicer"
        notExecutable.write_text("")
        monkeypatch.setattr(CTFlowSlicer, "workerPython", lambda: str(notExecutable))
        final = run(logic, change(settings, modelLocation=folder))[-1]
        assert final.state == "failed" and "Permission denied" in final.message
        monkeypatch.undo()
        assert run(logic, settings)[-1].state == "done"
    finally:
        logic.shutdown()


def test_a_worker_that_dies_at_start_says_so_on_the_device_line(qt_application, monkeypatch):
    import CTFlowSlicer

    monkeypatch.setattr(CTFlowSlicer, "workerPython", lambda: "/bin/false")
    logic = CTFlowSlicer.CTFlowSlicerLogic()
    try:
        logic.startWorker()
        deadline = time.monotonic() + 30
        while logic.workerStarting():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        line = logic.deviceDescription()
        assert line.startswith("The generation process stopped before it could detect") and "exit code 1" in line
        assert not logic.unloadModel()  # no process, so no model to unload
    finally:
        logic.shutdown()


def frozen_worker_of(logic, settings):
    """Start a long run and freeze its worker once the first block is in, as a worker stuck in a native call."""
    logic.start(settings)
    while logic.poll().node is None:
        time.sleep(0.01)
    pid = logic._worker.process.pid
    os.kill(pid, signal.SIGSTOP)
    return pid


def test_closing_the_scene_or_quitting_never_waits_on_the_worker(scene, logic, settings, change):
    """stop() and shutdown() must return even when the worker never answers; a wait would hang, which the alarm
    turns into a failure (a guard against hanging, not a timing target)."""
    import CTFlowSlicer

    def hung(signum, frame):
        raise AssertionError("the Logic waited on a frozen worker")

    folders = run_folders()
    previous = signal.signal(signal.SIGALRM, hung)
    try:
        first = frozen_worker_of(logic, change(settings, slices=400))
        signal.alarm(20)
        logic.stop()  # what the panel does when the scene starts closing
        signal.alarm(0)
        assert not logic.isRunning() and logic.poll().state == "idle"
        os.kill(first, signal.SIGCONT)  # the worker goes on, sees the cancel and ends its run

        other = CTFlowSlicer.CTFlowSlicerLogic()  # quitting while a run is in progress
        second = frozen_worker_of(other, change(settings, slices=400))
        signal.alarm(20)
        other.shutdown()
        signal.alarm(0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    with pytest.raises(ProcessLookupError):
        os.kill(second, 0)  # ended after its grace, although it never answered
    deadline = time.monotonic() + 30
    while run_folders() - folders and time.monotonic() < deadline:  # the first logic's worker ends its run
        logic.poll()
        time.sleep(0.05)
    assert run_folders() - folders == set()


def test_provenance_survives_scene_save_and_reload(scene, logic, settings, tmp_path):
    node = run(logic, settings)[-1].node
    hu = slicer.util.arrayFromVolume(node).copy()
    storage = node.CreateDefaultStorageNode()
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(tmp_path / "synthetic.nrrd"))
    assert storage.WriteData(node)
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()

    slicer.mrmlScene = reloaded = slicer.vtkMRMLScene()
    reloaded.SetURL(str(tmp_path / "scene.mrml"))
    assert reloaded.Connect()
    copy = reloaded.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
    names = [node.GetAttributeNames()[i] for i in range(len(node.GetAttributeNames()))]
    assert {name: copy.GetAttribute(name) for name in names} == {name: node.GetAttribute(name) for name in names}
    assert logic.provenanceOf(copy) == logic.provenanceOf(node)
    # Slicer stores a right-handed IJK: the reloaded k axis runs inferior to superior, same voxels in space.
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(copy)[::-1], hu)
    flipped = generation.ijkToRAS(node) @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 9], [0, 0, 0, 1]])
    np.testing.assert_allclose(generation.ijkToRAS(copy), flipped, atol=1e-6)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_saved_files_carry_voxels_geometry_and_provenance(scene, logic, settings, tmp_path, suffix):
    node = run(logic, settings)[-1].node
    written = logic.saveVolume(node, tmp_path / f"synthetic{suffix}")
    volume = ctflow.read_volume(written)
    np.testing.assert_array_equal(volume.hu, slicer.util.arrayFromVolume(node))
    np.testing.assert_allclose(volume.geometry.ijk_to_ras(), generation.ijkToRAS(node), atol=1e-5)
    assert volume.provenance == logic.provenanceOf(node)
    node.RemoveAttribute(generation.SYNTHETIC_ATTRIBUTE)  # the mark removed: its file would say nothing
    with pytest.raises(ctflow.CTFlowError, match="could not say that it is synthetic"):
        logic.saveVolume(node, tmp_path / f"unmarked{suffix}")
    assert not (tmp_path / f"unmarked{suffix}").exists()


def test_a_cancelled_volume_exports_as_an_incomplete_dicom_series(scene, logic, settings, change, tmp_path,
                                                                  dicom_database):
    def cancel_after_first_block(progress):
        if progress.firstBlock:
            logic.cancel()

    node = run(logic, change(settings, slices=400), onProgress=cancel_after_first_block)[-1].node
    export = logic.exportDicom(node, tmp_path / "partial.dcm")
    assert export.description == "SYNTHETIC CT (CTFlow) - NOT FOR DIAGNOSIS - INCOMPLETE"
    assert export.imported and export.instances == slicer.util.arrayFromVolume(node).shape[0] < 400
    series = ctflow.read_volume(export.folder)
    assert series.provenance.partial and series.provenance == logic.provenanceOf(node)
    np.testing.assert_array_equal(series.hu, slicer.util.arrayFromVolume(node))
    uid = pydicom.dcmread(sorted(export.folder.iterdir())[0], stop_before_pixels=True).SeriesInstanceUID
    assert len(dicom_database.filesForSeries(uid)) == export.instances


def test_the_slice_views_show_the_generated_volume(scene, logic, settings, slice_views, output_dir, change):
    node = run(logic, change(settings, slices=12))[-1].node
    axial, coronal, sagittal = slice_views.render(scene, node, size=64)
    assert all(view.shape == (64, 64, 3) and view.std() > 10 for view in (axial, coronal, sagittal))
    assert not np.array_equal(axial, coronal) and not np.array_equal(coronal, sagittal)
    slice_views.save_side_by_side([axial, coronal, sagittal], output_dir / "slicer_views_tiny.png")


def test_window_presets(scene):
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    node.CreateDefaultDisplayNodes()
    for name in SLICE_VIEW_WINDOWS:
        window, level = WINDOWS[name].width, WINDOWS[name].level
        applyWindow(node, name)
        assert (node.GetDisplayNode().GetWindow(), node.GetDisplayNode().GetLevel()) == (window, level)


def test_the_parameter_node_takes_only_the_panels_windows(settings, change):
    change(settings, window="bone")
    with pytest.raises(ValueError, match="abdomen"):  # no window button shows it, no preset applies it
        change(settings, window="abdomen")
    assert settings.window == "bone"


def test_the_request_is_kept_in_the_scene(scene, logic, settings, change, tmp_path):
    """The parameter node survives saving and reopening the scene, so a scene reopens with the same request."""
    from CTFlowSlicerLib.parameters import Device, ModelSource

    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "target")
    change(settings, report="Findings: a\nb", impressions="c", slices=64, seed=9, steps=30, guidance=2.5,
           sideGuidance=4.0, findingGuidance=1.5, device=Device.CPU, modelSource=ModelSource.HUB,
           modelLocation="org/m@v1", outputVolume=volume, window="bone")
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()
    reopened = slicer.vtkMRMLScene()
    reopened.SetURL(str(tmp_path / "scene.mrml"))
    assert reopened.Connect()
    kind = "vtkMRMLScriptedModuleNode"
    nodes = (reopened.GetNthNodeByClass(i, kind) for i in range(reopened.GetNumberOfNodesByClass(kind)))
    node = next(node for node in nodes if node.GetParameter("report"))
    again = type(settings)(node)
    fields = ("report", "impressions", "slices", "seed", "steps", "guidance", "sideGuidance", "findingGuidance",
              "device", "modelSource", "modelLocation", "window")
    assert {f: getattr(again, f) for f in fields} == {f: getattr(settings, f) for f in fields}
    assert again.outputVolume.GetName() == "target" and again.generatedVolume is None
    assert generation.modelChoice(again, None) == ("org/m", "v1")
    assert generation.requestFields(again) == {"report": "Findings: a\nb", "impressions": "c", "slices": 64,
                                               "seed": 9, "steps": 30, "guidance": 2.5, "side_guidance": 4.0,
                                               "finding_guidance": 1.5}
    for name, field in (("sideGuidance", "side_guidance"), ("findingGuidance", "finding_guidance")):
        assert generation.requestFields(change(settings, **{name: 0.0}))[field] == 0.0  # off, not the default
        assert generation.requestFields(change(settings, **{name: -1.0}))[field] is None  # the model's


def test_the_published_model_runs_in_the_panel_like_any_model_folder(scene, logic, settings, released_model, change):
    """A folder from `ctflow import-released` (tiny, released layout): a synthetic volume in HU at its spacing."""
    final = run(logic, change(settings, modelLocation=str(released_model), slices=20, steps=3))[-1]
    assert (final.state, final.slices) == ("done", 20), final.message
    node = final.node
    assert node.GetSpacing() == pytest.approx((1.40625, 1.40625, 1.5))
    hu = slicer.util.arrayFromVolume(node)
    assert hu.shape == (20, 16, 16) and -1000 <= hu.min() and hu.max() <= 1000
    assert node.GetAttribute("CTFlow.model") == "ctflow-released-D64"
    guided = run(logic, change(settings, guidance=2.0))[-1]
    assert guided.state == "failed" and "trained without text dropout" in guided.message


def test_a_fresh_parameter_node_draws_a_seed(scene, logic):
    seeds = set()
    for _ in range(3):
        slicer.mrmlScene = slicer.vtkMRMLScene()
        seeds.add(logic.getParameterNode().seed)
    assert len(seeds) == 3  # each new scene gets its own
    assert logic.getParameterNode().seed == logic.getParameterNode().seed  # and keeps it


def test_the_worker_runs_on_slicers_python_never_on_the_application(qt_application, tmp_path, monkeypatch):
    import CTFlowSlicer

    application = tmp_path / "bin" / "SlicerApp-real"  # what sys.executable is inside Slicer
    application.parent.mkdir()
    monkeypatch.setattr(CTFlowSlicer.sys, "executable", str(application))
    monkeypatch.setenv("PATH", str(tmp_path / "elsewhere"))
    with pytest.raises(ctflow.CTFlowError, match="PythonSlicer"):
        CTFlowSlicer.workerPython()
    launcher = application.with_name("PythonSlicer")
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    assert CTFlowSlicer.workerPython() == str(launcher)


@pytest.mark.parametrize(
    ("ready", "line"),
    [({"cuda": True, "gpu": "NVIDIA H100", "gpu_memory_gb": 79.6, "torch_version": "2.6.0+cu124"},
      "Detected: NVIDIA H100, 80 GB (PyTorch 2.6.0+cu124)."),
     ({"cuda": False, "gpu": None, "gpu_memory_gb": None, "torch_version": "2.13.0+cpu"}, "is a CPU-only build"),
     ({"cuda": False, "gpu": None, "gpu_memory_gb": None, "torch_version": "2.6.0+cu124"}, "no CUDA GPU")],
)
def test_the_device_line_says_what_the_worker_found(qt_application, ready, line):
    import CTFlowSlicer

    logic = CTFlowSlicer.CTFlowSlicerLogic()
    assert logic.deviceDescription().startswith("PyTorch and the GPU are detected when")
    logic._workerInfo = {"type": "ready", **ready}  # what the worker's ready message says
    assert line in logic.deviceDescription()
