"""Where each text of a report applies under side guidance: each half of the body reads its half of the report
(report.half_reports), and with a model's lobe prior each lobe of a half reads that half's text where only that
lobe lies (report.lobe_report), the rest of the half the text where no lobe lies. The denoiser sees the whole
volume in every row; these weights say which row's velocity each latent cell follows (sampling.guided).

The lobe prior is a model folder's optional LOBE_FILE (`ctflow-train lobe-prior` writes it from the cohort's label
maps): for each lobe, the share of patients with that lobe at each latent cell, per level of the body.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .conventions import right_half
from .errors import CorruptModelError
from .report import Report, half_reports, lobe_report

LOBE_FILE = "lobes.safetensors"
HALVES = ("right", "left")
# The lobes of each half, by how a report names their levels (report.LOBE_LEVELS): the lingula is the left upper
# lobe's, so the left upper lobe reads what the report puts in the upper and the middle lobe.
HALF_LOBES = {
    "right": {"right upper lobe": frozenset({"upper"}), "right middle lobe": frozenset({"middle"}),
              "right lower lobe": frozenset({"lower"})},
    "left": {"left upper lobe": frozenset({"upper", "middle"}), "left lower lobe": frozenset({"lower"})},
}
OUTSIDE = ""  # a half's cells outside its lobes (the whole half, without a lobe prior)
MAX_LEVELS = 64


@dataclass(frozen=True, eq=False)  # tensors have no truth value: two priors are equal when they are one
class LobePrior:
    """For each lobe of HALF_LOBES: [levels, h, w], the share of patients with that lobe at each latent cell, the
    levels splitting the body's real slices head to feet in equal parts."""

    shares: dict[str, torch.Tensor]

    @classmethod
    def load(cls, folder: Path, latent_size: int) -> "LobePrior":
        """LOBE_FILE of a model folder, every tensor checked: a damaged or hostile file is one CorruptModelError."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = folder / LOBE_FILE
        try:
            shares = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise CorruptModelError(f"cannot read {path}: {exc}") from exc
        lobes = {lobe for half in HALF_LOBES.values() for lobe in half}
        if set(shares) != lobes:
            raise CorruptModelError(f"{path} holds {sorted(shares)[:6]}; a lobe prior holds one tensor per lobe: "
                                    f"{sorted(lobes)}")
        for name, share in shares.items():
            levels = share.shape[0] if share.dim() == 3 else 0
            if share.dtype != torch.float32 or share.shape != (levels, latent_size, latent_size) \
                    or not 1 <= levels <= MAX_LEVELS:
                raise CorruptModelError(f"{path}: {name} is {share.dtype} {list(share.shape)}, not float32 [levels "
                                        f"(1-{MAX_LEVELS}), {latent_size}, {latent_size}] as the model's latents")
            if not torch.isfinite(share).all() or share.min() < 0 or share.max() > 1:
                raise CorruptModelError(f"{path}: {name} holds values outside 0-1 (shares of patients)")
        if len({share.shape for share in shares.values()}) > 1:
            raise CorruptModelError(f"{path}: the lobes' tensors differ in shape")
        for half, names in HALF_LOBES.items():
            if (sum(shares[name] for name in names) > 1 + 1e-3).any():
                raise CorruptModelError(f"{path}: the {half} lobes' shares add up to more than 1 at some cell")
        return cls(shares)

    def at(self, half: str, first_slice: int, count: int, slices: int) -> dict[str, torch.Tensor]:
        """Region of the half (its lobes, and OUTSIDE them) -> [count, h, w] shares at slices first_slice.., the
        levels as fractions of a body of `slices` real slices (slices past it: the last level)."""
        levels = next(iter(self.shares.values())).shape[0]
        index = [min(math.floor((s + 0.5) * levels / slices), levels - 1) for s in range(first_slice, first_slice + count)]
        regions = {name: self.shares[name][index] for name in HALF_LOBES[half]}
        return {**regions, OUTSIDE: (1 - sum(regions.values())).clamp(min=0)}


@dataclass(frozen=True)
class Places:
    """The distinct texts of a report's places (the model's rows, in this order) and, per half, the row of each of
    its regions: with a lobe prior its lobes and OUTSIDE them; without, OUTSIDE alone (the whole half)."""

    texts: tuple[str, ...]
    rows: tuple[dict[str, int], ...]  # per half of HALVES: region -> index into texts
    prior: LobePrior | None = None
    slices: int = 1  # the real slices the volume is expected to have: the prior's levels are fractions of them

    @classmethod
    def of(cls, report: Report, render: Callable[[Report], str], prior: LobePrior | None = None,
           slices: int = 1) -> "Places":
        texts: list[str] = []
        rows = []
        for half, half_report in zip(HALVES, half_reports(report)):
            regions = {OUTSIDE: half_report} if prior is None else {
                **{lobe: lobe_report(half_report, levels) for lobe, levels in HALF_LOBES[half].items()},
                OUTSIDE: lobe_report(half_report, frozenset())}
            rendered = {region: render(text) for region, text in regions.items()}
            texts += dict.fromkeys(text for text in rendered.values() if text not in texts)
            rows.append({region: texts.index(text) for region, text in rendered.items()})
        return cls(tuple(texts), tuple(rows), prior, slices)

    def weights(self, first_slice: int, shape: torch.Size) -> torch.Tensor:
        """[texts, T, h, w]: how much each text's velocity counts at each latent cell of the block starting at
        first_slice (shape: the block's [T, h, w]); they add up to 1 at every cell."""
        count, height, width = shape
        right = torch.from_numpy(right_half(width))
        out = torch.zeros(len(self.texts), count, height, width)
        for half, mask, rows in zip(HALVES, (right, 1 - right), self.rows):
            regions = ({OUTSIDE: torch.ones(count, height, width)} if self.prior is None
                       else self.prior.at(half, first_slice, count, self.slices))
            for region, share in regions.items():
                out[rows[region]] += mask * share
        return out
