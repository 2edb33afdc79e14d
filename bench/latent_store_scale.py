"""Scale simulation of flow training's data path (not a test): synthetic latent stores of CT-RATE's size, read
through the training DataLoader. The figures go to docs/BENCHMARKS.md with the machine they were measured on.

    python bench/latent_store_scale.py --out /tmp/store_bench --volumes 1000 3000 10000 --distinct 300

Volumes have the real CTFlow-L shape (about 200 slices of 16x32x32 latents in float16, 6.5 MB each) and prompts of
150-250 tokens of a 768-d text encoder. Only --distinct volumes are distinct files: the others are hard links to
them under names of their own (10,000 real files would be 65 GB). Every store has its own index, rows and names, so
opening, indexing and sampling see the full count; but reads come from the page cache, so the throughput is the
loader's CPU cost, not a disk's: the MB/s a disk would have to deliver is reported beside it.

Per store size, in a fresh process: index merge time, start-up (open the store, build the dataset, first batch from
the workers), resident memory of the main process and of each worker after --batches batches (it must not grow with
the store), and blocks per second. Then the step rate that feeds and the GPUs one node's loader keeps busy, against
CTFlow-L's training FLOPs per block.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from ctflow.config import DENOISER_PRESETS
from ctflow.denoiser import STDiT, parameter_count
from ctflow_train.flow_data import BlockDataset, SamplingRules, ShareSampler, block_loader
from ctflow_train.latent_store import FORMAT, INDEX, ROWS, VOLUMES, StoreWriter, open_stores
from ctflow_train.options import count, positive

SHAPE, TEXT_DIM, BLOCK = (16, 32, 32), 768, 16
HEADER = {"format": FORMAT, "dtype": "float16", "image_size": 256, "latent_shape": list(SHAPE), "text_dim": TEXT_DIM,
          "vae": "synthetic", "vae_sha256": None, "text": {"source": "synthetic"}}


def write_pool(folder: Path, count: int) -> tuple[list[dict], float]:
    """`count` distinct volumes of random latents through the store's writer; returns their rows and s/volume."""
    rng = torch.Generator().manual_seed(0)
    common = {"start": torch.randn(SHAPE, generator=rng), "end": torch.randn(SHAPE, generator=rng),
              "text/empty": torch.randn(2, TEXT_DIM, generator=rng)}
    writer = StoreWriter(folder, HEADER, common)
    started, rows = time.perf_counter(), []
    for n in range(count):
        slices = int(torch.randint(180, 221, (), generator=rng))
        tokens = int(torch.randint(150, 251, (), generator=rng))
        text = {"plain": torch.randn(tokens, TEXT_DIM, generator=rng),
                "length": torch.randn(tokens + 4, TEXT_DIM, generator=rng)}
        rows.append(writer.add(f"pool{n:05d}", torch.randn(slices, *SHAPE, generator=rng), text, slices - 16,
                               (0.7, 0.7, 2.5), "synthetic"))
    return rows, (time.perf_counter() - started) / count


def link_store(pool: Path, rows: list[dict], folder: Path, volumes: int) -> float:
    """A store of `volumes` names, each a hard link to a pool volume, with its own rows; returns the merge seconds."""
    writer = StoreWriter(folder, HEADER, _common(pool))
    for n in range(volumes):
        row = rows[n % len(rows)]
        name = f"vol{n:06d}"
        target = folder / VOLUMES / f"{name}.safetensors"
        if not target.exists():
            os.link(pool / row["file"], target)
        linked = {**row, "name": name, "file": f"{VOLUMES}/{name}.safetensors"}
        (folder / ROWS / f"{name}.json").write_text(json.dumps(linked))
    started = time.perf_counter()
    writer.merge()
    return time.perf_counter() - started


