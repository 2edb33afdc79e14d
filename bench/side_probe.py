"""Does a model put a finding on the side its report names? A detector-free probe, and the confound it can learn.

probe: for side twins (`ctflow-train cohort --side-twins ...`: one patient, the same finding drawn on the right and
  on the left), generate the right report and the left report on the same seed and score each pair by
  half_difference(right) - half_difference(left): the patient's right half minus the left half, mean HU over the
  slices from 30 to 90 % of the body, clipped to [-1000, 200]. The real twins' score says how large and which sign
  the finding's side gives (positive); a model that follows the side scores positive too.
  Also the pair's mean abs HU change (how much else the side words move).
confound: the same half difference over the middle third of the real volumes of one or more cohorts (pooled),
  grouped by the side words of their Findings. A side word that comes with an anatomy (a denser half) in the
  cohort is something a denoiser can learn instead of the finding's side (docs/training-log.md, 2026-11-29 and
  2026-11-30 late night).

  python bench/side_probe.py probe --model Resources/Models/ctflow-demo --data cache/contrast/sideprobe \
      --side-guidance 0 8 --out cache/side_probe.json
  python bench/side_probe.py confound --data cache/cohort
  python bench/side_probe.py confound --data cache/tw1_29 cache/tw1_40   # two one-patient twin cohorts, pooled
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
from ctflow.conventions import real_slices, right_half  # noqa: E402
from ctflow.entry import quiet_third_party_logs  # noqa: E402
from ctflow.errors import CTFlowError  # noqa: E402
from ctflow.pipeline import CTFlowPipeline  # noqa: E402
from ctflow_train.evaluate import generate_volume  # noqa: E402
from ctflow_train.options import at_least_zero, positive, seed  # noqa: E402
from ctflow_train.training_data import load_case, read_index  # noqa: E402
from generation import json_output, write_json  # noqa: E402  (bench/, the script's folder)

SIDES = ("right", "left")


def half_difference(hu: np.ndarray, start: float, stop: float) -> float:
    """Mean HU of the patient's right half (conventions.right_half) minus the left's, slices [start, stop) of the
    body as fractions, clipped to [-1000, 200] (air to soft tissue: bone and the white end slices weigh no more)."""
    hu = np.clip(hu.astype(np.float32), -1000, 200)
    body = hu[int(start * len(hu)): int(stop * len(hu))]
    right = right_half(hu.shape[2])
    return float((body * right).mean() / right.mean() - (body * (1 - right)).mean() / (1 - right).mean())


def probe(args: argparse.Namespace) -> list[dict]:
    entries = {entry["name"]: entry for entry in read_index(args.data)}
    pairs = sorted({name.replace("_with_left_", "_with_SIDE_").replace("_with_right_", "_with_SIDE_")
                    for name in entries if "_with_right_" in name or "_with_left_" in name})
    pipe = CTFlowPipeline.from_pretrained(args.model, device="cpu")
    rows = []
    for side_guidance in args.side_guidance:
        for pair in pairs:
            cases = {side: load_case(args.data, entries[pair.replace("SIDE", side)]) for side in SIDES}
            real = {side: case.hu[: case.content_slices] for side, case in cases.items()}
            for seed in args.seeds:
                made = {}
                for side, case in cases.items():
                    volume, _ = generate_volume(pipe, case.report.text, seed, steps=args.steps,
                                                guidance=args.guidance, side_guidance=side_guidance)
                    made[side] = volume.hu[: real_slices(volume.hu)]
                both = min(len(made["right"]), len(made["left"]))
                change = np.abs(np.clip(made["right"][:both], -1000, 200).astype(np.float32)
                                - np.clip(made["left"][:both], -1000, 200))
                rows.append({"side_guidance": side_guidance, "pair": pair, "seed": seed,
                             "real": round(score(real), 2), "generated": round(score(made), 2),
                             "mean_abs_change": round(float(change.mean()), 1)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def score(volumes: dict[str, np.ndarray]) -> float:
    return half_difference(volumes["right"], 0.3, 0.9) - half_difference(volumes["left"], 0.3, 0.9)


def confound(args: argparse.Namespace) -> dict:
    groups: dict[str, list[float]] = {}
    indexes = [(data, read_index(data)) for data in args.data]  # every folder checked before the slow reading
    for data, index in indexes:
        for entry in index:
            words = {word.lower() for word in re.findall(r"\b(right|left)\b", entry["findings"], re.IGNORECASE)}
            group = "both" if len(words) == 2 else next(iter(words)) if words else "neither"
            case = load_case(data, entry)
            groups.setdefault(group, []).append(half_difference(case.hu[: case.content_slices], 1 / 3, 2 / 3))
    table = {group: {"volumes": len(values), "mean": round(float(np.mean(values)), 1),
                     "se": round(float(np.std(values, ddof=1) / np.sqrt(len(values))), 1) if len(values) > 1 else None}
             for group, values in sorted(groups.items())}
    print(json.dumps(table, indent=1))
    return table


def main() -> None:
    quiet_third_party_logs()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    run = modes.add_parser("probe", help="right report against left report on side twins")
    run.add_argument("--model", type=Path, required=True)
    run.add_argument("--data", type=Path, required=True, help="a side-twins cohort folder")
    run.add_argument("--side-guidance", type=at_least_zero(float), nargs="+", default=[0.0])
    run.add_argument("--seeds", type=seed, nargs="+", default=[0])
    run.add_argument("--steps", type=positive(int), default=16)
    run.add_argument("--guidance", type=at_least_zero(float), default=3.0)
    run.add_argument("--threads", type=positive(int), default=1)
    run.add_argument("--out", type=Path, help="JSON of every pair's scores")
    words = modes.add_parser("confound", help="side words against half densities in a cohort")
    words.add_argument("--data", type=Path, nargs="+", required=True, help="cohort folders, pooled")
    args = parser.parse_args()
    try:  # a bad folder or an existing --out is one line, in either mode
        if args.mode == "probe":
            json_output(args.out, overwrite=False)  # refused before minutes of generation
            torch.set_num_threads(args.threads)
            write_json(args.out, probe(args), overwrite=False)
        else:
            confound(args)
    except CTFlowError as exc:
        raise SystemExit(f"side_probe: {exc}") from exc


if __name__ == "__main__":
    main()
