"""Generation through the Slicer module's Logic, on a main thread that holds the GIL while idle as Slicer's does,
against the plain `ctflow generate` on the same machine.

    .venv/bin/python bench/slicer_logic.py                    # a tiny random model, 32 slices, 400 steps
    .venv/bin/python bench/slicer_logic.py --model FOLDER     # e.g. Resources/Models/ctflow-demo (slow on a CPU)

Reports, for the Logic: the time from Generate to the first block in the volume node (cold: the worker starts
and loads the model; warm: it kept them), slices per second on the warm run, and how long each block took
from its file being written by the worker to its slices being in the node. For the CLI: slices per second
of the generation itself (after the model is loaded). Goal: the Logic's warm rate >= 90 % of the CLI's,
each block in the scene within 1 s of being decoded. Random weights time like trained ones of their size.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ctflow_train.options import count, positive

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "CTFlowSlicer"), str(REPO / "Testing" / "slicer")]  # the module; standin, pythonqt_host
REPORT = REPO / "Resources" / "SampleReports" / "right_pleural_effusion.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model folder (default: a random model of --preset)")
    parser.add_argument("--preset", default="tiny", choices=("tiny", "cpu"), help="size of the random model")
    parser.add_argument("--slices", type=positive(int), default=32)
    parser.add_argument("--steps", type=count, default=400,
                        help="sampling steps per block (0: the model's default); 400 gives the tiny model blocks "
                             "of about half a second, several timer ticks, as real models have")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--tick", type=positive(float), default=0.1,
                        help="the panel's timer interval, s (default: 0.1)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="ctflow-bench-"))
    from ctflow.testing import create_random_model

    model = args.model or create_random_model(scratch / args.preset, args.preset)

    command = [sys.executable, "-m", "ctflow", "generate", "--report-file", str(REPORT), "--out",
               str(scratch / "cli.nrrd"), "--slices", str(args.slices), "--seed", "1", "--model", str(model),
               "--device", args.device, "--overwrite"] + (["--steps", str(args.steps)] if args.steps else [])

    def cli() -> float:
        wrote = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        slices, seconds = re.search(r"\((\d+) slices of .*, ([\d.]+) s\)", wrote).groups()
        print(f"CLI: {slices} slices in {seconds} s after loading: {int(slices) / float(seconds):.2f} slices/s")
        return int(slices) / float(seconds)

    import pythonqt_host as host
    import slicer
    import standin

    standin.install(str(scratch))

    import CTFlowSlicer

    slicer.mrmlScene = slicer.vtkMRMLScene()
    logic = CTFlowSlicer.CTFlowSlicerLogic()
    settings = logic.getParameterNode()
    settings.report, settings.slices, settings.seed = REPORT.read_text(encoding="utf-8"), args.slices, 1
    settings.steps = args.steps
    settings.device, settings.modelSource, settings.modelLocation = args.device, "folder", str(model)
    try:
        for run in ("cold", "warm"):
            started, first, latencies, planned = time.perf_counter(), [], [], []

            def seen(progress):
                if progress.state == "generating" and not planned:  # the request is embedded; sampling starts
                    planned.append(time.perf_counter())
                if progress.firstBlock:
                    first.append(time.perf_counter() - started)
                if progress.blocksDone > len(latencies):
                    latencies.append(progress.blockLatency)

            snapshots, seconds = host.drive(logic, settings, tick=args.tick, on_progress=seen)
            final = snapshots[-1]
            sampling = started + seconds - planned[0]
            rate = final.slices / sampling
            cli_rate = (cli() + cli()) / 2  # the shared machine's load drifts: the CLI runs beside each Logic run
            print(f"Logic under the GIL-holding host, {run}: first block in the node after {first[0]:.2f} s, "
                  f"{final.slices} slices ({final.state}) in {seconds:.2f} s, {sampling:.2f} s after planning "
                  f"(as the CLI counts): {rate:.2f} slices/s ({100 * rate / cli_rate:.0f} % of the CLI); "
                  f"block file -> node: max {max(latencies):.2f} s, "
                  f"mean {sum(latencies) / len(latencies):.2f} s")
    finally:
        logic.shutdown()


if __name__ == "__main__":
    main()