def _common(pool: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(pool / "common.safetensors")


def memory_mb(pid: int | str = "self") -> dict[str, float]:
    """Resident memory, and the part of it private to the process (a forked worker shares its parent's pages)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        fields[key] = int(value.split()[0]) / 1024
    return {"rss": round(fields["Rss"], 1), "private": round(fields["Private_Clean"] + fields["Private_Dirty"], 1)}


def children() -> list[int]:
    return [int(c) for task in Path("/proc/self/task").iterdir() for c in (task / "children").read_text().split()]


def measure(folder: Path, workers: int, batch: int, batches: int) -> dict:
    """In this (fresh) process: start-up, memory and throughput of the training loader over one store."""
    baseline = memory_mb()["rss"]
    started = time.perf_counter()
    dataset = BlockDataset(open_stores([folder]), SamplingRules(BLOCK), seed=0)
    opened = time.perf_counter() - started
    batches_of = iter(block_loader(dataset, ShareSampler(0, 1, batch), workers, pin_memory=False))
    sample = next(batches_of)
    first = time.perf_counter() - started
    timed = time.perf_counter()
    for _ in range(batches):
        sample = next(batches_of)
    seconds = time.perf_counter() - timed
    read = sum(t.numel() * 2 for t in (sample.x0, sample.previous, sample.before)) / batch  # float16 bytes on disk
    read += sample.mask.sum().item() / batch * TEXT_DIM * 2
    return {"volumes": len(dataset), "workers": workers, "open_s": round(opened, 3), "first_batch_s": round(first, 2),
            "blocks_per_s": round(batches * batch / seconds, 1), "mb_read_per_block": round(read / 2**20, 2),
            "rss_main_at_import_mb": baseline, "main_mb": memory_mb(),
            "workers_mb": [memory_mb(pid) for pid in children()]}


def ctflow_l_flops_per_block() -> tuple[int, float]:
    """(parameters, training FLOPs of one block: 6 x parameters x tokens, attention left out: a few % here)."""
    config = DENOISER_PRESETS["L"]
    with torch.device("meta"):
        parameters = parameter_count(STDiT(config))
    pt, ph, pw = config.patch_size
    tokens = config.block_slices // pt * (config.latent_size // ph) * (config.latent_size // pw)
    return parameters, 6.0 * parameters * tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the synthetic stores (deleted by hand)")
    parser.add_argument("--volumes", type=positive(int), nargs="+", default=[1000, 3000, 10000])
    parser.add_argument("--distinct", type=positive(int), default=300,
                        help="distinct volume files (the rest are hard links)")
    parser.add_argument("--workers", type=count, default=2)
    parser.add_argument("--batch", type=positive(int), default=8)
    parser.add_argument("--batches", type=positive(int), default=25)
    parser.add_argument("--gpu-tflops", type=positive(float), default=400.0,
                        help="sustained bf16 TFLOP/s of one GPU in training (H100: ~990 peak, ~40 %% of it)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process: one store
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.measure:
        print(json.dumps(measure(args.measure, args.workers, args.batch, args.batches)))
        return
    pool = args.out / "pool"
    if (pool / INDEX).exists():
        rows = [json.loads(line) for line in (pool / INDEX).read_text().splitlines()]
        write_s = None
    else:
        rows, write_s = write_pool(pool, args.distinct)
        StoreWriter(pool, HEADER, _common(pool)).merge()
    results = []
    for volumes in args.volumes:
        merge_s = link_store(pool, rows, args.out / f"store{volumes}", volumes)
        for workers in (0, 1, args.workers) if volumes == max(args.volumes) else (args.workers,):
            child = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--measure",
                                    str(args.out / f"store{volumes}"), "--workers", str(workers), "--batch",
                                    str(args.batch), "--batches", str(args.batches)],
                                   capture_output=True, text=True, check=True)
            results.append({**json.loads(child.stdout), "merge_s": round(merge_s, 2)})
            print(json.dumps(results[-1]), flush=True)
    parameters, flops = ctflow_l_flops_per_block()
    per_worker = next(r for r in results if r["workers"] == 0)["blocks_per_s"]
    gpu_blocks = args.gpu_tflops * 1e12 / flops  # blocks per second one GPU trains on
    summary = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "distinct": args.distinct,
               "write_s_per_volume": write_s and round(write_s, 3), "ctflow_l_parameters": parameters,
               "train_tflop_per_block": round(flops / 1e12, 2), "gpu_blocks_per_s": round(gpu_blocks, 1),
               "workers_per_gpu": round(gpu_blocks / per_worker, 2),
               "disk_mb_per_s_per_gpu": round(gpu_blocks * results[-1]["mb_read_per_block"], 1)}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
