"""Rectified-flow ODE sampling. Convention (as CTFlow): z_t = (1 - t) * clean + t * noise, velocity = noise - clean,
integrated from t = 1 (noise) to t = 0 (clean)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from .conventions import MAX_SHIFT, MAX_STEPS
from .errors import RequestError
from .places import Places
if TYPE_CHECKING:  # config imports this module
    from .config import DenoiserConfig

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z [B, ...], t scalar tensor) -> v like z
METHODS = ("euler", "heun", "ab2")  # ab2: second order at one model call per step
# Finding guidance's weight on a block's first slices (then 1): they continue the block before, and pushing them
# towards the findings breaks the join (seams at finding guidance 2 on 23 unseen patients: 1.35 at full weight, 1.17
# eased in so).
FINDING_ONSET = (0.0, 0.5)


class Cancelled(Exception):
    """Raised inside sampling when the caller's cancel flag is set; the pipeline turns it into a partial result."""


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """steps + 1 times from 1 to 0. shift > 1 spends more steps at high noise (SD3-style time shift).

    Unshifted, it is float32 linspace(1, 0, steps + 1) exactly, as the released CTFlow sampler evaluates.
    """
    if shift == 1.0:
        return torch.linspace(1.0, 0.0, steps + 1)
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Bend times in [0, 1] towards 1 (noise) for shift > 1, keeping both ends fixed."""
    return shift * t / (1 + (shift - 1) * t)


def sample(
    velocity: Velocity,
    noise: torch.Tensor,
    steps: int,
    method: str,
    shift: float = 1.0,
    is_cancelled: Callable[[], bool] = lambda: False,
) -> torch.Tensor:
    """Integrate dz/dt = v(z, t) from noise at t = 1 down to t = 0 and return the clean latent."""
    validate(steps, method, shift)
    grid = time_grid(steps, shift).to(noise.device)
    z = noise
    previous = None  # (v, dt) of the last step, for ab2
    for t, t_next in zip(grid[:-1], grid[1:]):
        if is_cancelled():
            raise Cancelled()
        dt = t_next - t
        v = velocity(z, t)
        if method == "heun" and t_next > 0:  # the last step is Euler: v at t = 0 adds cost, not accuracy
            z_euler = z + dt * v
            z = z + dt * 0.5 * (v + velocity(z_euler, t_next))
        elif method == "ab2" and previous is not None:
            z = z + dt * adams_bashforth2(v, *previous, dt)
        else:
            z = z + dt * v
        previous = v, dt
    return z


def adams_bashforth2(v: torch.Tensor, v_before: torch.Tensor, dt_before: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """Slope of a second-order Adams-Bashforth step on an uneven grid: extrapolates v linearly from the last two
    steps, so it gains Heun's order without Heun's second model call."""
    ratio = dt / (2 * dt_before)
    return (1 + ratio) * v - ratio * v_before


def validate(steps: int, method: str, shift: float) -> None:
    if method not in METHODS:
        raise RequestError(f"unknown sampler {method!r}: choose one of {', '.join(METHODS)}")
    if isinstance(steps, bool) or not (isinstance(steps, int) and 1 <= steps <= MAX_STEPS):
        raise RequestError(f"steps must be a whole number from 1 to {MAX_STEPS}, not {steps!r}")
    if isinstance(shift, bool) or not (isinstance(shift, (int, float)) and math.isfinite(shift) and 0 < shift <= MAX_SHIFT):
        raise RequestError(f"time shift must be a number above 0 and at most {MAX_SHIFT:g}, not {shift!r}")


def guided(model_velocity: Velocity, scale: float, side: float = 0.0, finding: float = 0.0,
           places: Callable[[torch.Size], torch.Tensor] | None = None) -> Velocity:
    """Guidance with one forward over rows in Guidance.texts' order: [the prompt, or with side guidance the texts
    of the report's places (places.Places); the report without its findings, with finding guidance; the empty
    report, when scale != 1]. model_velocity sees z once per row and returns every row.

    Side guidance guides each latent cell by the texts of its place, `places(z's [T, h, w])` -> [texts, T, h, w]
    weights that add up to 1 at each cell (Places.weights), and away from what the mirrored cell's place reads at
    side > 1: v_cond = v_other + side * (v_own - v_other), own the weighted sum of the rows' velocities, other the
    same with the weights mirrored across the columns (without a lobe prior: the patient's right columns by the
    right half's text, away from the left half's, and the other way round). The denoiser sees the whole volume in
    every row; the weights apply to what each text asks for. Finding guidance then guides away from the report
    without its findings: v_cond += finding * (v_cond - v_reference), what the findings' words change and not what
    the rest of the report does, eased in over the block's first slices (FINDING_ONSET). Classifier-free guidance
    mixes the result with the empty report's: v = v_uncond + scale * (v_cond - v_uncond)."""
    if side > 0 and places is None:
        raise ValueError("side guidance needs the weights of the report's places")
    where: list[torch.Tensor] = []  # the weights, made at the first call (they need z's shape)

    def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if side > 0 and not where:
            where.append(places(z.shape[-3:]).to(z)[:, None, None])  # [texts, 1, 1, T, h, w]
        texts = len(where[0]) if side > 0 else 1
        rows = texts + (finding > 0) + (scale != 1.0)
        v = list(model_velocity(torch.cat([z] * rows), t).chunk(rows))
        if side > 0:
            place_rows = torch.stack(v[:texts])
            own, other = (where[0] * place_rows).sum(0), (where[0].flip(-1) * place_rows).sum(0)
            cond = other + side * (own - other)
        else:
            cond = v[0]
        v = v[texts:]
        if finding > 0:
            cond = cond + finding * finding_onset(z.shape[-3]).to(z) * (cond - v.pop(0))
        return cond if scale == 1.0 else v[0] + scale * (cond - v[0])

    return velocity


