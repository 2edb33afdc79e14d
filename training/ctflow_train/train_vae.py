"""Slice autoencoder training (the "A-VAE"): L1 reconstruction + a little KL + a patch-GAN after a warm-up.

    ctflow-train vae --data cache/cohort --out cache/vae --steps 800 --adv-start 600 --threads 1

Slices are HU in the window [-1000, 1000] mapped to [-1, 1] (ctflow's SliceAutoencoder does the mapping,
so training and generation agree). Training uses random square crops: the VAE is fully convolutional
(no attention), and a 128-pixel crop costs a quarter of a full 256-pixel slice. Held-out patients give
PSNR/SSIM at full size. LPIPS, the usual perceptual term, needs downloaded network weights and is not
available offline, so it is not used. At the end the latents are standardised (shift and scale stored
in the VAE config, as FLUX does) so flow matching sees unit-variance latents.

`--finding-weight W` counts the pixels a cohort finding drew (masks/) 1 + W times in the reconstruction loss, and
`--finding-crop-p P` centres that share of the crops on a finding: a finding is a few hundred of a slice's 65536
pixels, so without them the 16x latent spends its few numbers on the anatomy every slice shares. Held-out slices
that hold a finding are measured apart (metrics.json "held_out_findings": mean abs error in HU inside each one).

`--decoder-of RUN` trains on only the decoder of an earlier run's VAE: the encoder and the latent standardisation
stay as they were, so its latents, and every latent cache and denoiser made from them, stay valid, while the
slices decoded from them get sharper.

`--anchor-to RUN` trains the whole of an earlier run's autoencoder again (with the finding weight, say) while holding
its latents to RUN's wherever no finding reaches (`--anchor-weight`: squared distance in standardised latent units):
the anatomy keeps the latents a denoiser of RUN's stores already knows, so that denoiser stays valid, and the
findings may take more of the latent (on the demo cohort at weight 1 they did not: the decoder gained, see
docs/training-log.md).

Writes to --out: vae/ (diffusers folder), checkpoint.safetensors (for --resume), loss.csv, metrics.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ctflow.autoencoder import VAE_PRESETS, SliceAutoencoder
from ctflow.config import AutoencoderConfig
from ctflow.conventions import END_HU, START_HU
from ctflow.errors import CTFlowError
from ctflow.io import atomic_folder, atomic_write

from .checkpoint import CHECKPOINT, LOSS_LOG, load_checkpoint, open_loss_log, prepare_run_folder, save_checkpoint
from .dataset import patient_of
from .findings import CODES
from .options import (
    RunOptions, add_holdout_option, add_run_options, add_schedule_options, add_size_option, at_least_zero, loss_weight,
    positive, probability,
)
from .runtime import cosine_schedule, load_vae, set_threads
from .training_data import list_cases, load_cases

OUTPUTS = (CHECKPOINT, LOSS_LOG, "metrics.json", "vae")  # what a run writes to --out

# "cpu-fast" quarters the channels of "cpu" at every level (8 at full size). On the shared 2-core machine
# "cpu" decoded a 256^2 slice in 0.6-2 s, this one in about 0.25 s: the difference between a 128-slice
# volume decoding in half a minute or in minutes. A training step (batch 8, 128^2 crops, 1 thread) takes ~0.8 s.
# "cpu-16x" adds a fifth level: 16x16 latents of a 256^2 slice, a quarter of the numbers a denoiser must generate,
# and the decoder draws the fine texture.
VAE_VARIANTS = {
    **VAE_PRESETS,
    "cpu-fast": dict(VAE_PRESETS["cpu"], block_out_channels=(8, 16, 32, 64), norm_num_groups=4),
    "cpu-16x": dict(VAE_PRESETS["cpu"], block_out_channels=(8, 16, 32, 64, 64), norm_num_groups=4,
                    down_block_types=("DownEncoderBlock2D",) * 5, up_block_types=("UpDecoderBlock2D",) * 5),
}


@dataclass(frozen=True)
class VAERun(RunOptions):
    """The options of one `ctflow-train vae` run (see `configure`)."""

    RESUME_MAY_CHANGE = RunOptions.RESUME_MAY_CHANGE | {"eval_every", "eval_slices"}  # the final metrics' sample

    data: Path
    out: Path
    preset: str
    decoder_of: Path | None
    anchor_to: Path | None
    anchor_weight: float | None  # None: 1 with --anchor-to
    size: int
    steps: int
    batch_size: int
    crop: int
    lr: float
    warmup: int
    kl_weight: float
    adv_weight: float
    adv_start: int
    constant_p: float
    finding_weight: float
    finding_crop_p: float
    holdout: int
    eval_every: int
    eval_slices: int


class PatchDiscriminator(nn.Sequential):
    """Real/fake logits per ~30-pixel patch [B, 1, H/8, W/8] (PatchGAN): it judges texture, not layout."""

    def __init__(self, channels: int = 32) -> None:
        def down(cin, cout, norm=True):
            layers = [nn.Conv2d(cin, cout, 4, stride=2, padding=1)]
            return layers + ([nn.GroupNorm(8, cout)] if norm else []) + [nn.LeakyReLU(0.2)]

        super().__init__(*down(1, channels, norm=False), *down(channels, 2 * channels), *down(2 * channels, 4 * channels),
                         nn.Conv2d(4 * channels, 1, 3, padding=1))


# -------------------------------------------------------------------------------------- metrics


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """[1, 1, size, size] normalised Gaussian (the SSIM paper's window)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = (g / g.sum()).float()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM per image of [N, H, W] pairs (Gaussian window 11/1.5, K1 0.01, K2 0.03, valid region) -> [N]."""
    window = gaussian_window().to(a)
    a, b = a[:, None].float(), b[:, None].float()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = F.conv2d(a, window), F.conv2d(b, window)
    var_a = F.conv2d(a * a, window) - mu_a**2
    var_b = F.conv2d(b * b, window) - mu_b**2
    cov = F.conv2d(a * b, window) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return index.mean(dim=(1, 2, 3))


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float) -> torch.Tensor:
    """PSNR per image of [N, H, W] pairs -> [N] dB."""
    mse = (a.float() - b.float()).pow(2).mean(dim=(1, 2))
    return 10 * torch.log10(data_range**2 / mse.clamp(min=1e-12))


