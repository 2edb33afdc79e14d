"""Training checkpoints: one safetensors file holding weights, optimizer state and RNG state.

One file written to a temporary name and renamed into place is atomic: a run killed mid-save leaves the
previous checkpoint intact. Loading never unpickles anything (safetensors + JSON metadata), so a
checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ctflow.errors import CTFlowError, first_line
from ctflow.io import plain_mode

from .options import CHECKPOINT, LOSS_LOG, RunOptions, option_name


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


@contextmanager
def open_safetensors(path: str | os.PathLike) -> Iterator:
    """safe_open that ends in one CTFlowError for a missing, truncated or foreign (a pickle, say) file."""
    if not Path(path).is_file():
        raise CTFlowError(f"{path} does not exist")
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CTFlowError(f"cannot read {path}: {reason}; it is missing, damaged or not a safetensors file") from exc
    with handle:
        yield handle


def _training_metadata(handle, path) -> dict[str, str]:
    metadata = handle.metadata() or {}
    if "meta" not in metadata:
        raise CTFlowError(f"{path} is not a ctflow-train checkpoint (it has no training metadata)")
    return metadata


def load_checkpoint(
    path: str | os.PathLike, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
) -> dict:
    """Restore what save_checkpoint wrote into the given objects (in place); returns `meta`."""
    with open_safetensors(path) as handle:
        names = list(handle.keys())
        metadata = _training_metadata(handle, path)
        tensors = {name: handle.get_tensor(name) for name in names}
    try:
        groups = json.loads(metadata.get("param_groups", "{}"))
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
    except (RuntimeError, ValueError, KeyError) as exc:  # another model's shapes, another trainer's layout
        raise CTFlowError(f"{path} does not fit this run ({first_line(exc)}); continue it with its own options") from exc
    for name, generator in generators.items():
        if f"rng/{name}" not in tensors:
            raise CTFlowError(f"{path} has no random state {name!r}: it was written by another trainer or an older "
                              "ctflow-train, so it cannot continue bit for bit; start anew with --overwrite or another "
                              "--out")
        generator.set_state(tensors[f"rng/{name}"])
    return json.loads(metadata["meta"])


def read_meta(path: str | os.PathLike) -> dict:
    with open_safetensors(path) as handle:
        return json.loads(_training_metadata(handle, path)["meta"])


def run_progress(path: str | os.PathLike) -> dict:
    """How far a run had trained when its checkpoint was written: {"step", "elapsed_s"}. A run warm-started from
    it records this, so its card counts what its start had cost then, not after that run went on."""
    meta = read_meta(path)
    return {"step": meta["step"], "elapsed_s": meta["elapsed_s"]}


NOT_RECIPE = {"resume", "overwrite"}  # what the run folder is asked to do, not how it trains


def prepare_run_folder(out: Path, outputs: tuple[str, ...], options: RunOptions, remove: bool = True) -> None:
    """Never replace an earlier run's checkpoint, weights, loss log or metrics unasked (`outputs`: names or glob
    patterns in `out`). --resume continues the run with the options it was started with (only those
    RunOptions.RESUME_MAY_CHANGE may differ); --overwrite removes its outputs first (`remove`: this process does
    the removing, rank 0 of several), so nothing of the old run mixes with the new one."""
    found = sorted({path.name for pattern in outputs for path in out.glob(pattern)})
    if options.resume and found == [LOSS_LOG]:  # a job killed before its first checkpoint: its requeue starts anew
        if remove:
            (out / LOSS_LOG).unlink()
        return
    if options.resume and CHECKPOINT in found:
        changed = options.changed_from(read_meta(out / CHECKPOINT).get("args", {}))
        if changed:
            raise CTFlowError(f"{out} was started with {', '.join(changed)}: resume it with its own options (only "
                              f"{', '.join(sorted(option_name(name) for name in options.RESUME_MAY_CHANGE - NOT_RECIPE))} may "
                              "change, and paths may move) or start anew with --overwrite")
        return
    if found and not options.overwrite:
        if options.resume:
            raise CTFlowError(f"{out} has no {CHECKPOINT} to resume from but holds {', '.join(found)}; "
                              "pass --overwrite to replace them")
        raise CTFlowError(f"{out} already holds a training run ({', '.join(found)}): pass --resume to continue it or "
                          "--overwrite to replace it")
    for name in found if remove else ():
        path = out / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def open_loss_log(path: str | os.PathLike, header: list[str], step: int):
    """A CSV writer for the loss log; on resume, rows after the checkpoint's step (lost work) are dropped first."""
    path = Path(path)
    rows = []
    if step and path.exists():
        with open(path, newline="") as handle:
            rows = [row for row in csv.reader(handle)][1:]
        rows = [row for row in rows if row and row[0].isdigit() and int(row[0]) <= step]
    handle = open(path, "w", newline="")
    writer = csv.writer(handle)
    writer.writerows([header, *rows])
    handle.flush()  # the kept rows are on disk before the run goes on: a kill soon after a resume loses none
    return handle, writer
