"""Slice-decoder benchmark: seconds to decode one block of latents, by memory format and chunk size.

Decoding is about half of a CPU generation, and its speed depends on how the slices are fed to the
convolutions, not on the latents' values, so random latents of the model's shape are used. Not a test.

    python bench/vae_decode.py --vae cache/vae                           # a `ctflow-train vae --out` folder
    python bench/vae_decode.py --vae Resources/Models/ctflow-demo --threads 2   # or a model folder
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from ctflow.autoencoder import SliceAutoencoder
from ctflow.config import AutoencoderConfig
from ctflow.errors import CTFlowError
from ctflow.model_folder import load_vae
from ctflow_train.options import positive


def decode_seconds(autoencoder: SliceAutoencoder, latents: torch.Tensor, chunk: int, channels_last: bool) -> float:
    """One timed decode of `latents` in chunks of `chunk` slices (bypassing the CPU cap on chunk size)."""
    autoencoder.vae.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    started = time.perf_counter()
    with torch.no_grad():
        for part in latents.split(chunk):
            autoencoder.vae.decode(part / autoencoder.scaling + autoencoder.shift)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", required=True, help="a folder holding vae/: a model folder or a VAE training folder")
    parser.add_argument("--size", type=positive(int), default=256, help="slice rows = columns")
    parser.add_argument("--slices", type=positive(int), default=16, help="slices per timed decode (one block)")
    parser.add_argument("--chunks", type=positive(int), nargs="+", default=[1, 2, 4, 16])
    parser.add_argument("--repeats", type=positive(int), default=3, help="best of N")
    parser.add_argument("--threads", type=positive(int), default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    autoencoder = SliceAutoencoder(load_vae(Path(args.vae)), AutoencoderConfig(image_size=args.size))
    shape = (args.slices, autoencoder.latent_channels, autoencoder.latent_size, autoencoder.latent_size)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    best = {(layout, chunk): float("inf") for layout in (False, True) for chunk in args.chunks}
    for _ in range(args.repeats):  # interleaved, so load on a shared machine hits every setting alike
        for layout, chunk in best:
            best[layout, chunk] = min(best[layout, chunk], decode_seconds(autoencoder, latents, chunk, layout))
    rows = [{"channels_last": layout, "chunk": chunk, "seconds": round(s, 3)} for (layout, chunk), s in best.items()]
    print(json.dumps({"vae": args.vae, "slices": args.slices, "threads": args.threads, "cpu": platform.processor() or
                      platform.machine(), "best_of": args.repeats, "rows": rows}, indent=1))


if __name__ == "__main__":
    try:  # a missing or corrupt input is one line
        main()
    except CTFlowError as exc:
        raise SystemExit(f"vae_decode: {exc}") from exc