@dataclass(frozen=True)
class Reconstruction:
    """How well held-out slices come back through the autoencoder, in the model's HU window."""

    slices: int
    psnr_db: float
    ssim: float
    mae_hu: float


@dataclass(frozen=True)
class BaseRun:
    """The earlier run a decoder-only (--decoder-of) or anchored (--anchor-to) run continued, with its own training
    and figures."""

    run: str
    steps: int
    train_seconds: float
    held_out: Reconstruction


@dataclass(frozen=True)
class AutoencoderMetrics:
    """A `ctflow-train vae` run's metrics.json (its field names are that file's format): read back by export for the
    model card and by a later --decoder-of or --anchor-to run."""

    preset: str
    decoder_of: BaseRun | None  # None: the run trained the whole autoencoder
    steps: int
    train_seconds: float
    train_slices: int
    held_out_patients: list[str]
    shift_factor: float
    scaling_factor: float
    held_out: Reconstruction
    held_out_findings: dict[str, float] | None = None  # finding -> mean abs error (HU) inside it; cohort data only
    anchored_to: BaseRun | None = None  # the run whose latents an --anchor-to run held outside the findings
    lpips: str = "not measured: LPIPS needs downloaded network weights (offline here)"

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if v is not None or k not in ("decoder_of", "anchored_to")}

    @classmethod
    def from_json(cls, data: dict) -> "AutoencoderMetrics":
        bases = {key: BaseRun(**{**data[key], "held_out": Reconstruction(**data[key]["held_out"])})
                 for key in ("decoder_of", "anchored_to") if data.get(key) is not None}
        return cls(**{**data, "decoder_of": None, **bases, "held_out": Reconstruction(**data["held_out"])})

    @classmethod
    def read(cls, run_folder: Path) -> "AutoencoderMetrics":
        return cls.from_json(json.loads((run_folder / "metrics.json").read_text(encoding="utf-8")))

    def training(self) -> str:
        """Steps and time of the autoencoder, and of the run it continued when it continued one."""
        own = f"{self.steps} steps, {self.train_seconds / 60:.0f} min"
        base = self.decoder_of or self.anchored_to
        if base is None:
            return own
        then = "its decoder alone" if self.decoder_of else "all of it with its latents held outside the findings,"
        return (f"{base.steps} steps, {base.train_seconds / 60:.0f} min (held out: PSNR {base.held_out.psnr_db} dB), "
                f"then {then} {own}")

    def markdown(self) -> str:
        """The model card's line of the held-out figures."""
        held = self.held_out
        inside = ""
        if self.held_out_findings:
            inside = " Inside the findings: " + ", ".join(f"{name.replace('_', ' ')} {error} HU"
                                                          for name, error in self.held_out_findings.items()) + "."
        patients = len({patient_of(name) for name in self.held_out_patients})  # the held-out volumes' names
        return (f"- autoencoder on {held.slices} held-out slices ({patients} unseen patients), "
                f"HU window [-1000, 1000]: PSNR {held.psnr_db} dB, SSIM {held.ssim}, mean abs error {held.mae_hu} HU."
                f"{inside} LPIPS not measured (its weights cannot be downloaded offline).")


