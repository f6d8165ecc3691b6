"""Shared transformer pieces for the latent-diffusion architectures.

Module and parameter names follow facebookresearch/DiT (``qkv``/``proj``, ``fc1``/``fc2``, ``mlp.0``/``mlp.2``,
``embedding_table``) so that a published DiT state dict maps onto ours by name. Attention goes through
``F.scaled_dot_product_attention`` so that torch picks the fused kernel (flash / memory-efficient on GPU).

The 2-D sin-cos positional embedding is a function of ``(grid_size, base_grid_size)``: token ``i`` sits at
coordinate ``i * base / grid``. ``base=None`` (= grid) is plain DiT; evaluating a larger grid with the old
grid as ``base`` keeps the coordinate range the model was trained on and only makes it denser, which is the
paper's positional-embedding resampling for low-to-high resolution transfer ("interpolate"). Evaluating it
with ``base=None`` extends the range to coordinates never seen in training ("extrapolate").
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Attention",
    "Mlp",
    "TimestepEmbedder",
    "LabelEmbedder",
    "PatchEmbed",
    "timestep_embedding",
    "sincos_1d",
    "sincos_2d",
    "unpatchify",
    "modulate",
]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of token features x (B, N, D) by per-sample shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) scalars, DiT/GLIDE layout ``[cos, sin]``.

    Frequencies are ``exp(-log(max_period) * i / half)``. diffusers' DiT port divides by ``half - 1``
    (``downscale_freq_shift=1``); we keep the original DiT form so original checkpoints behave as trained.
    Computed in float32 whatever the caller's dtype: bf16 arguments of size ~1000 lose the phase.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().reshape(-1, 1) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and optional QK-norm.

    QK-norm (LayerNorm over the head dimension of q and k) bounds the attention logits; it is the usual
    fix for loss spikes in large DiT/mmDiT runs (FIELD-NOTES). Off by default to stay DiT-faithful.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """Two-layer feed-forward block with tanh-approximated GELU (as DiT)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """Scalar timestep -> sinusoidal features (256) -> Linear/SiLU/Linear -> hidden."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector, with a learned null class at index ``num_classes`` for guidance.

    The null row always exists (DiT only adds it when dropout > 0) because sampling with guidance needs it
    whatever the training recipe. Dropping labels is the caller's job (``conditioning.drop_conditions``),
    so the forward pass is a pure function of its inputs and draws no random numbers.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D) tokens in row-major order, by a stride-p convolution."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not divisible by patch size {p}")
        return self.proj(x).flatten(2).transpose(1, 2)


def unpatchify(x: torch.Tensor, grid: tuple[int, int], patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of PatchEmbed's token layout: (B, gh*gw, p*p*C) -> (B, C, gh*p, gw*p)."""
    gh, gw = grid
    p = patch_size
    x = x.reshape(x.shape[0], gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, gh * p, gw * p)


def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos embedding of positions (M,) -> (M, embed_dim), ``[sin, cos]`` layout, float64."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64).reshape(-1, 1) * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(
    embed_dim: int,
    grid_size: int | tuple[int, int],
    base_grid_size: float | tuple[float, float] | None = None,
) -> torch.Tensor:
    """2-D sin-cos positional embedding (gh*gw, embed_dim), float32, tokens in row-major order.

    Token (i, j) sits at coordinates ``(i * base_h / gh, j * base_w / gw)``; ``base=None`` means base = grid
    (integer coordinates, plain DiT). The first half of the channels encodes the column coordinate and
    the second half the row coordinate, as in DiT/MAE. Computed in float64 and rounded once, so a
    2x-denser grid evaluated with the old grid as base equals the old embedding exactly at even indices.
    """
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if base_grid_size is None:
        bh, bw = gh, gw
    elif isinstance(base_grid_size, (int, float)):
        bh = bw = base_grid_size
    else:
        bh, bw = base_grid_size
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    # multiply before dividing: (2k * base) / (2 * base) is exactly k in floating point
    rows = torch.arange(gh, dtype=torch.float64) * float(bh) / gh
    cols = torch.arange(gw, dtype=torch.float64) * float(bw) / gw
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    emb = torch.cat([sincos_1d(embed_dim // 2, cc.reshape(-1)), sincos_1d(embed_dim // 2, rr.reshape(-1))], dim=1)
    return emb.to(torch.float32)
