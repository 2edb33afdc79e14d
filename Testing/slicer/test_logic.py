"""The module's logic against a real MRML scene (slicer-core, no Slicer application) and a tiny real model."""

from __future__ import annotations

import dataclasses
import threading
import time

import ctflow
import numpy as np
import pytest
import slicer
import torch

from CTFlowSlicerLib import logic, resources
from CTFlowSlicerLib.display import WINDOW_PRESETS, applyWindow
from CTFlowSlicerLib.parameters import GenerationSettings


def run(generation, settings, replace=None, onProgress=lambda progress: None, timeout=120.0):
    """Start, then poll as the panel's timer does until the end; returns every snapshot."""
    generation.start(settings, replace)
    snapshots = []
    deadline = time.monotonic() + timeout
    while not (snapshots and snapshots[-1].finished):
        assert time.monotonic() < deadline, "generation did not finish"
        snapshots.append(generation.poll())
        onProgress(snapshots[-1])
        time.sleep(0.005)
    return snapshots


def expected_volume(tiny_pipeline, settings) -> ctflow.Volume:
    """What the library itself makes for these settings."""
    return tiny_pipeline.generate(logic.generationRequest(settings))


def workers_alive() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == logic.THREAD_NAME]


def test_blocks_stream_into_the_node_with_the_library_output(scene, generation, settings, tiny_pipeline):
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
        np.testing.assert_allclose(logic.ijkToRAS(node), expected.geometry.ijk_to_ras())
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), expected.hu[:slices])
        if slices < 10:
            assert node.GetAttribute("CTFlow.partial") == "True"

    snapshots = run(generation, settings, onProgress=check)
    assert seen == [4, 8, 10]  # one block per poll: the views fill in block by block
    assert [s.firstBlock for s in snapshots].count(True) == 1
    final = snapshots[-1]
    assert (final.state, final.blocksDone, final.blocksExpected, final.slices) == ("done", 3, 3, 10)
    assert final.message.startswith("Done: 10 slices") and "not for diagnosis" in final.message
    assert not workers_alive()


def test_a_volume_that_ends_where_a_block_would_start_shows_every_block_done(scene, generation, settings, steered):
    """The model draws its end marker as block 3's first slice: the stream learns that block 2 was the last only
    after handing it over, with an estimate of more blocks to come."""
    generation._loaded = ((settings.modelLocation, None, "cpu"), steered(2, 0))  # as if this model were loaded
    try:
        snapshots = run(generation, dataclasses.replace(settings, slices=0))
    finally:
        generation._loaded = None
    assert any(s.blocksExpected > 2 for s in snapshots if s.state == "generating")
    final = snapshots[-1]
    assert (final.state, final.blocksDone, final.blocksExpected, final.slices) == ("done", 2, 2, 8)
    assert final.barText == "2 / 2 blocks"


def test_the_node_carries_name_provenance_and_window(scene, generation, settings):
    node = run(generation, dataclasses.replace(settings, window="bone"))[-1].node
    assert node.GetName() == "Synthetic CT (CTFlow) - Moderate right pleural effusion. - seed 5"
    assert node.GetAttribute("CTFlow.Synthetic") == ctflow.SYNTHETIC_NOTICE
    assert node.GetAttribute("CTFlow.seed") == "5"
    assert node.GetAttribute("CTFlow.steps") == "2"
    assert node.GetAttribute("CTFlow.guidance") == "1.0"  # the tiny model's default
    assert node.GetAttribute("CTFlow.model") == "random-tiny"
    assert node.GetAttribute("CTFlow.ctflow_version") == ctflow.__version__
    assert node.GetAttribute("CTFlow.partial") == "False"
    assert "right pleural effusion" in node.GetAttribute("CTFlow.report")
    provenance = generation.provenanceOf(node)
    assert (provenance.seed, provenance.steps, provenance.partial) == (5, 2, False)
    display = node.GetDisplayNode()
    assert (display.GetWindow(), display.GetLevel()) == WINDOW_PRESETS["bone"]
    assert not display.GetAutoWindowLevel()
    composites = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
    assert [c.GetBackgroundVolumeID() for c in composites] == [node.GetID()] * 3


def test_cancel_stops_within_a_block_and_keeps_a_partial_volume(scene, generation, settings):
    state = {}

    def cancel_after_first_block(progress):
        if progress.firstBlock:
            state["at_cancel"] = progress.blocksDone
            generation.cancel()

    snapshots = run(generation, dataclasses.replace(settings, slices=400), onProgress=cancel_after_first_block)
    final = snapshots[-1]
    assert final.state == "cancelled"
    assert final.blocksDone <= state["at_cancel"] + 2  # at most the block already queued: the one in work is dropped
    assert slicer.util.arrayFromVolume(final.node).shape[0] == final.slices < 400
    assert final.node.GetAttribute("CTFlow.partial") == "True"
    assert final.message.startswith("Cancelled: kept")
    assert not workers_alive()


