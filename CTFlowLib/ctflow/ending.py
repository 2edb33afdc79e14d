"""Where a generated volume ends: one detector per generation, asked once per sampled block.

The model ends a volume by drawing white end slices (conventions.END_HU). The latent test finds them in a block's
clean latents before decoding; the decoded check catches an end slice the latent test missed.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .conventions import real_slices

RULES = ("length", "ctflow", "released")


class VolumeEnd:
    """The end rule of one generation, asked once per sampled block (it keeps state between blocks).

    "length": a requested slice count; the volume stops there, white or not.
    "ctflow": cut at the block's first white latent frame, or at its first decoded end slice the latent test missed.
    "released": the published CTFlow code's rule, kept exact: a block whose first frame is white is the last and is
    kept whole; white frames at the volume's end are trimmed (held back until a later frame shows they are not).
    """

    def __init__(self, rule: str, white: torch.Tensor, tolerance: float, fraction: float) -> None:
        if rule not in RULES:
            raise ValueError(f"unknown end rule {rule!r}")
        self.rule, self.white, self.tolerance, self.fraction = rule, white, tolerance, fraction
        self.tail: torch.Tensor | None = None  # "released": [C, n, h, w] white frames held back

    def __call__(
        self, block: torch.Tensor, room: int, decode: Callable[[torch.Tensor], np.ndarray],
    ) -> tuple[np.ndarray | None, bool]:
        """block: clean latents [C, T, h, w] just sampled; room: slices left under the length cap (>= 1).
        Returns (the HU slices [n, H, W] it adds to the volume, None for none yet; whether the volume ends)."""
        latents, last = self.latents(block, room)
        if not latents.shape[1]:
            return None, last
        return self.decoded(decode(latents), last)

    def latents(self, block: torch.Tensor, room: int) -> tuple[torch.Tensor, bool]:
        """The latent test: (the frames [C, n, h, w] to decode, whether the volume ends with them)."""
        keep = min(block.shape[1], room)
        if self.rule == "length":
            return block[:, :keep], keep == room
        white = torch.nonzero(self.white_frames(block))
        if self.rule == "ctflow":
            end = int(white[0]) if len(white) else None
            keep = keep if end is None else min(keep, end)
            return block[:, :keep], end is not None or keep == room
        last = bool(len(white) and white[0] == 0) or keep == room
        return self._hold_back_white_tail(block[:, :keep]), last

    def decoded(self, hu: np.ndarray, last: bool) -> tuple[np.ndarray | None, bool]:
        """The decoded check (rule "ctflow"): the decoder draws an end slice plainly where the latent test may miss it."""
        real = real_slices(hu) if self.rule == "ctflow" else len(hu)
        if real == len(hu):
            return hu, last
        return (hu[:real] if real else None), True

    def white_frames(self, block: torch.Tensor) -> torch.Tensor:
        return white_frames(block, self.white.to(block.device), self.tolerance, self.fraction)

    def _hold_back_white_tail(self, block: torch.Tensor) -> torch.Tensor:
        """The block's frames up to its trailing white run, after the run held back from the block before; the
        new trailing run is held back in turn (and dropped if the volume ends)."""
        if self.tail is not None:
            block = torch.cat([self.tail, block], dim=1)
        is_white = self.white_frames(block).tolist()
        content = len(is_white)
        while content and is_white[content - 1]:
            content -= 1
        self.tail = block[:, content:]
        return block[:, :content]


def white_frames(block: torch.Tensor, white: torch.Tensor, tolerance: float, fraction: float) -> torch.Tensor:
    """[T] bool: the frames of block [C, T, h, w] whose latents lie within `tolerance` of the white marker white
    [C, h, w] for more than `fraction` of their elements (the released code's test, strict on both counts)."""
    return white_distance(block, white, fraction) < tolerance


def white_distance(block: torch.Tensor, white: torch.Tensor, fraction: float) -> torch.Tensor:
    """[T]: per frame, the distance from white that decides it: the frame counts as white for any tolerance above
    it. Export calibrates the tolerance on these, so calibration and generation apply one rule.

    More than `fraction` of a frame's n elements lie closer than a tolerance exactly when its k-th closest
    element does, k = floor(fraction * n) + 1."""
    distance = (block - white[:, None]).abs().transpose(0, 1).flatten(1)  # [T, C*h*w]
    k = math.floor(fraction * distance.shape[1]) + 1
    if k > distance.shape[1]:  # no share of a frame is more than all of it
        return torch.full(distance.shape[:1], math.inf, dtype=distance.dtype, device=distance.device)
    return distance.kthvalue(k, dim=1).values
