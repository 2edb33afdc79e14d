"""What flow training reads: (previous, next) block pairs drawn from latent stores through a torch DataLoader.

Every random choice that makes a sample (which volume, which offset, which prompt, text dropout, flow time, noise,
the rollout draw) comes from a generator seeded by (seed, the sample's position in the run). A sample is the same
whichever rank or DataLoader worker makes it and however often the run was interrupted: two processes of batch B
train on exactly the samples of one process of batch 2B, and a run resumed after n samples starts at position n.

Volumes are visited as DistributedSampler visits them: each epoch of len(dataset) positions is one permutation of
all volumes, drawn from (seed, epoch); a step takes the next global batch of positions and rank r the r-th share of
it, so the ranks' shares are disjoint. Workers read only their samples' windows from memory-mapped volume files.

The sampling rules (CTFlow, REFERENCE §1):
  - StartBoost: with probability start_p the block is a volume's first, whose "previous" is the all-black start
    block; otherwise a random offset. White end slices are part of every volume, so the model also learns to end it.
  - EndBoost (ours; off unless end_p > 0): with probability end_p, of the blocks that are not a first one, the block
    holds white end slices (it straddles the volume's end or lies after it): the end as an explicit target, which a
    uniform offset shows in about one block in eight of a 124-slice volume.
  - paired twins (ours; off unless paired_twins): position 2m+1 takes a cohort twin of position 2m's volume (the
    same patient with one finding flipped or moved) with all of 2m's draws (offset, prompt kind, text dropout, time,
    noise, rollout), so the two losses differ only through the report and the finding's voxels.
  - FindingBoost (ours; off unless finding_p > 0, with paired twins): with probability finding_p a pair's block is
    one that the finding reaches (slices where the twins' latents differ). A uniform offset misses a nodule in
    about eight blocks of nine, and a pair whose block it misses teaches nothing about the report's finding.
  - the prompt with "Length: N slices" with probability length_p, replaced by the embedding of "" with probability
    text_drop (classifier-free guidance's unconditional branch).
  - report variants (ours; off unless variant_p > 0): with probability variant_p, where the store holds variants,
    the prompt is one of the volume's report variants (the same findings in other words, latent_store.py) instead
    of its report; a twin takes its pair's variant, which differs from it in the flipped finding's words alone.
  - a code of the report (ours; off unless `code`): the code that denoiser reads of the prompt the sample takes for
    its block (DenoiserConfig.read_code: sides, halves or findings; at the block's levels where lobe_map_slices;
    zeros for the empty prompt); the prompts' texts are made again from the stores' cohorts.
  - flow time t ~ U(0, 1) bent towards noise by time_shift; the draws that pick the previous blocks replaced by the
    model's own estimate (rollout) and its time; and a seed for the sample's noise, which the trainer makes on its
    device (`noises`).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ctflow.config import DenoiserConfig
from ctflow.errors import CTFlowError
from ctflow.sampling import shift_time

from .dataset import patient_of
from .latent_store import LatentStore, Prompts


@dataclass(frozen=True)
class SamplingRules:
    block: int  # slices per block, T
    start_p: float = 0.5
    end_p: float = 0.0
    length_p: float = 0.5
    text_drop: float = 0.1
    time_shift: float = 1.0
    paired_twins: bool = False
    finding_p: float = 0.0
    variant_p: float = 0.0
    code: DenoiserConfig | None = None  # samples carry the code this denoiser reads of their prompt (read_code)


class Batch(NamedTuple):
    x0: torch.Tensor  # [B, C, T, h, w] the block to generate
    previous: torch.Tensor  # [B, C, T, h, w] the block before it (the black start block for a first block)
    before: torch.Tensor  # [B, C, T, h, w] the block before that (start slices where the volume has none)
    first: torch.Tensor  # [B] bool: x0 is a volume's first block
    first_slice: torch.Tensor  # [B] float: index of x0's first slice in its volume
    text: torch.Tensor  # [B, M, D] padded prompt tokens
    mask: torch.Tensor  # [B, M]
    t: torch.Tensor  # [B] flow time
    seed: torch.Tensor  # [B] int64: each sample's noise, made where it is used (`noises`)
    rollout_u: torch.Tensor  # [B] uniform: the previous block is the model's estimate where below --rollout-p
    rollout_t: torch.Tensor  # [B] the time the previous block is noised to for that estimate
    twin: torch.Tensor  # [B] bool: a cohort twin of the sample before it, with its draws (paired twins)
    code: torch.Tensor  # [B, code size] the prompt's report.denoiser_code (empty unless rules.code reads one)


def generator(*key: int) -> torch.Generator:
    """A generator for one (seed, stream, number): independent streams without one seed's draws touching another's."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


