"""Training checkpoints: one safetensors file holding weights, optimizer state and RNG state.

One file written to a temporary name and renamed into place is atomic: a run killed mid-save leaves the
previous checkpoint intact. Loading never unpickles anything (safetensors + JSON metadata), so a
checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ctflow.errors import CTFlowError
from ctflow.io import plain_mode


def save_checkpoint(
    path: str | os.PathLike, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator], meta: dict,
) -> Path:
    """Write everything needed to continue training bit for bit; `meta` is any JSON-able dict (step, args)."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    groups = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
    for name, optimizer in optimizers.items():
        state = optimizer.state_dict()
        for index, slots in state["state"].items():
            for key, value in slots.items():
                tensors[f"{name}/{index}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        groups[name] = state["param_groups"]
    for name, generator in generators.items():
        tensors[f"rng/{name}"] = generator.get_state()
    metadata = {"meta": json.dumps(meta, default=str), "param_groups": json.dumps(groups)}
    temporary = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, temporary, metadata=metadata)
    temporary.chmod(plain_mode())  # safetensors writes it private; a checkpoint is shared like any output
    os.replace(temporary, path)
    return path


def load_checkpoint(
    path: str | os.PathLike, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
) -> dict:
    """Restore what save_checkpoint wrote into the given objects (in place); returns `meta`."""
    with safe_open(str(path), framework="pt") as handle:
        names = list(handle.keys())
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in names}
    groups = json.loads(metadata["param_groups"])
    for name, module in modules.items():
        prefix = f"{name}/"
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    for name, optimizer in optimizers.items():
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            owner, _, rest = key.partition("/")
            if owner == name:
                index, _, slot = rest.partition("/")
                state.setdefault(int(index), {})[slot] = value
        optimizer.load_state_dict({"state": state, "param_groups": groups[name]})
    for name, generator in generators.items():
        if f"rng/{name}" not in tensors:
            raise CTFlowError(f"{path} has no random state {name!r}: it was written by another trainer")
        generator.set_state(tensors[f"rng/{name}"])
    return json.loads(metadata["meta"])


def read_meta(path: str | os.PathLike) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["meta"])


def open_loss_log(path: str | os.PathLike, header: list[str], step: int):
    """A CSV writer for the loss log; on resume, rows after the checkpoint's step (lost work) are dropped first."""
    path = Path(path)
    rows = []
    if step and path.exists():
        with open(path, newline="") as handle:
            rows = [row for row in csv.reader(handle)][1:]
        rows = [row for row in rows if row and int(row[0]) <= step]
    handle = open(path, "w", newline="")
    writer = csv.writer(handle)
    writer.writerows([header, *rows])
    return handle, writer


def add_run_options(parser, save_every: int) -> None:
    """Options every checkpointed training run shares: seed, threads, logging, checkpoint cadence, resume."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--save-every", type=int, default=save_every)
    parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.safetensors")