def finding_onset(slices: int) -> torch.Tensor:
    """[slices, 1, 1]: finding guidance's weight on each slice of a block (z's [..., T, h, w])."""
    weight = torch.ones(slices)
    onset = FINDING_ONSET[:slices]
    weight[:len(onset)] = torch.tensor(onset)
    return weight[:, None, None]


@dataclass(frozen=True)
class Guidance:
    """How one generation guides, decided once (plan()): classifier-free guidance at `scale` (1: the conditional
    branch alone; else against the empty report), side guidance at `side` over the report's `places` (0: none, as
    plan() makes it for a report whose places all read the same text) and finding guidance at `finding` (0: none,
    as plan() makes it for a report without findings): guided() says how each mixes."""

    scale: float
    side: float = 0.0
    finding: float = 0.0
    places: Places | None = None

    def __post_init__(self) -> None:
        if self.side > 0 and self.places is None:
            raise ValueError("side guidance needs the report's places")

    @property
    def branches(self) -> int:
        """Rows of text conditioning, and of the denoiser's batch: the prompt (with side guidance, the texts of its
        places), the report without its findings with finding guidance, then "" when guiding."""
        return (len(self.places.texts) if self.side > 0 else 1) + (self.finding > 0) + (self.scale != 1.0)

    def texts(self, prompt: str, reference: str | None = None) -> list[str]:
        """The texts to embed, one per branch: with side guidance the texts of the prompt's places stand for it;
        with finding guidance the reference (the prompt without its findings) follows."""
        if self.finding > 0 and reference is None:
            raise ValueError("finding guidance needs the prompt without its findings")
        return ([*(self.places.texts if self.side > 0 else [prompt])] + [reference] * (self.finding > 0)
                + [""] * (self.scale != 1.0))

    def velocity(self, model_velocity: Velocity, first_slice: int = 0) -> Velocity:
        """model_velocity sees z repeated once per row, in texts' order; first_slice: the block's, where the
        places' weights depend on the level (a lobe prior)."""
        if self.branches == 1:
            return model_velocity
        return guided(model_velocity, self.scale, self.side, self.finding,
                      None if self.side == 0 else lambda shape: self.places.weights(first_slice, shape))


def denoiser_codes(texts: tuple[str, ...], config: DenoiserConfig, first_slice: int) -> torch.Tensor | None:
    """[branches, config.code_size]: report.denoiser_code of each of Guidance.texts for the block starting at
    `first_slice` (its levels, for a lobe_map denoiser); None for a denoiser that reads no code."""
    if not config.reads_code:
        return None
    return torch.tensor([config.read_code(text, first_slice) for text in texts])


def block_velocity(denoiser, previous: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, first_slice: int,
                   guidance: Guidance, codes: torch.Tensor | None = None) -> Velocity:
    """The velocity field of one block for a denoiser (STDiT), guided; its conditioning is computed once here.

    previous: [1, C, T, h, w] clean block before it; text, mask: [guidance.branches, M, D], [branches, M] in
    Guidance.texts' order; first_slice: the block's first slice in the volume; codes: [branches,
    config.code_size] in the same order (denoiser_codes), for a denoiser that reads a code. One home for the pipeline
    and the export's end calibration, so the calibration meets the blocks the pipeline makes."""
    cond = denoiser.prepare(previous.expand(guidance.branches, -1, -1, -1, -1), text, mask,
                            torch.tensor(float(first_slice)), codes)

    def model(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # z: one row per text
        return denoiser(z, t.expand(z.shape[0]), cond)

    return guidance.velocity(model, first_slice)
