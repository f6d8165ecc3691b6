"""Shared transformer pieces for the latent-diffusion architectures.

Module and parameter names follow facebookresearch/DiT (``fc1``/``fc2``, ``mlp.0``/``mlp.2``, ``embedding_table``)
so that a published DiT state dict maps onto ours by name. Attention layers are in ``ldm.models.attention``.

The 2-D sin-cos positional embedding is a function of ``(grid_size, base_grid_size)``: token ``i`` sits at
coordinate ``i * base / grid``. ``base=None`` (= grid) is plain DiT; evaluating a larger grid with the old
grid as ``base`` keeps the coordinate range the model was trained on and only makes it denser, which is the
paper's positional-embedding resampling for low-to-high resolution transfer ("interpolate"). Evaluating it
with ``base=None`` extends the range to coordinates never seen in training ("extrapolate").
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "CaptionEmbedder",
    "FinalLayer",
    "Mlp",
    "TimestepEmbedder",
    "LabelEmbedder",
    "PatchEmbed",
    "timestep_embedding",
    "sincos_1d",
    "sincos_2d",
    "unpatchify",
    "modulate",
    "masked_mean",
    "xavier_linears",
    "zero_module",
]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of token features x (B, N, D) by per-sample shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def xavier_linears(model: nn.Module) -> None:
    """DiT's base initialisation: every linear xavier-uniform with zero bias (architectures then re-draw
    the few layers they initialise differently, in a fixed order so that a seed gives the same weights)."""

    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    model.apply(init)


def zero_module(module: nn.Module) -> None:
    """Zero a layer's weight and bias (adaLN-Zero regressors, output layers: a fresh block is the identity)."""
    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


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


class Mlp(nn.Module):
    """Two-layer feed-forward block with tanh-approximated GELU (as DiT; PixArt's caption projection too)."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, out_dim or dim)

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

    def initialize(self) -> None:
        """N(0, 0.02) weights, as DiT."""
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)

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

    def initialize(self, std: float = 0.02) -> None:
        """N(0, std) table: 0.02 as DiT (LDM's ClassEmbedder keeps nn.Embedding's 1.0)."""
        nn.init.normal_(self.embedding_table.weight, std=std)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D) tokens in row-major order, by a stride-p convolution.

    The tokens are returned contiguous (token-major). The transposed conv output would otherwise be the
    residual stream's memory layout for the whole network (``x + f(x)`` keeps its first operand's strides), and
    every LayerNorm and Linear on it would copy it first: 3% of a CPU training step (PixArt small, profiled).
    """

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def initialize(self) -> None:
        """Xavier-uniform as the linear map it is (DiT), zero bias."""
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not divisible by patch size {p}")
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map of each token to its p*p*C output patch (DiT, mDT, MM-DiT)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def initialize(self) -> None:
        """adaLN-Zero: regressor and output zero, so a fresh model outputs exactly 0."""
        zero_module(self.adaLN_modulation[-1])
        zero_module(self.linear)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


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


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the token axis of (B, L, D) counting only mask-True positions (None = all).

    A row with no True position averages nothing and returns zeros rather than NaN.
    """
    if mask is None:
        return x.mean(dim=1)
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


class CaptionEmbedder(nn.Module):
    """Caption token states (B, L, text_dim) -> condition tokens (B, L, hidden), with a learned null caption.

    Follows PixArt's ``CaptionEmbedder``: the null caption ``y_embedding`` lives in the text encoder's space
    (before the projection, so it is projected like a real caption) and replaces the caption of rows with
    ``text_keep`` = 0. Dropped rows get an all-True mask, so their output depends on nothing the caption
    carried (PixArt keeps the caption's own mask there, which leaks its length into the unconditional branch).
    ``null_tokens`` is 1 by default (one learned token broadcast over L: the same attention result as L copies)
    or L (PixArt checkpoints store 120 x 4096). ``projection``: "mlp" (PixArt: fc1, tanh-GELU, fc2) or "linear"
    (SD3's ``context_embedder``).
    """

    def __init__(self, text_dim: int, hidden_size: int, null_tokens: int = 1, projection: str = "mlp"):
        super().__init__()
        if projection not in ("mlp", "linear"):
            raise ValueError(f"unknown caption projection {projection!r}; valid: mlp, linear")
        self.text_dim = text_dim
        self.y_embedding = nn.Parameter(torch.randn(null_tokens, text_dim) / text_dim**0.5)
        mlp = projection == "mlp"
        self.y_proj = Mlp(text_dim, hidden_size, hidden_size) if mlp else nn.Linear(text_dim, hidden_size)

    def initialize(self) -> None:
        """PixArt's caption projection init: N(0, 0.02) weights of its MLP."""
        nn.init.normal_(self.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_proj.fc2.weight, std=0.02)

    def with_null(
        self, text: torch.Tensor, text_mask: torch.Tensor | None = None, text_keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Swap in the null caption where ``text_keep`` is 0; returns (states in text space, mask or None)."""
        if text.ndim != 3 or text.shape[-1] != self.text_dim:
            raise ValueError(f"text must be (B, L, {self.text_dim}), got {tuple(text.shape)}")
        B, L, _ = text.shape
        if text_mask is not None and text_mask.shape != (B, L):
            raise ValueError(f"text_mask must be (B, L) = {(B, L)}, got {tuple(text_mask.shape)}")
        if text_keep is None:
            return text, text_mask
        n = self.y_embedding.shape[0]
        if n not in (1, L):
            raise ValueError(f"null caption has {n} tokens; captions have {L} (needs 1 or {L})")
        keep = text_keep.reshape(B).bool()
        null = self.y_embedding.to(text.dtype).expand(L, -1)
        text = torch.where(keep[:, None, None], text, null[None])
        if text_mask is not None:
            text_mask = text_mask | ~keep[:, None]
        return text, text_mask

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor | None = None, text_keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        text, text_mask = self.with_null(text, text_mask, text_keep)
        return self.y_proj(text), text_mask
