"""Slice autoencoder: HU slices <-> latents through a `diffusers.AutoencoderKL` (a FLUX VAE folder loads unchanged)."""

from __future__ import annotations

import torch

from .config import AutoencoderConfig

# diffusers AutoencoderKL configs. "flux" is the FLUX.1 VAE (84 M parameters, 16 latent channels, 8x down).
VAE_PRESETS: dict[str, dict] = {
    "flux": dict(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    ),
    # 8x down to 8 channels, small enough to decode a 256x256 block in about a second on 2 CPU cores.
    "cpu": dict(
        in_channels=1, out_channels=1, latent_channels=8, block_out_channels=(32, 64, 128, 128),
        layers_per_block=1, norm_num_groups=16, scaling_factor=1.0, shift_factor=0.0, mid_block_add_attention=False,
    ),
    "tiny": dict(
        in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, scaling_factor=1.0, shift_factor=0.0, mid_block_add_attention=False,
    ),
}
for _name, _preset in VAE_PRESETS.items():
    _preset["down_block_types"] = ("DownEncoderBlock2D",) * len(_preset["block_out_channels"])
    _preset["up_block_types"] = ("UpDecoderBlock2D",) * len(_preset["block_out_channels"])


CPU_CHUNK = 2  # demo VAE on 2 cores: 16 slices decode in 0.88 s in chunks of 2 vs 1.28 s in chunks of 4


class SliceAutoencoder:
    """Encodes and decodes stacks of HU slices [N, H, W] in chunks; latents are scaled and shifted per vae.config."""

    def __init__(self, vae, config: AutoencoderConfig) -> None:
        # channels_last: faster convolutions on CPU (and on CUDA tensor cores) for the same numbers
        self.vae = vae.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.config = config
        self.scaling = float(vae.config.scaling_factor or 1.0)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self._constant_latents: dict[float, torch.Tensor] = {}

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.config.image_size // self.downsample

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def chunk_size(self) -> int:
        """Slices per VAE call: the config's bound, and at most CPU_CHUNK on a CPU, where small chunks stay in cache."""
        return self.config.chunk_size if self.device.type == "cuda" else min(self.config.chunk_size, CPU_CHUNK)

    def hu_to_model(self, hu: torch.Tensor) -> torch.Tensor:
        low, high = self.config.hu_window
        bottom, top = self.config.pixel_range
        return (hu.float().clamp(low, high) - low) / (high - low) * (top - bottom) + bottom

    def model_to_hu(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.config.hu_window
        bottom, top = self.config.pixel_range
        return (x.float().clamp(bottom, top) - bottom) / (top - bottom) * (high - low) + low

    @torch.no_grad()
    def encode(self, hu: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[N, H, W] HU -> [N, C, h, w] latents: the posterior mode, or a posterior sample drawn with `generator`."""
        dtype = next(self.vae.parameters()).dtype
        out = []
        for chunk in hu.split(self.chunk_size):
            x = self.hu_to_model(chunk.to(self.device)).unsqueeze(1)  # [n, 1, H, W]
            x = x.expand(-1, self.vae.config.in_channels, -1, -1).to(dtype)
            posterior = self.vae.encode(x).latent_dist
            latent = posterior.mode() if generator is None else posterior.sample(generator)
            out.append((latent.float() - self.shift) * self.scaling)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[N, C, h, w] latents -> [N, H, W] HU (float; channels of an RGB VAE are averaged)."""
        dtype = next(self.vae.parameters()).dtype
        out = []
        for chunk in latents.split(self.chunk_size):
            z = (chunk.to(self.device, torch.float32) / self.scaling + self.shift).to(dtype)
            x = self.vae.decode(z).sample.float().mean(1)  # [n, H, W]
            out.append(self.model_to_hu(x))
        return torch.cat(out)

    def constant_latent(self, hu_value: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latent [C, h, w] of a slice filled with one HU value: -1000 is the start token, +1000 the end marker.

        The posterior mode (cached), or with `generator` a posterior sample, as the released CTFlow code draws.
        """
        size = self.config.image_size
        if generator is not None:
            return self.encode(torch.full((1, size, size), float(hu_value)), generator)[0]
        if hu_value not in self._constant_latents:
            self._constant_latents[hu_value] = self.encode(torch.full((1, size, size), float(hu_value)))[0]
        return self._constant_latents[hu_value]
