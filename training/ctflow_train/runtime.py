"""What every training process sets up the same way: torch threads, its place among the processes torchrun started
and its device, the learning-rate schedule, and a trained VAE read back."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch

from ctflow.autoencoder import SliceAutoencoder
from ctflow.batch import rank_and_world
from ctflow.config import AutoencoderConfig
from ctflow.model_folder import load_autoencoder_kl

def set_threads(threads: int) -> None:
    """--threads: torch's CPU threads, or torch's own choice for 0."""
    if threads:
        torch.set_num_threads(threads)


@dataclasses.dataclass(frozen=True)
class Processes:
    """This process among those torchrun started (rank 0 of 1 without torchrun) and the device it computes on."""

    rank: int
    world: int
    local_rank: int | None
    device: torch.device

    @property
    def master(self) -> bool:  # the one process that logs and writes checkpoints
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def start_processes(join_group: bool) -> Processes:
    """Rank and world from torchrun's variables; the local GPU, else the CPU. With `join_group` and several processes,
    joins the process group (NCCL on GPUs, gloo on CPUs) that DistributedDataParallel needs."""
    rank, world, local_rank = rank_and_world()
    if join_group and world > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{local_rank or 0}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Processes(rank, world, local_rank, device)


def cosine_schedule(step: int, peak: float, warmup: int, steps: int) -> float:
    """Learning rate of `step`: linear warm-up to `peak`, then cosine decay to 10 % of it at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def load_vae(folder: str | os.PathLike, image_size: int, device: str | torch.device = "cpu",
             chunk_size: int = 4) -> SliceAutoencoder:
    """A trained VAE folder (diffusers, safetensors only, never from a hub) behind ctflow's HU mapping; small chunks
    by default, which suit CPU caches."""
    vae = load_autoencoder_kl(Path(folder)).to(device)
    return SliceAutoencoder(vae, AutoencoderConfig(image_size=image_size, chunk_size=chunk_size))