ORDER, SAMPLE, TWIN = 0, 1, 2  # generator streams: the volume order of an epoch, the draws of a sample, its twin
FINDING_REACH = 1e-3  # mean square per latent value: where twins' latents differ by less (over one position's
#                        channels; the pair loss: over a block), the finding is not there


def finding_region(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Where two twins' latents (or training targets) differ: [N, C, ...] -> bool [N, 1, ...], the finding's
    positions. Their targets differ exactly where their latents do, for either prediction."""
    return (a - b).square().mean(1, keepdim=True) > FINDING_REACH


class BlockDataset(Dataset):
    """Position n of a run -> one sample (a dict of tensors; `collate` makes a Batch of them)."""

    def __init__(self, stores: list[LatentStore], rules: SamplingRules, seed: int,
                 prompts: Prompts | None = None) -> None:
        self.stores, self.rules, self.seed = stores, rules, seed
        self.firsts = [0, *itertools.accumulate(len(store) for store in stores)]  # first volume number of each store
        for store in stores:
            short = [name for name, n in zip(store.names, store.slices) if n < rules.block]
            if short:
                raise CTFlowError(f"{store.folder}: {short[0]} has fewer slices than a block of {rules.block}")
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)
        self.twins = twin_numbers([name for store in stores for name in store.names]) if rules.paired_twins else {}
        self._finding_offsets: dict[tuple[int, int], list[int]] = {}
        if rules.code and prompts is None:
            prompts = Prompts(stores, variants=rules.variant_p > 0, code=rules.code)
        self.prompts = prompts if rules.code else None  # the prompts' texts, for their side codes

    def __len__(self) -> int:
        return self.firsts[-1]

    def number(self, position: int) -> int:
        """The volume (numbered over all stores) that `position` visits: its epoch's permutation, drawn once per epoch."""
        epoch, k = divmod(position, len(self))
        if epoch != self._epoch:
            self._epoch, self._order = epoch, torch.randperm(len(self), generator=generator(self.seed, ORDER, epoch))
        return int(self._order[k])

    def locate(self, number: int) -> tuple[LatentStore, int]:
        """A volume numbered over all stores -> its store and its number there."""
        store = bisect.bisect_right(self.firsts, number) - 1
        return self.stores[store], number - self.firsts[store]

    def volume(self, position: int) -> tuple[LatentStore, int]:
        """The store and its volume number that `position` visits."""
        return self.locate(self.number(position))

    def partner(self, position: int) -> int | None:
        """The twin that odd `position` takes of the volume before it (None without one, or at an even position)."""
        others = self.twins.get(self.number(position - 1), []) if self.twins and position % 2 else []
        if not others:
            return None
        return others[int(torch.randint(len(others), (), generator=generator(self.seed, TWIN, position)))]

    def finding_offsets(self, first: int, twin: int) -> list[int]:
        """The offsets a block may start at (0, or a whole block in) whose block holds slices where the two volumes
        differ: where the finding is. Cached per pair: two volume reads each."""
        key = (min(first, twin), max(first, twin))
        if key not in self._finding_offsets:
            (store_a, a), (store_b, b) = self.locate(first), self.locate(twin)
            la, lb = store_a.latents(a).float(), store_b.latents(b).float()
            n, block = min(len(la), len(lb)), self.rules.block
            differs = finding_region(la[:n], lb[:n]).flatten(1).any(1)  # [n] slices the finding reaches
            starts = [0] + list(range(block, n - block + 1)) if n >= 2 * block else [0]
            self._finding_offsets[key] = [o for o in starts if bool(differs[o:o + block].any())]
        return self._finding_offsets[key]

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        rules, block = self.rules, self.rules.block
        number = self.number(position)
        draws = generator(self.seed, SAMPLE, position)
        first = position - position % 2  # the pair's first position, and the twin its second takes
        pair_twin = self.partner(first + 1)
        twin = pair_twin if position % 2 else None
        if twin is not None:  # the twin of the pair's first volume, with the first's draws
            number = twin
            draws = generator(self.seed, SAMPLE, first)
        store, volume = self.locate(number)

        def uniform() -> torch.Tensor:
            return torch.rand((), generator=draws)

        slices = store.slices[volume]
        findings = rules.finding_p and pair_twin is not None
        reached = self.finding_offsets(self.number(first), pair_twin) if findings else []
        if reached and uniform() < rules.finding_p:  # no draw without FindingBoost: old runs stay bit for bit
            offset = reached[int(torch.randint(len(reached), (), generator=draws))]
        elif uniform() < rules.start_p or slices < 2 * block:
            offset = 0
        else:
            low = block
            if rules.end_p and uniform() < rules.end_p:  # no draw at all without EndBoost: old runs stay bit for bit
                low = max(block, min(store.content_slices[volume] - block + 1, slices - block))
            offset = int(torch.randint(low, slices - block + 1, (), generator=draws))
        first = offset - 2 * block  # the window is slices first..offset+T-1: before, previous, x0
        real = store.window(volume, max(0, first), offset + block)
        window = torch.cat([store.start[None].expand(-first if first < 0 else 0, -1, -1, -1), real])  # [3T, C, h, w]
        before, previous, x0 = window.transpose(0, 1).split(block, dim=1)  # [C, T, h, w] each
        kind = "length" if uniform() < rules.length_p else "plain"
        dropped = uniform() < rules.text_drop
        variant = None
        if rules.variant_p and uniform() < rules.variant_p:  # no draw without: bit for bit as before
            drawn = int(torch.randint(2**31, (), generator=draws))  # drawn alike in every store: twins stay in step
            variant = drawn % store.variants if store.variants else None
        text = store.empty if dropped else store.text(kind, volume, variant)
        code = (torch.zeros(0) if self.prompts is None else torch.zeros(self.prompts.code.code_size) if dropped
                else self.prompts.code_of(number, variant, offset))
        return {"x0": x0, "previous": previous, "before": before, "first_slice": torch.tensor(float(offset)),
                "text": text, "t": shift_time(uniform(), rules.time_shift),
                "seed": torch.randint(2**62, (), generator=draws), "rollout_u": uniform(), "rollout_t": uniform(),
                "twin": torch.tensor(twin is not None), "code": code}


def twin_numbers(names: list[str]) -> dict[int, list[int]]:
    """Volume number -> the numbers of the other volumes of the same patient (cohort twins), where there are any."""
    patients: dict[str, list[int]] = {}
    for number, name in enumerate(names):
        patients.setdefault(patient_of(name), []).append(number)
    return {n: [m for m in group if m != n] for group in patients.values() if len(group) > 1 for n in group}


class Noise(NamedTuple):
    noise: torch.Tensor  # [B, C, T, h, w] the flow's noise
    cond: torch.Tensor  # [B, C, T, h, w] for the previous block (scaled by --cond-noise)
    rollout: torch.Tensor | None  # [B, C, T, h, w] for the rollout estimate of the previous block (if asked for)


def noises(batch: Batch, device: torch.device, rollout: bool) -> Noise:
    """The batch's standard normal noise, made on `device` from each sample's seed: the same values for a sample in
    any batch on any rank. Made here rather than in a DataLoader worker, where it was 80 % of a worker's time and
    half of what a batch carries to the GPU."""
    made = [torch.empty(batch.x0.shape, device=device) for _ in range(3 if rollout else 2)]
    for i, seed in enumerate(batch.seed.tolist()):
        draws = torch.Generator(device).manual_seed(seed)
        for tensor in made:
            tensor[i].normal_(generator=draws)
    return Noise(*made, *([] if rollout else [None]))


def collate(samples: list[dict[str, torch.Tensor]]) -> Batch:
    """Stack samples into a Batch; prompts padded to the longest, with a mask."""
    text, mask = padded([sample["text"] for sample in samples])
    stacked = default_collate([{k: v for k, v in sample.items() if k != "text"} for sample in samples])
    return Batch(first=stacked["first_slice"] == 0, text=text, mask=mask, **stacked)


def padded(texts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts' token embeddings [M_i, D] padded to the longest: ([B, M, D], mask [B, M]). default_collate stacks:
    in a worker, straight into shared memory, no copy on the way to the trainer."""
    longest = max(len(text) for text in texts)
    return (default_collate([F.pad(text, (0, 0, 0, longest - len(text))) for text in texts]),
            default_collate([torch.arange(longest) < len(text) for text in texts]))


class ShareSampler(Sampler[int]):
    """Positions for one rank, endlessly: of each global batch of world x batch_size positions, the rank-th share.
    `start` is where the run stands (samples taken so far), so a resumed run continues mid-epoch."""

    def __init__(self, rank: int, world: int, batch_size: int, start: int = 0) -> None:
        self.rank, self.world, self.batch_size, self.start = rank, world, batch_size, start

    def __iter__(self):
        position = self.start + self.rank * self.batch_size
        while True:
            yield from range(position, position + self.batch_size)
            position += self.world * self.batch_size


def block_loader(dataset: BlockDataset, sampler: ShareSampler, workers: int, pin_memory: bool) -> DataLoader:
    """Endless batches of one rank's share, made by `workers` processes (0: in this one)."""
    return DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
