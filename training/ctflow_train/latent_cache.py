"""Encode a prepared dataset once: slice latents (trained VAE) and prompt embeddings (the model's text encoder).

    ctflow-train cache-latents --data cache/cohort --vae cache/vae/vae --out cache/latents.safetensors

Flow training then never runs the VAE or the text encoder. Prompts are rendered by ctflow's own
render_prompt, as the pipeline does: with "Spacing: <z> mm" always, and once without and once with
"Length: N slices" (N = the patient's real slices, so that asking for N places the end after N slices).
"" is stored too: the pipeline's unconditional branch embeds the empty string.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ctflow.autoencoder import SliceAutoencoder
from ctflow.config import AutoencoderConfig, TextConfig
from ctflow.errors import CTFlowError
from ctflow.pipeline import END_HU, START_HU
from ctflow.report import render_prompt
from ctflow.text_encoder import TextEncoder

from .training_data import list_cases, load_case

PROMPTS = ("plain", "length")  # without / with "Length: N slices"


@dataclass
class LatentCache:
    """Everything flow training reads, in memory."""

    latents: list[torch.Tensor]  # per case [S, C, h, w] float32, white end slices included
    text: dict[str, list[torch.Tensor]]  # prompt kind -> per case [M, text_dim] token embeddings
    empty: torch.Tensor  # [M0, text_dim] embedding of "" (classifier-free guidance's unconditional text)
    start: torch.Tensor  # [C, h, w] latent of the all-black start slice
    end: torch.Tensor  # [C, h, w] latent of the white end slice
    meta: dict  # names, spacing, slice counts, vae folder, text source


def load_vae(folder: str | Path, image_size: int) -> SliceAutoencoder:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    return SliceAutoencoder(vae, AutoencoderConfig(image_size=image_size, chunk_size=4))  # small chunks: CPU caches


def encode_volume(autoencoder: SliceAutoencoder, case) -> torch.Tensor:
    """[S, C, h, w] latents; the identical white end slices reuse one encoding (a sixth of the work)."""
    content = autoencoder.encode(torch.from_numpy(case.hu[: case.content_slices]))
    white = autoencoder.constant_latent(END_HU)[None].expand(len(case.hu) - case.content_slices, -1, -1, -1)
    return torch.cat([content, white])


def embed(encoder: TextEncoder, text: str) -> torch.Tensor:
    """[M, D] token embeddings of one text, padding removed."""
    embedding = encoder.encode([text])
    return embedding.tokens[0][embedding.mask[0]].cpu()


def build_cache(
    data: Path, vae_folder: Path, out: Path, holdout: int, size: int, text: TextConfig, limit: int = 0, log=print
) -> dict:
    entries, _ = list_cases(data, holdout)
    entries = entries[:limit] if limit else entries
    autoencoder = load_vae(vae_folder, size)
    encoder = TextEncoder.load(text)
    tensors = {
        "start": autoencoder.constant_latent(START_HU).contiguous(),
        "end": autoencoder.constant_latent(END_HU).contiguous(),
        "text/empty": embed(encoder, "").half(),
    }
    started = time.perf_counter()
    slices, spacings = [], []
    for number, entry in enumerate(entries):
        case = load_case(data, entry)
        tensors[f"latents/{number}"] = encode_volume(autoencoder, case).half()
        tensors[f"text/plain/{number}"] = embed(encoder, render_prompt(case.report, None, case.spacing[2])).half()
        tensors[f"text/length/{number}"] = embed(encoder, render_prompt(case.report, case.content_slices, case.spacing[2])).half()
        slices.append(case.content_slices)
        spacings.append(case.spacing)
        log(f"{number + 1}/{len(entries)} {case.name}: {len(case.hu)} slices, {time.perf_counter() - started:.0f} s")
    meta = {
        "names": [entry["name"] for entry in entries],
        "content_slices": slices,
        "median_content_slices": int(statistics.median(slices)),
        "spacing": [statistics.median(s[axis] for s in spacings) for axis in range(3)],
        "image_size": size,
        "vae": str(vae_folder),
        "text": dataclasses.asdict(text),
        "encode_seconds": round(time.perf_counter() - started, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out, metadata={"meta": json.dumps(meta)})
    return meta


def read_cache(path: str | Path) -> LatentCache:
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["meta"])
        count = len(meta["names"])
        if not count:
            raise CTFlowError(f"{path} holds no cases")
        latents = [handle.get_tensor(f"latents/{i}").float() for i in range(count)]
        text = {kind: [handle.get_tensor(f"text/{kind}/{i}").float() for i in range(count)] for kind in PROMPTS}
        return LatentCache(latents, text, handle.get_tensor("text/empty").float(), handle.get_tensor("start"),
                           handle.get_tensor("end"), meta)


ENCODING_TOLERANCE = 1e-2  # one encoder run with other thread counts moves the start latent by ~1e-3; another VAE by ~1


def same_encoding(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two encodings of one input (the start slice, the empty text) come from the same encoder."""
    return a.shape == b.shape and torch.allclose(a, b, atol=ENCODING_TOLERANCE)


def read_caches(paths: list[str | Path]) -> LatentCache:
    """Several caches as one (a cohort and its twins, say): they must come from the same VAE and text encoder."""
    caches = [read_cache(path) for path in paths]
    first = caches[0]
    for path, cache in zip(paths[1:], caches[1:]):
        if not (same_encoding(cache.start, first.start) and same_encoding(cache.empty, first.empty)):
            raise CTFlowError(f"{path} was encoded with another VAE or text encoder than {paths[0]}: re-encode it")
    slices = [n for cache in caches for n in cache.meta["content_slices"]]
    meta = {**first.meta, "names": [name for cache in caches for name in cache.meta["names"]], "content_slices": slices,
            "median_content_slices": int(statistics.median(slices))}
    text = {kind: [t for cache in caches for t in cache.text[kind]] for kind in PROMPTS}
    return LatentCache([x for cache in caches for x in cache.latents], text, first.empty, first.start, first.end, meta)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="prepared folder (cohort / prepare-ctrate)")
    parser.add_argument("--vae", type=Path, required=True, help="trained VAE folder (ctflow-train vae --out X: X/vae)")
    parser.add_argument("--out", type=Path, required=True, help="cache file (.safetensors)")
    parser.add_argument("--holdout", type=int, default=4, help="last N patients of the index: left out, as for the VAE")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N training patients (0: all)")
    parser.add_argument("--size", type=int, default=256, help="slice size of the data")
    parser.add_argument("--text-source", default=TextConfig.source, help="text encoder (see ctflow TextConfig.source)")


def run(args: argparse.Namespace) -> int:
    meta = build_cache(args.data, args.vae, args.out, args.holdout, args.size, TextConfig(source=args.text_source), args.limit)
    print(json.dumps({k: meta[k] for k in ("median_content_slices", "spacing", "encode_seconds")}))
    return 0
