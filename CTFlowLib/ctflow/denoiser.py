"""The denoiser: a spatial-temporal DiT (OpenSora-v1 STDiT style) that predicts flow velocity for one block.

Shapes: B batch, C latent channels, T slices per block, H = W latent size, D hidden size,
t/s tokens along slices / within a slice after patching, M text tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache, partial

import torch
import torch.nn.functional as F
from torch import nn

from .config import DenoiserConfig
from .conventions import right_half
from .report import FINDING_CODE_NAMES, SIDE_CODE_SIZE


MIN_TIME = 1e-3  # clean -> velocity divides by t; samplers never evaluate t = 0, this only guards the division


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


@lru_cache(maxsize=16)
def sincos_1d(length: int, dim: int) -> torch.Tensor:
    """[length, dim] fixed sine/cosine position codes."""
    position = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = position * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


@lru_cache(maxsize=16)
def sincos_2d(height: int, width: int, dim: int, columns_first: bool = False) -> torch.Tensor:
    """[height * width, dim]: half the channels code the row, half the column (the released model: columns first)."""
    rows = sincos_1d(height, dim // 2).repeat_interleave(width, dim=0)
    cols = sincos_1d(width, dim // 2).repeat(height, 1)
    return torch.cat([cols, rows] if columns_first else [rows, cols], dim=1)


class TimestepEmbedder(nn.Module):
    """A scalar per sample -> [B, D]: flow time t in [0, 1] (scale 1000), or a slice index (scale 1)."""

    def __init__(self, hidden: int, freq_dim: int = 256, scale: float = 1000.0) -> None:
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = (t.float() * self.scale).unsqueeze(1) * freqs  # [B, half]
        codes = torch.cat([angles.cos(), angles.sin()], dim=1)
        return self.mlp(codes.to(self.mlp[0].weight.dtype))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the middle axis of [N, L, D].

    swap_heads=False reproduces the released CTFlow code, which reshapes [N, heads, L, D/heads] straight to
    [N, L, D] (no transpose); its weights were trained with that layout, so they need it.
    """

    def __init__(self, hidden: int, heads: int, swap_heads: bool = True) -> None:
        super().__init__()
        self.heads, self.swap_heads = heads, swap_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, L, D/heads]
        return self.proj((out.transpose(1, 2) if self.swap_heads else out).reshape(n, length, dim))