def test_replace_mode_reuses_the_last_node(scene, generation, settings, tiny_pipeline):
    first = run(generation, settings)[-1].node
    again = dataclasses.replace(settings, seed=6, slices=6, replaceOutput=True)
    second = run(generation, again, replace=first)[-1].node
    assert second is first
    assert len(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")) == 1
    assert first.GetName().endswith("seed 6") and first.GetAttribute("CTFlow.seed") == "6"
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(first), expected_volume(tiny_pipeline, again).hu)
    third = run(generation, settings)[-1].node
    assert third is not first and len(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")) == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"report": "  "}, "the report is empty"),
        ({"modelSource": "bundled"}, "No trained CTFlow model is bundled"),
        ({"modelSource": "folder", "modelLocation": "/no/such/model"}, "does not exist"),
        ({"modelSource": "hub", "modelLocation": ""}, "type a hub id"),
        ({"device": "cuda"}, "CUDA was requested"),
    ],
)
def test_errors_end_as_a_message_without_a_node(scene, generation, settings, monkeypatch, change, message):
    monkeypatch.setattr(resources, "bundledModel", lambda: None)
    if change.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    final = run(generation, dataclasses.replace(settings, **change))[-1]
    assert final.state == "failed"
    assert final.message.startswith("Error:") and message in final.message
    assert final.node is None and not slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
    assert not workers_alive()



@pytest.mark.parametrize(
    ("error", "message"),
    [(torch.cuda.OutOfMemoryError("CUDA out of memory"), "out of GPU memory: choose CPU"),
     (RuntimeError("boom"), "unexpected RuntimeError: boom")],
)
def test_worker_failures_end_as_a_message(scene, generation, settings, monkeypatch, error, message):
    def fail(settings):
        raise error

    monkeypatch.setattr(logic, "generationRequest", fail)
    final = run(generation, settings)[-1]
    assert final.state == "failed" and message in final.message
    assert not workers_alive()

def test_provenance_survives_scene_save_and_reload(scene, generation, settings, tmp_path):
    node = run(generation, settings)[-1].node
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
    assert generation.provenanceOf(copy) == generation.provenanceOf(node)
    # Slicer stores a right-handed IJK: the reloaded k axis runs inferior to superior, same voxels in space.
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(copy)[::-1], hu)
    flipped = logic.ijkToRAS(node) @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 9], [0, 0, 0, 1]])
    np.testing.assert_allclose(logic.ijkToRAS(copy), flipped, atol=1e-6)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_saved_files_carry_voxels_geometry_and_provenance(scene, generation, settings, tmp_path, suffix):
    node = run(generation, settings)[-1].node
    written = generation.saveVolume(node, tmp_path / f"synthetic{suffix}")
    volume = ctflow.read_volume(written)
    np.testing.assert_array_equal(volume.hu, slicer.util.arrayFromVolume(node))
    np.testing.assert_allclose(volume.geometry.ijk_to_ras(), logic.ijkToRAS(node), atol=1e-5)
    assert volume.provenance == generation.provenanceOf(node)


def test_window_presets(scene):
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    node.CreateDefaultDisplayNodes()
    for name, (window, level) in WINDOW_PRESETS.items():
        applyWindow(node, name)
        assert (node.GetDisplayNode().GetWindow(), node.GetDisplayNode().GetLevel()) == (window, level)


def test_settings_round_trip_through_the_parameter_node(scene):
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    settings = GenerationSettings(report="Findings: a\nb", impressions="c", slices=64, seed=9, steps=30,
                                  guidance=2.5, device="cpu", modelSource="hub", modelLocation="org/m@v1",
                                  replaceOutput=True, window="bone")
    settings.save(node)
    assert GenerationSettings.load(node) == settings
    assert logic.modelChoice(settings) == ("org/m", "v1")



def test_the_published_model_runs_in_the_panel_like_any_model_folder(scene, generation, settings, released_model):
    """A folder from `ctflow import-released` (tiny, released layout): a synthetic volume in HU at its spacing."""
    released = dataclasses.replace(settings, modelLocation=str(released_model), slices=20, steps=3)
    final = run(generation, released)[-1]
    assert (final.state, final.slices) == ("done", 20), final.message
    node = final.node
    assert node.GetSpacing() == pytest.approx((1.40625, 1.40625, 1.5))
    hu = slicer.util.arrayFromVolume(node)
    assert hu.shape == (20, 16, 16) and -1000 <= hu.min() and hu.max() <= 1000
    assert node.GetAttribute("CTFlow.model") == "ctflow-released-D64"
    guided = run(generation, dataclasses.replace(released, guidance=2.0))[-1]
    assert guided.state == "failed" and "trained without text dropout" in guided.message
