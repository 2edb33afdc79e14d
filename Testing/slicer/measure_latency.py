"""Time from Generate to the first block in the volume node, and to completion, through the module's logic.

    .venv/bin/python Testing/slicer/measure_latency.py                  # a tiny random model (16x16 slices)
    .venv/bin/python Testing/slicer/measure_latency.py --preset cpu     # random weights of the CPU model's size
    .venv/bin/python Testing/slicer/measure_latency.py --model FOLDER   # e.g. Resources/Models/ctflow-demo

Each model runs twice: cold (the model is loaded first) and warm (kept loaded, as the panel's logic does).
The scene is a real MRML scene; polling every 10 ms stands in for the panel's 100 ms timer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "CTFlowSlicer"))

import ctflow  # noqa: E402
import slicer  # noqa: E402

from CTFlowSlicerLib.logic import GenerationLogic  # noqa: E402
from CTFlowSlicerLib.parameters import GenerationSettings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model folder (default: a random model of --preset)")
    parser.add_argument("--preset", default="tiny", choices=("tiny", "cpu"), help="size of the random model")
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--steps", type=int, default=0, help="sampling steps per block (0: the model's default)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args()
    model = args.model or ctflow.create_random_model(Path(tempfile.mkdtemp()) / args.preset, args.preset)
    slicer.mrmlScene = slicer.vtkMRMLScene()
    report = (REPO / "Resources" / "SampleReports" / "right_pleural_effusion.txt").read_text(encoding="utf-8")
    settings = GenerationSettings(
        report=report, slices=args.slices, seed=1, steps=args.steps, device=args.device, modelSource="folder",
        modelLocation=str(model),
    )
    logic = GenerationLogic()
    for run in ("cold", "warm"):
        first, total, progress = timed(logic, settings)
        print(f"{run}: first block in the node after {first:.2f} s, complete after {total:.2f} s "
              f"({progress.slices} slices in {progress.blocksDone} blocks, {progress.state})")


def timed(logic: GenerationLogic, settings: GenerationSettings):
    started = time.perf_counter()
    first = None
    logic.start(settings)
    while True:
        progress = logic.poll()
        if progress.firstBlock:
            first = time.perf_counter() - started
        if progress.finished:
            return first, time.perf_counter() - started, progress
        time.sleep(0.01)


if __name__ == "__main__":
    main()