def reconstruction_metrics(autoencoder: SliceAutoencoder, hu: torch.Tensor) -> Reconstruction:
    """PSNR/SSIM of reconstructions of HU slices [N, H, W], both clipped to the model's HU window."""
    low, high = autoencoder.config.hu_window
    original = hu.float().clamp(low, high)
    recon = autoencoder.decode(autoencoder.encode(original))  # [N, H, W] HU
    span = high - low
    return Reconstruction(
        slices=int(len(hu)),
        psnr_db=round(float(psnr(recon, original, span).mean()), 2),
        ssim=round(float(ssim((recon - low) / span, (original - low) / span).mean()), 4),
        mae_hu=round(float((recon - original).abs().mean()), 1),
    )


def finding_errors(autoencoder: SliceAutoencoder, cases, limit: int) -> dict[str, float]:
    """Mean abs error (HU, model window) inside each finding, over at most `limit` held-out slices that hold one,
    spread evenly: how much of a finding the latent keeps, apart from the anatomy around it."""
    hu = torch.cat([torch.from_numpy(case.hu[: case.content_slices]) for case in cases])
    mask = torch.cat([torch.from_numpy(case.finding_mask) for case in cases])
    holding = mask.flatten(1).any(1).nonzero().squeeze(1)
    if not len(holding):
        return {}
    chosen = holding[torch.linspace(0, len(holding) - 1, min(limit, len(holding))).round().long().unique()]
    low, high = autoencoder.config.hu_window
    original = hu[chosen].float().clamp(low, high)
    error = (autoencoder.decode(autoencoder.encode(original)) - original).abs()  # [N, H, W] HU
    return {name: round(float(error[mask[chosen] == code].mean()), 1)
            for name, code in CODES.items() if (mask[chosen] == code).any()}


def held_out_slices(cases, every: int, limit: int) -> torch.Tensor:
    """Every `every`-th content slice of the held-out patients, at most `limit`: [N, H, W] int16."""
    slices = [torch.from_numpy(case.hu[: case.content_slices : every]) for case in cases]
    return torch.cat(slices)[:limit]


# -------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class SlicePool:
    """All content slices of the training patients (white end slices are added by draw_batch) and, for the
    finding-weighted loss, which of their pixels a finding drew."""

    hu: torch.Tensor  # [N, H, W] int16
    findings: torch.Tensor | None = None  # [N, H, W] bool, or None: the loss weighs every pixel alike
    holding: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # slices with a finding

    def __len__(self) -> int:
        return len(self.hu)


def slice_pool(cases) -> SlicePool:
    """The cases' slices, with their finding pixels when every case was loaded with its mask."""
    hu = torch.cat([torch.from_numpy(case.hu[: case.content_slices]) for case in cases])
    if any(case.finding_mask is None for case in cases):
        return SlicePool(hu)
    findings = torch.cat([torch.from_numpy(case.finding_mask > 0) for case in cases])
    return SlicePool(hu, findings, findings.flatten(1).any(1).nonzero().squeeze(1))


