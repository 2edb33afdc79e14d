"""Flow-matching training of the STDiT denoiser: one loop, everything visible.

    ctflow-train flow --cache cache/latents --out cache/flow --steps 2000                  # one process, CPU or GPU
    torchrun --nproc_per_node 8 -m ctflow_train.train_flow --cache ... --out ...           # DDP, any node count

What one step does (CTFlow, REFERENCE §1, plus classifier-free guidance; --slice-position adds the index of the
block's first slice as one more condition, --pooled-text the report's mean token, --seam-context the previous block's
last slices next to the new block's first, --side-code which side the report puts each finding on; --cache takes
several latent stores):
  1. take B (previous block, next block) pairs of T latent slices from the DataLoader (flow_data: StartBoost,
     prompts, text dropout; every draw fixed by the seed and the sample's position, so the global batch is the
     same for any number of processes and a resumed run continues with the very samples it would have taken).
  2. generation conditions on its own imperfect output, so the previous block is made imperfect too: with
     probability --rollout-p it is replaced by the EMA model's estimate of it, given the block before it (one step
     from its noised self at a random time, or with --rollout-steps N a block sampled from noise in N steps), and a
     little noise (--cond-noise) is added to every one; with
     --seam-context its last slices stay the real ones, so the model learns to continue them exactly.
  3. text: the prompt with "Length: N slices" half the time (--length-p), so both a requested and a free
     length work; replaced by the embedding of "" with probability --text-drop, as the pipeline's
     unconditional branch, so guidance works.
  4. z_t = (1 - t) x0 + t noise, t ~ U(0, 1) bent towards noise by --time-shift; the model predicts
     v = noise - x0, or x0 itself with --prediction clean (MSE against whichever it predicts; --seam-weight counts
     the block's first slices, where it joins the previous one, more).
  5. AdamW, warm-up then cosine decay, grad clip 1.0, EMA of the weights.
Checkpoints (safetensors, atomic, written by rank 0) hold weights, EMA, optimizer and the samples taken: --resume
continues bit for bit. DDP: torchrun starts the processes; each takes its share of every global batch.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ctflow.config import DENOISER_PRESETS, PREDICTIONS, TextConfig
from ctflow.conventions import BLOCK_SLICES
from ctflow.denoiser import STDiT, parameter_count
from ctflow.errors import CTFlowError
from ctflow.model_folder import CARD, WEIGHTS
from ctflow.sampling import sample
from ctflow.text_encoder import TextEncoder

from .checkpoint import (
    CHECKPOINT, LOSS_LOG, load_checkpoint, open_loss_log, open_safetensors, prepare_run_folder, read_meta,
    run_progress, save_checkpoint,
)
from .flow_data import (
    FINDING_REACH, Batch, BlockDataset, SamplingRules, ShareSampler, block_loader, finding_region, noises,
)
from .latent_store import LatentStore, Prompts, check_sources, open_stores
from .options import (
    RunOptions, add_run_options, add_schedule_options, at_least_zero, count, loss_weight, positive, probability,
)
from .runtime import cosine_schedule, set_threads, start_processes
from .stages import card_stages

OUTPUTS = (CHECKPOINT, LOSS_LOG)  # what a run writes to --out
# parts a warm start may switch on (they start as no-ops)
# what the report codes go through
CODE_EMBEDDINGS = ("side_embed.", "side_map_embed.", "finding_embed.", "finding_map_embed.")
ADDABLE = ("position_embed.", "text_vector.", "seam_embed.", *CODE_EMBEDDINGS)


@dataclasses.dataclass(frozen=True)
class FlowRun(RunOptions):
    """The options of one `ctflow-train flow` run (see `configure`)."""

    # how the same samples are computed; --init only starts a run (a resumed one takes the checkpoint's weights)
    RESUME_MAY_CHANGE = RunOptions.RESUME_MAY_CHANGE | {"workers", "compile", "init", "accumulate"}  # the data
    # position is counted in samples, so a resumed run may take another global batch, as on another process count

    cache: list[Path]
    out: Path
    preset: str
    hidden: int | None
    depth: int | None
    heads: int | None
    patch: list[int] | None
    prediction: str | None
    slice_position: bool
    pooled_text: bool
    seam_context: bool
    side_code: bool
    side_map: bool
    finding_code: bool
    finding_map: bool
    lobe_map: bool
    init: Path | None
    time_shift: float
    block: int
    steps: int
    batch_size: int
    accumulate: int
    compile: bool
    workers: int
    lr: float
    code_lr: float
    warmup: int
    weight_decay: float
    clip: float
    ema: float
    start_p: float
    end_p: float
    length_p: float
    text_drop: float
    cond_noise: float
    rollout_p: float
    rollout_steps: int
    paired_twins: bool
    finding_p: float
    variant_p: float
    pair_weight: float
    region_weight: float
    seam_weight: float


class Conditioned(torch.nn.Module):
    """STDiT with its conditioning inside forward(), so DistributedDataParallel sees one forward pass."""

    def __init__(self, denoiser: STDiT) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, z_t, t, previous, text, mask, first_slice, code=None):
        return self.denoiser.predict(z_t, t, self.denoiser.prepare(previous, text, mask, first_slice, code))


def denoiser_config(args: FlowRun, store: LatentStore):
    """The preset, with the latent shape and text width the store dictates and any size overrides."""
    channels, size = store.start.shape[0], store.start.shape[-1]
    overrides = {k: v for k, v in {"hidden_size": args.hidden, "depth": args.depth, "num_heads": args.heads,
                                   "patch_size": args.patch and tuple(args.patch), "prediction": args.prediction,
                                   "slice_position": args.slice_position, "pooled_text": args.pooled_text,
                                   "seam_context": args.seam_context, "side_code": args.side_code,
                                   "side_map": args.side_map, "finding_code": args.finding_code,
                                   "finding_map": args.finding_map,
                                   "lobe_map_slices": args.lobe_map and store.meta["median_content_slices"]}.items()
                 if v}
    return dataclasses.replace(DENOISER_PRESETS[args.preset], latent_channels=channels, latent_size=size,
                               text_dim=store.empty.shape[-1], block_slices=args.block, **overrides)


def sampling_rules(args: FlowRun, config: DenoiserConfig) -> SamplingRules:
    return SamplingRules(args.block, start_p=args.start_p, end_p=args.end_p, length_p=args.length_p,
                         text_drop=args.text_drop, time_shift=args.time_shift, paired_twins=args.paired_twins,
                         finding_p=args.finding_p, variant_p=args.variant_p,
                         code=config if config.reads_code else None)


def roll_out_previous(ema: STDiT, batch: Batch, share: float, noise: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """Previous blocks [B, C, T, h, w], a share of them replaced by the model's own estimate, conditioned on the block
    before (noise [B, C, T, h, w] on the model's device). What generation feeds back is never the real block, and a
    model trained only on real ones drifts once its own output is its input (exposure bias).

    steps 1: one denoising step from a random flow time, a blur of the real block. More: the block sampled from pure
    noise in that many Euler steps, as generation makes it: a sharp block whose content is off, the error that
    builds up along a generated volume (the anatomy running ahead). The estimate reads the sample's own code (for a
    lobe map, that of the block after it): the estimate is meant to be imperfect."""
    chosen = (batch.rollout_u < share) & ~batch.first  # a first block's start block is exact
    if not chosen.any():
        return batch.previous
    if steps > 1:
        return sampled_previous(ema, batch, chosen, noise, steps)
    device = next(ema.parameters()).device
    previous, t = batch.previous.to(device), batch.rollout_t.to(device)
    tt = t.view(-1, 1, 1, 1, 1)
    z_t = (1 - tt) * previous + tt * noise
    previous_first_slice = (batch.first_slice - previous.shape[2]).clamp(min=0)
    with torch.no_grad():
        cond = ema.prepare(batch.before.to(device), batch.text.to(device), batch.mask.to(device), previous_first_slice,
                           batch.code.to(device))
        velocity = ema(z_t, t, cond)
    estimate = (z_t - tt * velocity.float()).to(previous.dtype)  # clean block from velocity = noise - x0
    return torch.where(chosen.to(device).view(-1, 1, 1, 1, 1), estimate, previous)


@torch.no_grad()
def sampled_previous(ema: STDiT, batch: Batch, chosen: torch.Tensor, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """roll_out_previous with `steps` > 1: the chosen previous blocks sampled from their noise by the EMA model."""
    device = next(ema.parameters()).device
    previous, pick = batch.previous.to(device), chosen.to(device)
    first_slice = (batch.first_slice.to(device) - previous.shape[2]).clamp(min=0)[pick]
    cond = ema.prepare(batch.before.to(device)[pick], batch.text.to(device)[pick], batch.mask.to(device)[pick],
                       first_slice, batch.code.to(device)[pick])
    estimate = sample(lambda z, t: ema(z, t.expand(len(z)), cond), noise[pick], steps, "euler")
    previous = previous.clone()
    previous[pick] = estimate.to(previous.dtype)
    return previous


def warm_start(model: STDiT, folder: Path) -> None:
    """The EMA weights of an earlier run of the same shape, or the denoiser of a model folder (`export`: the EMA
    weights, perhaps in half precision), e.g. the bundled model when its runs are gone. A part the earlier model
    lacked (the slice-position embedding, the pooled-text vector, a code embedding, switched on now) keeps its no-op
    initialisation, so training starts from the same function."""
    checkpoint = folder / CHECKPOINT
    if checkpoint.is_file():
        with open_safetensors(checkpoint) as handle:
            ema = {k.removeprefix("ema/"): handle.get_tensor(k) for k in handle.keys() if k.startswith("ema/")}
    else:
        checkpoint = folder / WEIGHTS
        with open_safetensors(checkpoint) as handle:
            ema = {k: handle.get_tensor(k).float() for k in handle.keys()}
    try:
        missing, unexpected = model.load_state_dict(ema, strict=False)
    except RuntimeError as exc:  # shapes differ
        raise CTFlowError(f"{checkpoint} does not fit this denoiser: {str(exc).strip().splitlines()[-1].strip()}") from exc
    if unexpected or any(not name.startswith(ADDABLE) for name in missing):
        raise CTFlowError(f"{checkpoint} does not fit this denoiser: missing {missing[:3]}, unexpected {unexpected[:3]}")


def parameter_groups(model: STDiT, args: FlowRun) -> list[dict]:
    """AdamW's groups: weight decay on matrices only; with --code-lr, the code embeddings (CODE_EMBEDDINGS) in a
    group of their own at that multiple of the learning rate, which a zero-initialised embedding added to a trained
    model needs to matter within a short run (the 2026-12-04 evening entry of the run log)."""
    named = list(model.named_parameters())
    fast = {name for name, _ in named if args.code_lr != 1.0 and name.startswith(CODE_EMBEDDINGS)}
    groups = [{"params": [p for name, p in named if name not in fast and p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for name, p in named if name not in fast and p.dim() < 2], "weight_decay": 0.0}]
    if fast:  # only then: a run's optimizer state keeps the two groups of runs before the option
        groups.append({"params": [p for name, p in named if name in fast], "weight_decay": 0.0,
                       "lr_scale": args.code_lr})
    return groups


def twin_terms(args: FlowRun) -> dict[str, float]:
    """The losses of twin pairs this run adds to the flow loss, by loss.csv column: their weights (none by default)."""
    return {name: weight for name, weight in (("pair_loss", args.pair_weight), ("region_loss", args.region_weight))
            if weight}


def flow_loss(model, ema: STDiT, batch: Batch, config, args, autocast, device) -> tuple[torch.Tensor, dict]:
    """The flow-matching loss of one batch: previous blocks made imperfect (rollout, noise), then MSE against
    what the model predicts (velocity, or the clean block); plus the weighted losses of its twin pairs
    (`twin_terms`). Returns (loss to minimise, each twin loss alone)."""
    noise = noises(batch, device, rollout=args.rollout_p > 0)
    prev = (roll_out_previous(ema, batch, args.rollout_p, noise.rollout, args.rollout_steps) if args.rollout_p
            else batch.previous)
    prev = prev.to(device) + args.cond_noise * noise.cond
    if config.seam_context:  # the slices across the seam stay exact: the new block must continue what is there
        prev[:, :, -config.patch_size[0]:] = batch.previous[:, :, -config.patch_size[0]:].to(device)
    x0, text, mask, t, first_slice, code = (v.to(device, non_blocking=True) for v in (
        batch.x0, batch.text, batch.mask, batch.t, batch.first_slice, batch.code))
    tt = t.view(-1, 1, 1, 1, 1)
    z_t = (1 - tt) * x0 + tt * noise.noise
    with autocast:
        predicted = model(z_t, t, prev, text, mask, first_slice, code).float()  # [B, C, T, h, w]
    target = x0 if config.prediction == "clean" else noise.noise - x0
    twin, weights = batch.twin.to(device), twin_terms(args)
    terms = {name: TWIN_LOSSES[name](predicted, target, twin) for name in weights}
    loss = seam_weighted_mse(predicted, target, config.patch_size[0], args.seam_weight)
    loss = loss + sum(weight * terms[name] for name, weight in weights.items())
    return loss, {name: term.detach() for name, term in terms.items()}


def seam_weighted_mse(predicted: torch.Tensor, target: torch.Tensor, first: int, weight: float) -> torch.Tensor:
    """The mean square error with the block's first `first` slices (those that join the previous block) counted
    `weight` times: at weight 1 the plain MSE. The first slice must continue the last one exactly, and in the plain
    MSE the joining slices are a small share of the block (2 of 16 in the demo model)."""
    weights = torch.ones(predicted.shape[2], device=predicted.device)
    weights[:first] = weight
    return ((predicted - target).square() * weights.view(1, 1, -1, 1, 1)).mean()


def pair_loss(predicted: torch.Tensor, target: torch.Tensor, twin: torch.Tensor) -> torch.Tensor:
    """How far the difference between a twin's prediction and its pair's is from the difference of their targets,
    relative to that difference (1: the model draws both the same), over the pairs whose block the finding reaches.
    With the same noise, time and previous-block draws, that difference is the finding's voxels and nothing else:
    the part of the target only the report explains, a few hundredths of the latent where patients differ by half
    (it hardly moves the plain MSE). Pairs the finding misses count zero: held to draw no difference there, a model
    learns to draw both reports alike (the run of 2026-11-28). Averaged over the batch's B/2 pair slots, as the MSE
    over its samples, so ranks and accumulated batches add up to the loss of one process."""
    slots = twin[1::2]  # [B/2] True where the slot's second sample is a twin of its first
    wanted = (target[1::2] - target[0::2])[slots].flatten(1)  # [P, C*T*h*w]
    drawn = (predicted[1::2] - predicted[0::2])[slots].flatten(1)
    scale = wanted.square().sum(1)  # [P]
    reached = scale > FINDING_REACH * wanted.shape[1]
    return ((drawn - wanted)[reached].square().sum(1) / scale[reached]).sum() / slots.numel()


def region_loss(predicted: torch.Tensor, target: torch.Tensor, twin: torch.Tensor) -> torch.Tensor:
    """The mean square error inside the finding's region, of both twins of every pair whose block it reaches: the
    latent positions where the pair's targets differ. A finding covers 0.1-10 % of a block's positions, so the
    plain MSE hardly weighs it; here each pair's region weighs as much as a whole block (MAISI-v2's region losses).
    Unlike the pair loss it never asks for a difference, only for each twin's own target. Averaged over the batch's
    B/2 pair slots (a pair without a region counts zero), as the pair loss."""
    slots = twin[1::2]  # [B/2]
    region = finding_region(target[1::2][slots], target[0::2][slots])  # [P, 1, T, h, w]
    size = region.flatten(1).sum(1).clamp(min=1)  # [P] positions in the region
    error = (predicted - target).square()
    both = (error[0::2] + error[1::2])[slots]  # [P, C, T, h, w]
    return ((both * region).flatten(1).sum(1) / (2 * predicted.shape[1] * size)).sum() / slots.numel()


TWIN_LOSSES = {"pair_loss": pair_loss, "region_loss": region_loss}  # by loss.csv column (`twin_terms`)


def train(args: FlowRun) -> dict:
    # ---- processes: DistributedDataParallel only when torchrun started more than one
    processes = start_processes(join_group=True)
    rank, world, local_rank, device, ddp = (processes.rank, processes.world, processes.local_rank, processes.device,
                                            processes.distributed)
    set_threads(args.threads)
    # bf16 only where the hardware has it: on an AVX2-only CPU bf16 matmuls are ~50x slower than fp32
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", torch.bfloat16) if use_bf16 else nullcontext()
    master = processes.master

    # ---- data, model, EMA, optimizer (bad inputs end here, before --out is touched)
    if BLOCK_SLICES % args.block:
        raise CTFlowError(f"--block {args.block}: the prepared volumes end in white slices padded for blocks of "
                          f"{BLOCK_SLICES}, so a block must divide {BLOCK_SLICES} for every volume to end in a white "
                          "block")
    stores = open_stores(args.cache)
    if args.init and not any((args.init / name).is_file() for name in (CHECKPOINT, WEIGHTS)):
        raise CTFlowError(f"--init {args.init}: neither a flow run ({CHECKPOINT}) nor a model folder ({WEIGHTS})")
    # what the run starts from, as it is now: a model folder's stages as its card lists them (the folder may hold
    # other weights by the time of export), a flow run's progress (it may be continued after)
    init_stages = card_stages(args.init / CARD) if args.init and not (args.init / CHECKPOINT).is_file() else None
    init_progress = run_progress(args.init / CHECKPOINT) if args.init and init_stages is None else None
    for option, value in (("--pair-weight", args.pair_weight), ("--region-weight", args.region_weight)):
        if value and not args.paired_twins:
            raise CTFlowError(f"{option} needs --paired-twins (the pairs it compares)")
    if args.finding_p and not args.paired_twins:
        raise CTFlowError("--finding-p needs --paired-twins (the twins whose difference is the finding)")
    if args.variant_p and not any(store.variants for store in stores):
        raise CTFlowError("--variant-p needs a latent store with report variants (ctflow-train cache-latents --variants)")
    if args.paired_twins and args.batch_size % 2:
        raise CTFlowError(f"--paired-twins needs an even --batch (a pair is two samples of one rank), not "
                          f"{args.batch_size}")
    if args.lobe_map and not args.side_map:
        raise CTFlowError("--lobe-map reads the side map's code by levels: give --side-map too")
    config = denoiser_config(args, stores[0])
    if args.code_lr != 1.0 and not config.reads_code:
        raise CTFlowError("--code-lr sets how fast a code embedding learns: give --side-code, --side-map, "
                          "--finding-code or --finding-map too")
    prompts = None
    if config.reads_code:  # read off the prompts' texts, made again from the stores' cohorts
        prompts = Prompts(stores, variants=args.variant_p > 0, code=config)
        check_sources(stores, prompts, TextEncoder.load(TextConfig(**stores[0].meta["text"])))
    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = STDiT(config)
    if args.init:
        warm_start(model, args.init)
    out = Path(args.out)
    fingerprints = [store.fingerprint for store in stores]
    if args.resume and (out / CHECKPOINT).is_file():
        recorded = read_meta(out / CHECKPOINT).get("store_fingerprints")  # none in runs from before 2026-12-01
        changed = [str(path) for path, now, then in zip(args.cache, fingerprints, recorded or fingerprints)
                   if now != then]
        if changed:
            raise CTFlowError(f"{out} was trained on other contents of {', '.join(changed)} (made again since?): "
                              "resume it on the stores it began with, or start anew with --overwrite")
    prepare_run_folder(out, OUTPUTS, args, remove=master)  # after every check: a refused run removes nothing
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(parameter_groups(model, args), lr=args.lr, betas=(0.9, 0.99))
    step, elapsed, samples = 0, 0.0, 0  # samples: positions of the data stream taken so far, by all ranks
    record = args.meta()
    if args.resume and (out / CHECKPOINT).exists():
        meta = load_checkpoint(out / CHECKPOINT, {"model": model, "ema": ema}, {"optimizer": optimizer}, {})
        step, elapsed, samples = meta["step"], meta["elapsed_s"], meta.get("samples", 0)
        init_stages, init_progress = meta.get("init_stages"), meta.get("init_progress")  # as when the run started
        if args.init is None:  # a resume need not name the start again: the record keeps it
            record["init"] = meta["args"].get("init")
    dataset = BlockDataset(stores, sampling_rules(args, config), args.seed, prompts)
    batches = iter(block_loader(dataset, ShareSampler(rank, world, args.batch_size, samples), args.workers,
                                pin_memory=device.type == "cuda"))
    raw_model, model = model, Conditioned(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    if args.compile:  # after the DDP wrap, so the graph breaks where DDP's gradient buckets are
        model = torch.compile(model)
    twin_columns = list(twin_terms(args))  # none by default: the loss.csv of earlier runs stays as it was
    if master:
        print(f"denoiser {parameter_count(raw_model) / 1e6:.2f} M parameters, {config}; {len(dataset)} volumes; "
              f"world {world}; from step {step}", flush=True)
        log, writer = open_loss_log(out / LOSS_LOG, ["step", "lr", "loss", "step_s", *twin_columns], step)

    # ---- the loop
    logged = torch.tensor(float("nan"))  # the last step's loss (nan when a resumed run has nothing left to do)
    while step < args.steps:
        started = time.perf_counter()
        lr = cosine_schedule(step, args.lr, args.warmup, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        optimizer.zero_grad(set_to_none=True)
        logged = torch.zeros((), device=device)
        logged_terms = torch.zeros(len(twin_columns), device=device)
        for micro in range(args.accumulate):  # gradients add up; DDP averages them over ranks on the last one only
            last = micro == args.accumulate - 1
            with model.no_sync() if ddp and not last else nullcontext():
                loss, terms = flow_loss(model, ema, next(batches), config, args, autocast, device)
                (loss / args.accumulate).backward()
            logged += loss.detach() / args.accumulate
            for i, name in enumerate(twin_columns):
                logged_terms[i] += terms[name] / args.accumulate
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip)
        optimizer.step()
        with torch.no_grad():
            beta = min(args.ema, (1 + step) / (10 + step))  # short memory while the weights move fast
            for e, p in zip(ema.parameters(), raw_model.parameters()):
                e.lerp_(p, 1 - beta)
        step += 1
        samples += world * args.batch_size * args.accumulate
        step_s = time.perf_counter() - started
        elapsed += step_s
        if ddp:  # the logged loss is the mean over ranks (gloo has no AVG)
            torch.distributed.all_reduce(logged)
            if twin_columns:
                torch.distributed.all_reduce(logged_terms)
            logged /= world
            logged_terms /= world
        if master:
            cells = [f"{value:.5f}" for value in logged_terms.tolist()]
            writer.writerow([step, f"{lr:.4g}", f"{logged.item():.5f}", f"{step_s:.3f}", *cells])
            if step % args.log_every == 0:
                log.flush()
                shown = "".join(f" {name.removesuffix('_loss')} {value}" for name, value in zip(twin_columns, cells))
                print(f"step {step}/{args.steps} loss {logged.item():.4f}{shown} lr {lr:.2e} {step_s:.2f}s", flush=True)
        if master and (step % args.save_every == 0 or step == args.steps):  # every rank holds the same weights
            log.flush()  # the loss log reaches at least as far as the checkpoint, whenever the run is killed
            meta = {"step": step, "samples": samples, "elapsed_s": elapsed, "denoiser": dataclasses.asdict(config),
                    "world": world, "device": str(device), "cache": [str(path) for path in args.cache],
                    "store_fingerprints": fingerprints,
                    "args": record, **({} if init_stages is None else {"init_stages": init_stages}),
                    **({} if init_progress is None else {"init_progress": init_progress})}
            save_checkpoint(out / CHECKPOINT, {"model": raw_model, "ema": ema}, {"optimizer": optimizer}, {}, meta)
    if master:
        log.close()
    # DataLoader workers and DDP's reducer end before the process group does: a reducer freed at interpreter exit,
    # after its gloo group, can abort the process ("terminate called without an active exception") once the run
    # is done
    del batches, model
    gc.collect()
    if ddp:  # leave together: a rank that tears gloo down while another still saves can abort at exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return {"step": step, "elapsed_s": round(elapsed, 1), "loss": logged.item()}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", type=Path, nargs="+", required=True,
                        help="latent store folder(s) (ctflow-train cache-latents); several are trained on as one")
    parser.add_argument("--out", type=Path, required=True, help="output folder: checkpoint, loss.csv")
    parser.add_argument("--preset", default="cpu", choices=sorted(DENOISER_PRESETS), help="denoiser size")
    parser.add_argument("--hidden", type=positive(int), help="override the preset's hidden size")
    parser.add_argument("--depth", type=positive(int), help="override the preset's depth")
    parser.add_argument("--heads", type=positive(int), help="override the preset's attention heads")
    parser.add_argument("--patch", type=positive(int), nargs=3, metavar=("T", "H", "W"), help="override the preset's patch size")
    parser.add_argument("--prediction", choices=PREDICTIONS, help="override the preset's output: velocity or clean")
    parser.add_argument("--slice-position", action="store_true",
                        help="condition each block on where it lies in the volume (its first slice index)")
    parser.add_argument("--pooled-text", action="store_true",
                        help="also add the report's mean token to the time embedding (a global text path, as FLUX)")
    parser.add_argument("--side-code", action="store_true",
                        help="also add which side the report puts each sided finding on (ctflow.report.side_code) to "
                             "the time embedding; the prompts' texts are made again from the stores' cohorts")
    parser.add_argument("--side-map", action="store_true",
                        help="also add to every latent patch which sided findings its half of the report names "
                             "(ctflow.report.half_code; a finding without a side on both halves)")
    parser.add_argument("--finding-code", action="store_true",
                        help="also add which findings the report reports, not negated (ctflow.report.finding_code), "
                             "to the time embedding; the prompts' texts are made again from the stores' cohorts")
    parser.add_argument("--finding-map", action="store_true",
                        help="instead add to every latent patch its own learned embedding of the finding code, so "
                             "each finding can have a place in the slice")
    parser.add_argument("--lobe-map", action="store_true",
                        help="with --side-map: each block reads the code of the report where only the lobes at its "
                             "levels lie (ctflow.report.level_text), in a body of the first store's median length")
    parser.add_argument("--seam-context", action="store_true",
                        help="also give the new block's first slices the previous block's last ones, spatially aligned "
                             "and kept exact (no --cond-noise, never the model's own estimate)")
    parser.add_argument("--init", type=Path,
                        help="start from the EMA weights of this flow run's folder, or a model folder's (same shape)")
    parser.add_argument("--time-shift", type=positive(float), default=1.0,
                        help="> 1 trains more often at high noise, where a block's layout is decided")
    parser.add_argument("--block", type=positive(int), default=BLOCK_SLICES,
                        help=f"slices per block: {BLOCK_SLICES} or a divisor (the data's white end padding)")
    add_schedule_options(parser, steps=2000, lr=2e-4, warmup=100)
    parser.add_argument("--batch", dest="batch_size", type=positive(int), default=8,
                        help="per process (the global batch is this x processes)")
    parser.add_argument("--accumulate", type=positive(int), default=1,
                        help="batches per optimizer step (gradient accumulation): "
                             "global batch = batch x processes x this")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the denoiser (minutes to compile; pays on GPUs over long runs)")
    parser.add_argument("--workers", type=count, default=2, help="DataLoader worker processes per process (0: none)")
    parser.add_argument("--code-lr", type=positive(float), default=1.0,
                        help="the embedding of --side-code, --side-map, --finding-code or --finding-map learns at this "
                             "multiple of --lr (default 1), without weight decay")
    parser.add_argument("--weight-decay", type=loss_weight, default=1e-2)
    parser.add_argument("--clip", type=positive(float), default=1.0, help="gradient norm clip")
    parser.add_argument("--ema", type=probability, default=0.999, help="EMA decay: the old weights' share a step")
    parser.add_argument("--start-p", type=probability, default=0.5, help="StartBoost: share of first blocks")
    parser.add_argument("--end-p", type=probability, default=0.0,
                        help="EndBoost: of the other blocks, the share that holds the volume's white end slices")
    parser.add_argument("--paired-twins", action="store_true",
                        help="every second sample: a cohort twin of the one before, with the same draws (even --batch)")
    parser.add_argument("--finding-p", type=probability, default=0.0,
                        help="FindingBoost, with --paired-twins: the share of twin pairs whose block is one the finding "
                             "reaches (where the twins' latents differ)")
    parser.add_argument("--pair-weight", type=loss_weight, default=0.0,
                        help="with --paired-twins: weight of the pair loss, the error of the difference between a "
                             "twin's prediction and its pair's relative to the difference of their targets")
    parser.add_argument("--region-weight", type=loss_weight, default=0.0,
                        help="with --paired-twins: weight of the region loss, the mean square error of both twins "
                             "inside the finding's region (where their targets differ)")
    parser.add_argument("--seam-weight", type=loss_weight, default=1.0,
                        help="weight of the block's first slices (one patch) in the loss, where it joins the previous "
                             "block; 1: the plain mean square error")
    parser.add_argument("--variant-p", type=probability, default=0.0,
                        help="share of prompts that are one of the volume's report variants (a store made with "
                             "cache-latents --variants) instead of its report")
    parser.add_argument("--length-p", type=probability, default=0.5, help="share of prompts with 'Length: N slices'")
    parser.add_argument("--text-drop", type=probability, default=0.1, help="share of prompts replaced by ''")
    parser.add_argument("--cond-noise", type=at_least_zero(float), default=0.05, help="noise on the previous block")
    parser.add_argument("--rollout-p", type=probability, default=0.0,
                        help="share of previous blocks replaced by the model's own estimate of them")
    parser.add_argument("--rollout-steps", type=positive(int), default=1,
                        help="1: that estimate is one denoising step from a random time; N > 1: the block sampled "
                             "from noise in N Euler steps, as generation makes it")
    add_run_options(parser, save_every=250)


def run(args: argparse.Namespace) -> int:
    print(json.dumps(train(FlowRun.from_args(args))))
    return 0


if __name__ == "__main__":  # torchrun entry point: `ctflow-train flow`, with its error handling
    from .cli import main

    sys.exit(main(["flow", *sys.argv[1:]]))
