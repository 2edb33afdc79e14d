"""The red, yellow and green slice views of a volume, rendered offscreen by Slicer's own slice logic (slicer-core's
vtkMRMLSliceLogic: reslicing, window/level and colour table as in the application; no window, no annotations).

    .venv/bin/python Testing/slicer/slice_views.py --out docs/images/slicer_views.png    # the bundled demo model

makes the extension's screenshot: a volume generated through the module's Logic (worker process and all),
shown axial | coronal | sagittal in the lung window.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VIEWS = (("Red", "Axial"), ("Green", "Coronal"), ("Yellow", "Sagittal"))
_KEEP = []  # logics that must outlive render()


def render(scene, volume, size: int = 320) -> list[np.ndarray]:
    """RGB [size, size, 3] uint8 per view, each fitted to the volume and through its centre."""
    import slicer
    from vtk.util.numpy_support import vtk_to_numpy

    if scene.GetNodeByID("vtkMRMLColorTableNodeGrey") is None:  # what the application sets up at start-up:
        for logic in (slicer.vtkMRMLApplicationLogic(), slicer.vtkMRMLColorLogic()):  # orientation presets, colours
            _KEEP.append(logic)  # what they add to the scene goes when they go
            logic.SetMRMLScene(scene)
    if volume.GetDisplayNode().GetColorNodeID() is None:  # as the application's default display node has
        volume.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    images = []
    for name, orientation in VIEWS:
        logic = slicer.vtkMRMLSliceLogic()
        _KEEP.append(logic)
        logic.SetMRMLScene(scene)
        node = logic.AddSliceNode(f"CTFlowScreenshot{name}")
        node.SetOrientation(orientation)
        node.SetDimensions(size, size, 1)
        logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume.GetID())
        logic.FitSliceToAll()
        logic.UpdateImageData()
        producer = logic.GetImageDataConnection().GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(0)
        width, height, _ = image.GetDimensions()
        rgba = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, 4).astype(float)
        rgb = rgba[..., :3] * rgba[..., 3:] / 255  # outside the volume is transparent: black, as in Slicer's views
        images.append(np.ascontiguousarray(rgb[::-1].round().astype(np.uint8)))  # VTK's rows run bottom-up
    return images


def save_side_by_side(images: list[np.ndarray], path: Path, gap: int = 4) -> None:
    from PIL import Image

    height = max(image.shape[0] for image in images)
    row = np.zeros((height, sum(image.shape[1] for image in images) + gap * (len(images) - 1), 3), np.uint8)
    x = 0
    for image in images:
        row[: image.shape[0], x: x + image.shape[1]] = image
        x += image.shape[1] + gap
    Image.fromarray(row).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--model", type=Path, help="model folder (default: the bundled demo model)")
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--report", type=Path, default=Path("Resources/SampleReports/right_pleural_effusion.txt"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "CTFlowSlicer"))
    import standin  # this script's folder is on sys.path

    standin.install(tempfile.mkdtemp())
    import slicer

    import CTFlowSlicer
    from CTFlowSlicerLib.parameters import ModelSource

    slicer.mrmlScene = slicer.vtkMRMLScene()
    logic = CTFlowSlicer.CTFlowSlicerLogic()
    settings = logic.getParameterNode()
    settings.report, settings.slices, settings.seed = args.report.read_text(encoding="utf-8"), args.slices, 1
    settings.modelSource, settings.modelLocation = (ModelSource.FOLDER, str(args.model)) if args.model \
        else (ModelSource.BUNDLED, "")
    try:
        logic.start(settings)
        while not (progress := logic.poll()).finished:
            time.sleep(0.1)
    finally:
        logic.shutdown()
    if progress.state != "done":
        raise SystemExit(progress.message)
    save_side_by_side(render(slicer.mrmlScene, progress.node), args.out)
    print(f"wrote {args.out}: {progress.message}")


if __name__ == "__main__":
    main()
