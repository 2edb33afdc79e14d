"""Models with random weights of a named size, for tests, benchmarks and the in-Slicer self-test: they make
noise-like volumes quickly, never anatomy. Not part of the public API (ctflow.__all__)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .config import DENOISER_PRESETS, AutoencoderConfig, ModelConfig, TextConfig
from .errors import ModelError
from .model_folder import save_model

MINILM_DIM = 384  # the default text encoder's width


def create_random_model(
    folder: str | os.PathLike, preset: str = "tiny", vae_preset: str | None = None, image_size: int | None = None,
    seed: int = 0, overwrite: bool = False,
) -> Path:
    """A model folder with random weights of a named size: for tests, benchmarks and as a training start point."""
    from diffusers import AutoencoderKL

    from .autoencoder import VAE_PRESETS
    from .denoiser import STDiT

    if preset not in DENOISER_PRESETS:
        raise ModelError(f"unknown preset {preset!r}: choose one of {', '.join(DENOISER_PRESETS)}")
    vae_preset = vae_preset or {"tiny": "tiny", "cpu": "cpu"}.get(preset, "flux")
    denoiser_config = DENOISER_PRESETS[preset]
    vae_config = VAE_PRESETS[vae_preset]
    downsample = 2 ** (len(vae_config["block_out_channels"]) - 1)
    image_size = image_size or denoiser_config.latent_size * downsample
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config)
    config = ModelConfig(
        name=f"random-{preset}",
        denoiser=dataclasses.replace(denoiser_config, latent_size=image_size // downsample, text_dim=MINILM_DIM),
        autoencoder=AutoencoderConfig(image_size=image_size),
        text=TextConfig(),
        description=f"Random weights ({preset} denoiser, {vae_preset} VAE): produces noise-like volumes, not anatomy.",
    )
    denoiser = STDiT(config.denoiser)
    with torch.no_grad():  # random, not zero, output layers: the volume then depends on seed and text
        for parameter in denoiser.parameters():
            if parameter.dim() > 1 and not parameter.abs().sum():
                parameter.normal_(0, 0.02)
    return save_model(folder, config, denoiser, vae, overwrite=overwrite)
