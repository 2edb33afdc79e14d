"""The released-model fixtures on a GPU: how far CUDA float32 (TF32 off and on) and bfloat16 lie from the
original code's CPU outputs, to set the GPU tolerances the fixtures' README asks to measure. Not a test.

    python bench/released_fixture_check.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ctflow.released import load_released_denoiser
from ctflow.sampling import sample

DATA = Path(__file__).parents[1] / "Testing" / "data" / "ctflow_release"


@torch.no_grad()
def errors(device: str, dtype: torch.dtype, tf32: bool) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    io = {key: value.clone().to(device) for key, value in load_file(DATA / "tiny_a_io.safetensors").items()}
    model = load_released_denoiser(DATA / "tiny_a", dtype).to(device)
    out = {}
    for t, key in zip(io["t_values"].tolist(), ("out/t1p0", "out/t0p5", "out/t0p0")):
        velocity = model(io["x"], torch.tensor(t, device=device), io["encoder_hidden_states"], io["cond_image"])
        out[key] = float((velocity.float() - io[key]).abs().max())
    text, cond = io["encoder_hidden_states"][:1], io["cond_image"][:1]
    solved = sample(lambda z, t: model(z, t, text, cond), io["euler/noise"], 200, "euler")
    out["euler/all200_of_201"] = float((solved.float() - io["euler/all200_of_201"]).abs().max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    rows = {"float32, TF32 off": errors(args.device, torch.float32, False),
            "float32, TF32 on": errors(args.device, torch.float32, True),
            "bfloat16": errors(args.device, torch.bfloat16, False)}
    print(json.dumps({"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
                      "max_abs_error": rows, "cpu_tolerances": {"forward": 2e-5, "euler200": 5e-4}}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
