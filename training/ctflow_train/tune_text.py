"""Tune a model's text encoder so that a report in other words moves its denoiser as the cohort writer's report does.

The denoiser learns the report from one writer's templates; a user's words ("RLL", "hydrothorax", "has resolved")
reach its cross-attention as other tokens, which it reads as another anatomy more than as the same finding. This
step distils the writer's meaning into the encoder through the frozen denoiser: for a training block, its noise and
its time, the denoiser conditioned on a report variant (paraphrase.py: the same findings in another style) by the
tuned encoder should predict what it predicts from the writer's report by the original encoder (the store's
tokens). Shared block, noise and time: the loss sees only the text's effect. A share of the prompts is the writer's
report itself and the empty prompt, so the tuned encoder keeps what the denoiser learnt to read (and guidance's
unconditional branch).

Only the top transformer layers are tuned (--layers), and only they are shipped: the result is the model folder with
`text_tuned.safetensors` (those layers, half precision) named by text.tuned, checksums rewritten; the encoder's other
weights still come from its source, and the denoiser and autoencoder are untouched.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ctflow.autoencoder import SliceAutoencoder
from ctflow.checksums import write_checksums
from ctflow.config import TextConfig
from ctflow.conventions import START_HU
from ctflow.errors import CTFlowError
from ctflow.io import atomic_folder
from ctflow.model_folder import (CARD, CONFIG, copy_model_files, load_denoiser, load_vae, read_config,
                                 verify_model_folder)
from ctflow.text_encoder import TextEncoder

from .checkpoint import load_checkpoint, open_loss_log, prepare_run_folder, save_checkpoint
from .flow_data import Batch, BlockDataset, SamplingRules, collate, generator, noises, padded
from .latent_store import Prompts, check_sources, open_stores, same_encoding
from .options import CHECKPOINT, LOSS_LOG, RunOptions, add_run_options, add_schedule_options, positive, print_json, probability
from .runtime import cosine_schedule, set_threads

TUNED = "text_tuned.safetensors"  # inside the tuned model folder
MODEL = "model"  # the tuned model folder, inside the run folder
OUTPUTS = (CHECKPOINT, LOSS_LOG, MODEL)
PROMPT, DROPOUT = 3, 4  # generator streams of a step's prompt draws and dropout (flow_data uses 0-2)
VARIANTS = 2**31  # variant numbers drawn from: every step meets new words


@dataclasses.dataclass(frozen=True)
class TuneRun(RunOptions):
    model: Path
    cache: list[Path]
    out: Path
    steps: int
    lr: float
    warmup: int
    batch_size: int
    layers: int
    writer_p: float
    empty_p: float
    time_shift: float


def draw_prompts(blocks: BlockDataset, prompts: Prompts, positions: range, firsts: torch.Tensor,
                 draws: torch.Generator, args: TuneRun) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
    """Per position (its block starting at `firsts`): the writer's tokens the store holds for its volume and their
    code [B, code size] (the teacher's), and the prompt the tuned encoder reads: '' (with '' as teacher) in
    a share empty_p, the writer's report in writer_p, else a variant."""
    teacher, codes, student = [], [], []
    for position, first in zip(positions, firsts.int().tolist()):
        store, volume = blocks.volume(position)
        number = blocks.firsts[blocks.stores.index(store)] + volume
        u = float(torch.rand((), generator=draws))
        variant = int(torch.randint(VARIANTS, (), generator=draws))
        if u < args.empty_p:
            teacher.append(store.empty)
            codes.append(torch.zeros(prompts.code.code_size))
            student.append("")
        else:
            teacher.append(store.text("plain", volume))
            codes.append(prompts.code_of(number, None, first))
            student.append(prompts.writer_prompt(number) if u < args.empty_p + args.writer_p
                           else prompts.variant_prompt(number, variant))
    return teacher, torch.stack(codes), student


def distillation_loss(denoiser, encoder: TextEncoder, batch: Batch, teacher: list[torch.Tensor],
                      teacher_codes: torch.Tensor, student: list[str]) -> torch.Tensor:
    """Mean square difference between the denoiser's prediction from the student's tokens of `student` (prompts)
    and from the `teacher` tokens ([M_i, D] each), on the batch's blocks, noise and times: the text's effect alone.
    A denoiser that reads a code reads the teacher's codes and those of the student's texts, as generation would."""
    noise = noises(batch, torch.device("cpu"), rollout=False).noise
    t = batch.t.view(-1, 1, 1, 1, 1)
    z_t = (1 - t) * batch.x0 + t * noise
    with torch.no_grad():
        text, mask = padded(teacher)
        target = denoiser.predict(z_t, batch.t, denoiser.prepare(batch.previous, text, mask, batch.first_slice,
                                                                 teacher_codes))
    tokens, mask = encoder.token_states(student)  # [B, M, D], [B, M], with gradients
    codes = torch.tensor([denoiser.config.read_code(text, first) for text, first in
                          zip(student, batch.first_slice.int().tolist())])
    predicted = denoiser.predict(z_t, batch.t, denoiser.prepare(batch.previous, tokens, mask, batch.first_slice,
                                                                codes))
    return F.mse_loss(predicted, target)


def tune(args: TuneRun, log=print) -> dict:
    set_threads(args.threads)
    folder, out = Path(args.model), Path(args.out)
    if args.writer_p + args.empty_p > 1:
        raise CTFlowError(f"--writer-p {args.writer_p:g} and --empty-p {args.empty_p:g} are shares of the prompts: "
                          "together at most 1")
    if nested(out, folder) or nested(folder, out / MODEL):
        raise CTFlowError(f"--out {out} and --model {folder} overlap: a run folder never writes into its model, nor "
                          "holds it where its output goes")
    checksums = verify_model_folder(folder)
    config = read_config(folder)
    if config.text.mode != "tokens":
        raise CTFlowError(f"{folder.name} reads one pooled text vector; tune-text tunes token encoders")
    stores = open_stores(args.cache)
    if any(TextConfig(**store.meta["text"]) != config.text for store in stores):
        raise CTFlowError(f"the stores were embedded by another text encoder than {folder.name}'s: tune the model "
                          "whose encoder embedded them (a tuned model's own encoder is tuned again from that one)")
    start = SliceAutoencoder(load_vae(folder), config.autoencoder).constant_latent(START_HU)
    if not all(same_encoding(store.start, start) for store in stores):
        raise CTFlowError(f"the stores hold latents of another autoencoder than {folder.name}'s")
    prompts = Prompts(stores, code=config.denoiser)
    encoder = TextEncoder.load(config.text, folder)
    check_sources(stores, prompts, encoder)
    denoiser = load_denoiser(folder, config).eval().requires_grad_(False)
    tuned = tuned_parameters(encoder, args.layers)
    prepare_run_folder(out, OUTPUTS, args)
    out.mkdir(parents=True, exist_ok=True)
    encoder.model.train()  # dropout on: a cohort's few hundred label sets, regularised
    optimizer = torch.optim.AdamW(tuned.values(), lr=args.lr, weight_decay=1e-2)
    step = 0
    if args.resume and (out / CHECKPOINT).is_file():
        step = load_checkpoint(out / CHECKPOINT, {"encoder": encoder.model}, {"adamw": optimizer}, {})["step"]
    rules = SamplingRules(block=config.denoiser.block_slices, length_p=0.0, text_drop=0.0, time_shift=args.time_shift)
    blocks = BlockDataset(stores, rules, args.seed)
    (log_file, rows), losses = open_loss_log(out / LOSS_LOG, ["step", "loss", "lr"], step), []
    started = time.perf_counter()
    while step < args.steps:
        positions = range(step * args.batch_size, (step + 1) * args.batch_size)
        batch = collate([blocks[p] for p in positions])
        teacher, codes, student = draw_prompts(blocks, prompts, positions, batch.first_slice,
                                               generator(args.seed, PROMPT, step), args)
        torch.manual_seed(generator(args.seed, DROPOUT, step).initial_seed())  # the encoder's dropout: resumable
        loss = distillation_loss(denoiser, encoder, batch, teacher, codes, student)
        if not torch.isfinite(loss):
            raise CTFlowError(f"the loss became {loss.item()} at step {step + 1}: lower --lr")
        lr = cosine_schedule(step, args.lr, args.warmup, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tuned.values(), 1.0)
        optimizer.step()
        step += 1
        losses.append(loss.item())
        rows.writerow([step, f"{loss.item():.6g}", f"{lr:.3g}"])
        if step % args.log_every == 0 or step == args.steps:
            seconds = time.perf_counter() - started
            log_file.flush()
            log(f"step {step}/{args.steps} loss {np.mean(losses[-args.log_every:]):.5f} lr {lr:.2g} {seconds:.0f} s")
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(out / CHECKPOINT, {"encoder": encoder.model}, {"adamw": optimizer}, {},
                            {"step": step, "args": args.meta()})
    log_file.close()
    model = write_model(folder, checksums, tuned, out / MODEL, args, step)
    return {"model": str(model), "steps": step, "final_loss": float(np.mean(losses[-args.log_every:])) if losses else None}


def tuned_parameters(encoder: TextEncoder, layers: int) -> dict[str, torch.nn.Parameter]:
    """The parameters of the encoder's top `layers` transformer layers, set to train; every other one frozen."""
    depth = int(getattr(encoder.model.config, "num_hidden_layers", 0))
    if not 1 <= layers <= depth:
        raise CTFlowError(f"--layers must be from 1 to the encoder's {depth} layers, not {layers}")
    top = tuple(f"encoder.layer.{k}." for k in range(depth - layers, depth))
    tuned = {name: p for name, p in encoder.model.named_parameters() if name.startswith(top)}
    if not tuned:
        raise CTFlowError(f"the text encoder {encoder.name} has no encoder.layer.N parameters to tune")
    for name, parameter in encoder.model.named_parameters():
        parameter.requires_grad_(name in tuned)
    return tuned


def nested(inner: Path, outer: Path) -> bool:
    """Whether `inner` is `outer` or lies inside it."""
    return inner.resolve().is_relative_to(outer.resolve())


def write_model(folder: Path, checksums: dict[str, str], tuned: dict[str, torch.nn.Parameter], out: Path,
                args: TuneRun, step: int) -> Path:
    """`folder` with the tuned layers beside it (TUNED, named by text.tuned), written whole into `out`: the files
    its checksums list (verified at the start, checked again as copied), nothing else it may hold."""

    def fill(staging: Path) -> None:
        copy_model_files(folder, checksums, staging)
        save_file({name: p.detach().half().contiguous() for name, p in tuned.items()}, staging / TUNED)
        config = json.loads((staging / CONFIG).read_text(encoding="utf-8"))
        config["text"]["tuned"] = TUNED
        (staging / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        card = staging / CARD
        if card.is_file():
            card.write_text(card.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + (
                f"Text encoder: the top {args.layers} layers of {config['text']['source']} tuned by `ctflow-train "
                f"tune-text` ({step} steps, batch {args.batch_size}, lr {args.lr:g}; the writer's report in "
                f"{args.writer_p:.0%} of prompts, '' in {args.empty_p:.0%}, report variants in the rest) so that other "
                f"words for the same findings move this denoiser as the writer's do ({TUNED}).\n"), encoding="utf-8")
        write_checksums(staging)

    return atomic_folder(out, fill, overwrite=True)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model folder whose text encoder is tuned")
    parser.add_argument("--cache", type=Path, nargs="+", required=True,
                        help="latent stores embedded by that model's encoder, of cohorts with labels (their blocks "
                             "and the writer's tokens)")
    parser.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, loss.csv, model/")
    add_schedule_options(parser, steps=600, lr=2e-5, warmup=30)
    parser.add_argument("--layers", type=positive(int), default=6,
                        help="tune (and ship) the encoder's top N transformer layers; its embeddings stay (default 6: "
                             "all of MiniLM's, 21 MB in half precision)")
    parser.add_argument("--batch", dest="batch_size", type=positive(int), default=4)
    parser.add_argument("--writer-p", type=probability, default=0.25,
                        help="share of prompts that are the writer's report itself (keeps what the denoiser reads)")
    parser.add_argument("--empty-p", type=probability, default=0.05,
                        help="share of prompts that are '' (guidance's unconditional branch)")
    parser.add_argument("--time-shift", type=positive(float), default=2.0, help="flow time bent towards noise, as the flow run")
    add_run_options(parser, save_every=100)


def run(args: argparse.Namespace) -> int:
    return print_json(tune(TuneRun.from_args(args), lambda line: print(line, file=sys.stderr, flush=True)))