class CrossAttention(nn.Module):
    """Image tokens [B, L, D] attend to text tokens [B, M, D]; padded text tokens are masked out."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def keys_values(self, text: torch.Tensor) -> torch.Tensor:
        """[B, M, D] text -> [2, B, heads, M, D/heads]: fixed for a whole block, so computed once per block."""
        b, length, dim = text.shape
        return self.kv(text).view(b, length, 2, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)

    def forward(self, x: torch.Tensor, text_kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q = self.q(x).view(b, length, self.heads, dim // self.heads).transpose(1, 2)
        k, v = text_kv
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(b, length, dim))


class Mlp(nn.Sequential):
    def __init__(self, hidden: int, ratio: float, out: int | None = None) -> None:
        inner = int(hidden * ratio)
        super().__init__(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, out or hidden))


class STDiTLayer(nn.Module):
    """One transformer layer: spatial attention (within a slice), temporal attention (across slices), cross-attention
    to text, MLP. ("Block" in ctflow means the slices generated together; OpenSora calls this an STDiT block.)

    adaLN-single: the layer's shift/scale/gate come from one shared timestep projection plus a
    learned per-layer table. released=True: the published CTFlow layer (no LayerNorm before the temporal and
    cross-attention, attention heads merged without a transpose).
    """

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, released: bool = False) -> None:
        super().__init__()
        norm = nn.Identity if released else partial(nn.LayerNorm, hidden, elementwise_affine=False, eps=1e-6)
        self.norm_spatial = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.spatial = SelfAttention(hidden, heads, swap_heads=not released)
        self.norm_temporal = norm()
        self.temporal = SelfAttention(hidden, heads, swap_heads=not released)
        self.norm_cross = norm()
        self.cross = CrossAttention(hidden, heads)
        self.norm_mlp = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, mlp_ratio)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden) / hidden**0.5)

    def forward(
        self, x: torch.Tensor, time_modulation: torch.Tensor, text_kv: torch.Tensor, mask: torch.Tensor,
        temporal_code: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x: [B, t, s, D]; time_modulation: [B, 6, D], the shared adaLN shift/scale/gate of attention and MLP from the
        # flow time; text_kv: [2, B, heads, M, D/heads]; mask: [B, M];
        # temporal_code: [t, D] added to the temporal attention's input only (the released model's layer 0)
        b, nt, ns, dim = x.shape
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (
            self.scale_shift_table + time_modulation).unsqueeze(2).unbind(1)
        # each: [B, 1, D], broadcast over tokens below
        h = modulate(self.norm_spatial(x.view(b, nt * ns, dim)), shift_a, scale_a)
        h = self.spatial(h.view(b * nt, ns, dim)).view(b, nt * ns, dim)
        x = x + (gate_a * h).view(b, nt, ns, dim)
        h = self.norm_temporal(x) if temporal_code is None else self.norm_temporal(x) + temporal_code[:, None]
        h = h.transpose(1, 2).reshape(b * ns, nt, dim)
        h = self.temporal(h).view(b, ns, nt, dim).transpose(1, 2)
        x = x + (gate_a.unsqueeze(1) * h)
        flat = x.reshape(b, nt * ns, dim)
        flat = flat + self.cross(self.norm_cross(flat), text_kv, mask)
        flat = flat + gate_m * self.mlp(modulate(self.norm_mlp(flat), shift_m, scale_m))
        return flat.view(b, nt, ns, dim)


@dataclass
class Conditioning:
    """What stays fixed while one block is sampled: computed once per block, not once per step."""

    previous: torch.Tensor  # [B, t, s, D] patch embedding of the previous clean block
    text_kv: list[torch.Tensor]  # per STDiT layer: [2, B, heads, M, D/heads] cross-attention keys and values
    mask: torch.Tensor  # [B, M] bool
    vector: torch.Tensor | None = None  # [B, D] added to the time embedding: slice position, pooled text, a report code


class STDiT(nn.Module):
    """Predicts the velocity (noise - clean) of a noisy latent block given time, previous block and text.

    With config.prediction == "clean" the last layer outputs the clean block and forward() turns it into
    velocity, (z_t - clean) / t, so the sampler and pipeline never need to know which one was trained.
    """

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        self.config = config
        c, d = config.latent_channels, config.hidden_size
        # Channel concatenation of [noisy, previous] then a patch conv == the sum of two patch convs;
        # split so the previous block's half is computed once per block.
        self.x_embed = nn.Conv3d(c, d, kernel_size=config.patch_size, stride=config.patch_size)
        self.previous_embed = nn.Conv3d(c, d, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.seam_embed = (nn.Conv3d(c, d, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
                           if config.seam_context else None)
        self.released = config.variant == "released"
        self.t_embed = TimestepEmbedder(d, scale=1.0 if self.released else 1000.0)
        self.position_embed = TimestepEmbedder(d, scale=1.0) if config.slice_position else None
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.text_embed = Mlp(config.text_dim, d / config.text_dim, out=d)
        self.text_vector = Mlp(config.text_dim, d / config.text_dim, out=d) if config.pooled_text else None
        self.side_embed = nn.Linear(SIDE_CODE_SIZE, d) if config.side_code else None
        self.finding_embed = nn.Linear(len(FINDING_CODE_NAMES), d) if config.finding_code else None
        self.side_map_embed = nn.Linear(SIDE_CODE_SIZE // 2, d) if config.side_map else None  # one half's findings
        self.finding_map_embed = (nn.Linear(len(FINDING_CODE_NAMES), math.prod(config.patch_grid) * d, bias=False)
                                  if config.finding_map else None)  # each finding's place: a D-vector per patch
        # The transformer layers. "blocks" (and t_block) are weight names in every shipped model.safetensors: keep them.
        self.blocks = nn.ModuleList(STDiTLayer(d, config.num_heads, config.mlp_ratio, self.released)
                                    for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_table = nn.Parameter(torch.randn(2, d) / d**0.5)
        self.final = nn.Linear(d, math.prod(config.patch_size) * c)
        self.initialize()

    def initialize(self) -> None:
        """DiT-style: Xavier linears, zero output layer and zero timestep modulation, so training starts stable."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for conv in (self.x_embed, self.previous_embed):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        if self.position_embed is not None:  # starts as a no-op, so a run can warm-start from a model without it
            nn.init.normal_(self.position_embed.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.position_embed.mlp[2].weight)
        if self.text_vector is not None:  # likewise
            nn.init.zeros_(self.text_vector[-1].weight)
            nn.init.zeros_(self.text_vector[-1].bias)
        if self.seam_embed is not None:  # likewise
            nn.init.zeros_(self.seam_embed.weight)
        if self.side_embed is not None:  # likewise
            nn.init.zeros_(self.side_embed.weight)
        if self.side_map_embed is not None:  # likewise
            nn.init.zeros_(self.side_map_embed.weight)
        if self.finding_embed is not None:  # likewise
            nn.init.zeros_(self.finding_embed.weight)
        if self.finding_map_embed is not None:  # likewise
            nn.init.zeros_(self.finding_map_embed.weight)
        for layer in (self.t_block[1], self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for layer in self.blocks:
            nn.init.zeros_(layer.cross.proj.weight)

    def report_readers(self) -> set[str]:
        """Names of the weights that turn the report into conditioning: the text embedders, any report-code embedder
        and every layer's cross-attention: what an export may take whole from another model of the same lineage
        (ctflow-train export --text-from), keeping that model's reading of the words over the run's."""
        readers = [self.text_embed, self.text_vector, self.side_embed, self.finding_embed, self.side_map_embed,
                   self.finding_map_embed, *(layer.cross for layer in self.blocks)]
        chosen = {id(module) for module in readers if module is not None}
        return {f"{prefix}.{name}" for prefix, module in self.named_modules() if id(module) in chosen
                for name, _ in module.named_parameters()}

    def _patch_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [B, D, t, h, w] -> [B, t, s, D] with fixed spatial and temporal position codes added
        b, d, nt, nh, nw = tokens.shape
        x = tokens.flatten(3).permute(0, 2, 3, 1)
        spatial = sincos_2d(nh, nw, d, columns_first=self.released).to(x)
        if self.released:  # the temporal code goes into layer 0's temporal attention instead
            return x + spatial[None, None]
        return x + spatial[None, None] + sincos_1d(nt, d).to(x)[None, :, None]

    def prepare(
        self, previous: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, first_slice: torch.Tensor | None = None,
        code: torch.Tensor | None = None,
    ) -> Conditioning:
        """previous: [B, C, T, H, W] clean block; text: [B, M, text_dim]; mask: [B, M];
        first_slice: [B] index in the volume of the new block's first slice (needed by slice_position models);
        code: [B, config.code_size] each row's report.denoiser_code (needed by side_code, side_map, finding_code
        and finding_map models)."""
        dtype = self.x_embed.weight.dtype
        prev_tokens = self.previous_embed(previous.to(dtype)).flatten(3).permute(0, 2, 3, 1)  # [B, t, s, D]
        if self.seam_embed is not None:  # the previous block's last patch of slices joins the new block's first
            last = previous[:, :, -self.config.patch_size[0]:].to(dtype)  # [B, C, pt, H, W]
            seam = self.seam_embed(last).flatten(3).permute(0, 2, 3, 1)  # [B, 1, s, D]
            prev_tokens = torch.cat([prev_tokens[:, :1] + seam, prev_tokens[:, 1:]], dim=1)
        if self.config.reads_code and code is None:
            raise ValueError("this denoiser is conditioned on a code of the report: pass code")
        if self.side_map_embed is not None:
            prev_tokens = prev_tokens + self._side_map(code.to(previous.device, dtype))  # [B, 1, s, D]
        if self.finding_map_embed is not None:  # the same for every slice of the block
            placed = self.finding_map_embed(code.to(previous.device, dtype))  # [B, s*D]
            prev_tokens = prev_tokens + placed.view(len(code), 1, prev_tokens.shape[2], -1)  # [B, 1, s, D]
        vectors = []
        if self.position_embed is not None:
            if first_slice is None:
                raise ValueError("this denoiser is conditioned on slice position: pass the block's first_slice")
            vectors.append(self.position_embed(first_slice.to(previous.device).expand(len(previous))))  # [B, D]
        if self.text_vector is not None:
            weights = mask.to(dtype).unsqueeze(-1)  # [B, M, 1]
            pooled = (text.to(dtype) * weights).sum(1) / weights.sum(1).clamp(min=1)  # [B, text_dim] mean token
            vectors.append(self.text_vector(pooled))  # [B, D]
        if self.side_embed is not None:
            vectors.append(self.side_embed(code.to(previous.device, dtype)))  # [B, D]
        if self.finding_embed is not None:
            vectors.append(self.finding_embed(code.to(previous.device, dtype)))  # [B, D]
        tokens = self.text_embed(text.to(dtype))  # [B, M, D]
        return Conditioning(prev_tokens, [layer.cross.keys_values(tokens) for layer in self.blocks], mask.bool(),
                            sum(vectors) if vectors else None)

    def _side_map(self, code: torch.Tensor) -> torch.Tensor:
        """code: [B, SIDE_CODE_SIZE] report.half_code -> [B, 1, s, D]: each patch gets its half's findings embedded
        (a middle column the mean of both halves'), the same for every slice of the block."""
        halves = self.side_map_embed(code.view(len(code), -1, 2).transpose(1, 2))  # [B, 2, D]: right, left
        rows, columns = self.config.patch_grid
        right = torch.as_tensor(right_half(columns)).to(halves).view(1, columns, 1)  # [1, w, 1]
        per_column = right * halves[:, :1] + (1 - right) * halves[:, 1:]  # [B, w, D]
        return per_column.unsqueeze(1).expand(-1, rows, -1, -1).reshape(len(code), 1, rows * columns, -1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x: [B, C, T, H, W] noisy block at flow time t: [B] -> velocity [B, C, T, H, W]."""
        out = self.predict(x, t, cond)
        if self.config.prediction == "velocity":
            return out
        return (x.float() - out) / t.float().clamp(min=MIN_TIME).view(-1, 1, 1, 1, 1)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """What the last layer predicts, velocity or clean block (config.prediction): the training target."""
        b, c, nt, nh, nw = x.shape
        pt, ph, pw = self.config.patch_size
        h = self._patch_positions(self.x_embed(x.to(self.x_embed.weight.dtype))) + cond.previous  # [B, t, s, D]
        t_emb = self.t_embed(t)  # [B, D]
        if cond.vector is not None:
            t_emb = t_emb + cond.vector
        time_modulation = self.t_block(t_emb).view(b, 6, -1)  # [B, 6, D]: adaLN-single, shared by every layer
        temporal_code = sincos_1d(nt // pt, h.shape[-1]).to(h) if self.released else None
        for index, (layer, text_kv) in enumerate(zip(self.blocks, cond.text_kv)):
            h = layer(h, time_modulation, text_kv, cond.mask, temporal_code if index == 0 else None)
        shift, scale = (self.final_table[None] + t_emb[:, None]).unsqueeze(2).unbind(1)  # [B, 1, D] each
        h = self.final(modulate(self.final_norm(h.flatten(1, 2)), shift, scale))  # [B, t*s, pt*ph*pw*C]
        h = h.view(b, nt // pt, nh // ph, nw // pw, pt, ph, pw, c)
        return h.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, c, nt, nh, nw).float()


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