def draw_batch(pool: SlicePool, batch_size: int, crop: int, constant_p: float, generator: torch.Generator,
               finding_crop_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, crop, crop] HU, [B, crop, crop] bool finding pixels): random slices at random crops, a `finding_crop_p`
    share of them around a random finding pixel; a few are the constant start/end slices the pipeline encodes."""
    n, height, width = pool.hu.shape
    index = torch.randint(n, (batch_size,), generator=generator)
    top = torch.randint(height - crop + 1, (batch_size,), generator=generator)
    left = torch.randint(width - crop + 1, (batch_size,), generator=generator)
    around_finding = []  # no draw when off: a run without finding crops takes the random crops it always took
    if finding_crop_p and len(pool.holding):
        around_finding = (torch.rand(batch_size, generator=generator) < finding_crop_p).nonzero().squeeze(1).tolist()
    for b in around_finding:
        index[b] = pool.holding[torch.randint(len(pool.holding), (1,), generator=generator)]
        pixels = pool.findings[index[b]].nonzero()  # [P, 2] (row, column)
        y, x = pixels[torch.randint(len(pixels), (1,), generator=generator)][0]
        top[b] = (y - torch.randint(crop, (1,), generator=generator)).clamp(0, height - crop)
        left[b] = (x - torch.randint(crop, (1,), generator=generator)).clamp(0, width - crop)
    crops = list(zip(index, top, left))
    out = torch.stack([pool.hu[i, y : y + crop, x : x + crop] for i, y, x in crops]).float()
    drawn = (torch.stack([pool.findings[i, y : y + crop, x : x + crop] for i, y, x in crops])
             if pool.findings is not None else torch.zeros(batch_size, crop, crop, dtype=torch.bool))
    constant = torch.rand(batch_size, generator=generator) < constant_p
    value = torch.where(torch.rand(batch_size, generator=generator) < 0.5, START_HU, END_HU)
    out[constant] = value[constant, None, None].expand(-1, crop, crop)
    drawn[constant] = False
    return out, drawn


# -------------------------------------------------------------------------------------- training


def build(args: VAERun):
    """VAE (fresh, or an earlier run's to continue), discriminator and optimizers. The VAE is wrapped by
    ctflow's SliceAutoencoder for the HU mapping."""
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    base = args.decoder_of or args.anchor_to
    if base:
        autoencoder = load_vae(base / "vae", args.size, chunk_size=AutoencoderConfig.chunk_size)
    else:
        autoencoder = SliceAutoencoder(AutoencoderKL(**VAE_VARIANTS[args.preset]), AutoencoderConfig(image_size=args.size))
    vae = autoencoder.vae
    vae.train().requires_grad_(True)  # SliceAutoencoder freezes for inference; here we train
    if args.decoder_of:  # what makes the latents stays fixed
        vae.encoder.eval().requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    disc = PatchDiscriminator()
    trained = [p for p in vae.parameters() if p.requires_grad]
    opt_vae = torch.optim.AdamW(trained, lr=args.lr, betas=(0.5, 0.9), weight_decay=0.0)
    opt_disc = torch.optim.AdamW(disc.parameters(), lr=args.lr, betas=(0.5, 0.9), weight_decay=0.0)
    return autoencoder, disc, opt_vae, opt_disc


def frozen_copy(autoencoder: SliceAutoencoder):
    """The VAE as it is now, never trained: what an anchored run holds its latents to."""
    return copy.deepcopy(autoencoder.vae).eval().requires_grad_(False)


def latent_drift(posterior, anchor, x: torch.Tensor, inside: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean squared distance (standardised latent units) of the encoder's means from the anchor's, over the latent
    pixels no finding reaches: a finding's latent pixels and their neighbours (a latent pixel sees beyond its
    own 16 x 16) are free."""
    with torch.no_grad():
        held = anchor.encode(x).latent_dist.mean  # [B, C, h', w']
    reach = F.max_pool2d(F.adaptive_max_pool2d(inside.float(), held.shape[-2:]), 3, stride=1, padding=1)
    outside = 1 - reach  # [B, 1, h', w']
    squared = ((posterior.mean - held) * scale).pow(2) * outside
    return squared.sum() / (outside.sum() * held.shape[1]).clamp(min=1)


def train_step(autoencoder, disc, opt_vae, opt_disc, hu: torch.Tensor, findings: torch.Tensor, step: int,
               args, anchor=None) -> dict:
    """One generator (VAE) update and, once the adversarial phase started, one discriminator update. The L1 counts
    finding pixels 1 + finding_weight times (normalised by the weights: a batch without findings is the plain L1);
    with an anchor (a frozen VAE), the latents are held to its own outside the findings."""
    vae = autoencoder.vae
    x = autoencoder.hu_to_model(hu).unsqueeze(1)  # [B, 1, h, w] in [-1, 1]
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample  # [B, 1, h, w]
    error = (recon - x).abs()
    inside = findings.unsqueeze(1)  # [B, 1, h, w] bool
    pixel_weight = 1 + args.finding_weight * inside.float()
    rec = (error * pixel_weight).sum() / pixel_weight.sum()
    kl = posterior.kl().mean()  # summed over latent elements, averaged over the batch
    drift = torch.zeros(())
    if anchor is not None:
        drift = latent_drift(posterior, anchor, x, inside, vae.config.scaling_factor)
    adversarial = step >= args.adv_start
    gen = -disc(recon).mean() if adversarial else torch.zeros(())
    loss = rec + args.kl_weight * kl + args.adv_weight * gen + anchor_weight(args) * drift
    opt_vae.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    opt_vae.step()
    d_loss = torch.zeros(())
    if adversarial:
        d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(recon.detach())).mean()  # hinge loss
        opt_disc.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_disc.step()
    finding_l1 = error.detach()[inside].mean().item() if inside.any() else float("nan")
    return {"rec_l1": rec.item(), "finding_l1": finding_l1, "kl": kl.item(), "drift": drift.item(), "gen": gen.item(),
            "disc": d_loss.item()}


def anchor_weight(args) -> float:
    """--anchor-weight, 1 when only --anchor-to was given (None tells a weight given without an anchor apart)."""
    return 1.0 if args.anchor_weight is None else args.anchor_weight


@torch.no_grad()
def standardise_latents(autoencoder: SliceAutoencoder, pool: SlicePool, count: int, generator: torch.Generator) -> dict:
    """Set the VAE's shift/scaling so encoded training slices have mean 0 and std 1 over all latent elements."""
    vae = autoencoder.vae
    vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    chosen = pool.hu[torch.randperm(len(pool), generator=generator)[:count]]
    raw = SliceAutoencoder(vae, autoencoder.config).encode(chosen)
    shift, scale = float(raw.mean()), float(1 / raw.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return {"shift_factor": shift, "scaling_factor": scale}


def train(args: VAERun) -> AutoencoderMetrics:
    out = Path(args.out)
    if args.holdout < 1:
        raise CTFlowError("--holdout must be at least 1: the run measures the autoencoder on held-out patients")
    train_entries, held_entries = list_cases(args.data, args.holdout)  # a bad --data ends here, before --out exists
    base = args.decoder_of or args.anchor_to
    option = "--decoder-of" if args.decoder_of else "--anchor-to"
    if base and not all((base / name).exists() for name in ("vae", "metrics.json")):
        raise CTFlowError(f"{option} {base} is not a finished `ctflow-train vae` run (vae/, metrics.json)")
    if args.anchor_weight is not None and not args.anchor_to:
        raise CTFlowError("--anchor-weight holds the latents to an earlier run's: give that run with --anchor-to RUN")
    masks = all(entry.get("mask") for entry in train_entries)  # a cohort's: the log shows the error inside findings
    if (args.finding_weight or args.finding_crop_p) and not masks:
        raise CTFlowError(f"--finding-weight and --finding-crop-p need the finding masks (masks/) of a cohort; "
                          f"{args.data} lacks some (make it with ctflow-train cohort)")
    if args.crop > args.size:
        raise CTFlowError(f"--crop {args.crop} is larger than the slices (--size {args.size})")
    set_threads(args.threads)
    pool = slice_pool(load_cases(args.data, train_entries, masks))
    autoencoder, disc, opt_vae, opt_disc = build(args)
    prepare_run_folder(out, OUTPUTS, args)  # after every check: a refused run removes nothing
    out.mkdir(parents=True, exist_ok=True)
    anchor = frozen_copy(autoencoder) if args.anchor_to else None
    generator = torch.Generator().manual_seed(args.seed)
    # the data draws, and torch's own generator (the posterior's samples): both kept, so --resume is bit for bit
    randomness = {"data": generator, "torch": torch.default_generator}
    modules = {"vae": autoencoder.vae, "disc": disc}
    optimizers = {"opt_vae": opt_vae, "opt_disc": opt_disc}
    checkpoint = out / CHECKPOINT
    step, elapsed = 0, 0.0
    if args.resume and checkpoint.exists():
        meta = load_checkpoint(checkpoint, modules, optimizers, randomness)
        step, elapsed = meta["step"], meta["elapsed_s"]
    columns = ["step", "lr", "rec_l1", "finding_l1", "kl", "drift", "gen", "disc", "step_s"]
    log, writer = open_loss_log(out / LOSS_LOG, columns, step)
    name = f"decoder of {args.decoder_of}" if args.decoder_of else f"anchored to {base}" if base else args.preset
    print(f"vae {name}: {sum(p.numel() for p in autoencoder.vae.parameters()) / 1e6:.2f} M parameters, "
          f"{len(pool)} training slices, from step {step}", flush=True)
    while step < args.steps:
        started = time.perf_counter()
        lr = cosine_schedule(step, args.lr, args.warmup, args.steps)
        for group in opt_vae.param_groups + opt_disc.param_groups:
            group["lr"] = lr
        hu, findings = draw_batch(pool, args.batch_size, args.crop, args.constant_p, generator, args.finding_crop_p)
        losses = train_step(autoencoder, disc, opt_vae, opt_disc, hu, findings, step, args, anchor)
        step += 1
        step_s = time.perf_counter() - started
        elapsed += step_s
        writer.writerow([step, f"{lr:.3g}"] + [f"{v:.5g}" for v in losses.values()] + [f"{step_s:.3f}"])
        if step % args.log_every == 0 or step == args.steps:
            log.flush()
            print(f"step {step}/{args.steps} " + " ".join(f"{k} {v:.4g}" for k, v in losses.items()) + f" {step_s:.2f}s", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(checkpoint, modules, optimizers, randomness,
                            {"step": step, "elapsed_s": elapsed, "args": args.meta()})
    log.close()
    autoencoder.vae.eval()
    origin = None
    if base:
        before = AutoencoderMetrics.read(base)
        scale = {"shift_factor": before.shift_factor, "scaling_factor": before.scaling_factor}  # the latents' own
        preset, origin = before.preset, BaseRun(str(base), before.steps, before.train_seconds, before.held_out)
    else:
        scale = standardise_latents(autoencoder, pool, 512, generator)
        preset = args.preset
    atomic_folder(out / "vae", lambda staging: autoencoder.vae.save_pretrained(staging, safe_serialization=True),
                  overwrite=True)  # the run's own (a resumed run writes it again); readers never see half of it
    held_masks = all(entry.get("mask") for entry in held_entries)
    held_cases = load_cases(args.data, held_entries, held_masks)
    trained = SliceAutoencoder(autoencoder.vae, autoencoder.config)
    metrics = AutoencoderMetrics(
        preset=preset, decoder_of=origin if args.decoder_of else None, anchored_to=origin if args.anchor_to else None,
        steps=step, train_seconds=round(elapsed, 1), train_slices=int(len(pool)),
        held_out_patients=[entry["name"] for entry in held_entries], **scale,
        held_out=reconstruction_metrics(trained, held_out_slices(held_cases, args.eval_every, args.eval_slices)),
        held_out_findings=finding_errors(trained, held_cases, args.eval_slices) if held_masks else None,
    )
    text = json.dumps(metrics.to_json(), indent=1) + "\n"
    atomic_write(out / "metrics.json", lambda path: path.write_text(text, encoding="utf-8"), overwrite=True)
    print(json.dumps(dataclasses.asdict(metrics.held_out)), flush=True)
    return metrics


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="prepared folder (ctflow-train cohort / prepare-ctrate)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--preset", default="cpu-fast", choices=sorted(VAE_VARIANTS), help="VAE architecture")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--decoder-of", type=Path, help="earlier vae run folder: train its decoder only, keeping its latents")
    start.add_argument("--anchor-to", type=Path,
                       help="earlier vae run folder: train all of it, holding its latents outside the findings")
    parser.add_argument("--anchor-weight", type=loss_weight,
                        help="weight of the squared latent drift from the --anchor-to run's (default 1)")
    add_size_option(parser)
    add_schedule_options(parser, steps=2000, lr=1e-3, warmup=50)
    parser.add_argument("--batch", dest="batch_size", type=positive(int), default=8, help="slices per step")
    parser.add_argument("--crop", type=positive(int), default=128, help="training crop side (pixels, at most --size)")
    parser.add_argument("--kl-weight", type=loss_weight, default=1e-6)
    parser.add_argument("--adv-weight", type=loss_weight, default=0.05)
    parser.add_argument("--adv-start", type=at_least_zero(int), default=1000, help="step at which the discriminator joins")
    parser.add_argument("--constant-p", type=probability, default=0.03, help="share of all-black / all-white slices")
    parser.add_argument("--finding-weight", type=loss_weight, default=0.0,
                        help="count the pixels a cohort finding drew (masks/) 1 + W times in the L1 (default 0)")
    parser.add_argument("--finding-crop-p", type=probability, default=0.0,
                        help="share of crops centred on a finding of the cohort's masks (default 0)")
    add_holdout_option(parser)
    parser.add_argument("--eval-every", type=positive(int), default=4, help="evaluate every N-th held-out slice")
    parser.add_argument("--eval-slices", type=positive(int), default=128)
    add_run_options(parser, save_every=200)


def run(args: argparse.Namespace) -> int:
    train(VAERun.from_args(args))
    return 0
