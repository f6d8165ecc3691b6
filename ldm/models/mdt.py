"""mDT-v2: Masked Diffusion Transformer v2 (Gao et al. 2023, arXiv 2303.14389), after sail-sg/MDT ``models.py``.

Structure of the reference ``MDTv2`` (kept): DiT adaLN-Zero blocks in three groups,

- ``en_inblocks`` (``(depth - decode_layers) // 2``) and ``en_outblocks`` (same count) form the encoder,
  U-ViT style: every out-block first fuses the output of its mirrored in-block with ``skip_linear`` over
  the concatenation (the v2 "long shortcuts");
- ``de_blocks`` (``decode_layers``) form the decoder; each fuses the *full* embedded input (before any
  masking, v2's "dense input shortcuts") through its own ``skip_linear``;
- one side-interpolator block (``sideblocks``): during masked training the encoder sees only the kept
  tokens; the side block runs on the full grid with a learned ``mask_token`` in the dropped places and its
  output replaces only those places (kept tokens pass through unchanged).

Every self-attention adds a learned BEiT relative-position bias (one table per block), and the encoder and
decoder each add their own learnable positional embedding initialised to 2-D sin-cos. Here the learnable
embedding is written as ``sincos(pos_embed_base) + delta`` with a zero-initialised ``delta`` parameter:
the same function class and the same initial value as the reference, but the sin-cos part can be
re-evaluated for resolution transfer like DiT's (``set_pos_embed_base``), and the learned tables
(``pos_delta``, ``decoder_pos_delta``, every ``rel_pos_bias.table``) are resampled on the coordinates the
new grid maps to in the old one (``adapt_low_res_state``, called by ``transfer.transfer_state``; bicubic,
clamped at the border, exact wherever a new token lands on an old one).

Masked training contract (the objective is written against this): ``config["mask_ratio"]`` (default 0.3,
MDT's) and ``config["mask_ratio_jitter"]`` (default 0.2: MDT draws the batch's ratio uniformly in
``[mask_ratio, mask_ratio + 0.2]``). ``forward(..., mask_generator=g)`` with ``mask_ratio > 0`` keeps
``int(N * (1 - ratio))`` random tokens per sample, drawn from ``g`` only (never the global RNG);
without a generator the full sequence is used (sampling). MDT trains with ``loss_full + loss_masked``:
the objective adds a second pass with ``mask_generator=generator`` whenever
``model.masks_tokens`` (``mask_ratio > 0``), both losses over all output tokens (as ``train_util.py``).

Differences from the reference, on purpose: null class row always present and dropout done by the caller;
optional control metadata (``conditioning.ControlEmbedder`` added to c), QK-norm, text conditioning, and
``semantic="attention"`` (class embedding or projected caption joining every block's self-attention keys, no
position bias on them; adaLN then sees only time + control) or ``"cross_attention"`` (as cross-attention
context, the ablation); the 3 unused BEiT class-token rows of each relative-position table
are dropped (3 x heads params per block); inputs must have the configured grid (the learned tables are
grid-shaped).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, CrossAttention, SemanticKeys, joint_keys
from .base import ArchitectureInfo, DiffusionModel
from .conditioning import SEMANTIC_MODES
from .layers import (CaptionEmbedder, FinalLayer, LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder, modulate, sincos_2d,
                     unpatchify, xavier_linears, zero_module)

__all__ = ["MDT", "MDT_SIZES", "SEMANTIC_MODES", "resample_grid_table", "ARCHITECTURE"]

# decode_layers: 6 for S/2 and 4 for XL/2 as in sail-sg/MDT run.sh / README; B/2 (6) and L/2 (4) assumed.
MDT_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, depth=4, num_heads=4, patch_size=2, decode_layers=2),
    "small": dict(hidden_size=256, depth=8, num_heads=4, patch_size=2, decode_layers=2),
    "S/2": dict(hidden_size=384, depth=12, num_heads=6, patch_size=2, decode_layers=6),
    "B/2": dict(hidden_size=768, depth=12, num_heads=12, patch_size=2, decode_layers=6),
    "L/2": dict(hidden_size=1024, depth=24, num_heads=16, patch_size=2, decode_layers=4),
    "XL/2": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2, decode_layers=4),
}


def resample_grid_table(table: torch.Tensor, coords_h: torch.Tensor, coords_w: torch.Tensor) -> torch.Tensor:
    """Sample a learned table (H, W, C) at fractional indices (rows ``coords_h``, cols ``coords_w``).

    Bicubic, clamped to the table's border (offsets beyond the trained range take the edge value). With
    integer indices it returns the stored entries (up to float rounding), so a transfer that lands on old
    positions changes nothing there.
    """
    H, W, _ = table.shape
    src = table.permute(2, 0, 1).unsqueeze(0).float()
    gy = coords_h.double().clamp(0, H - 1) * 2 / max(H - 1, 1) - 1
    gx = coords_w.double().clamp(0, W - 1) * 2 / max(W - 1, 1) - 1
    yy, xx = torch.meshgrid(gy, gx, indexing="ij")
    grid = torch.stack([xx, yy], dim=-1).unsqueeze(0).float()
    out = F.grid_sample(src, grid, mode="bicubic", padding_mode="border", align_corners=True)
    return out[0].permute(1, 2, 0).to(table.dtype)


class RelativePositionBias(nn.Module):
    """BEiT relative-position bias: a learned (2g-1)^2 x heads table indexed by the (dy, dx) token offset."""

    def __init__(self, grid: int, num_heads: int):
        super().__init__()
        self.grid = grid
        self.table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
        rel = coords[:, :, None] - coords[:, None, :] + (grid - 1)  # (2, N, N) offsets shifted to >= 0
        self.register_buffer("index", rel[0] * (2 * grid - 1) + rel[1], persistent=False)

    def forward(self) -> torch.Tensor:
        """(heads, N, N) bias."""
        N = self.grid * self.grid
        return self.table[self.index.reshape(-1)].reshape(N, N, -1).permute(2, 0, 1)


class SelfAttention(Attention):
    """Multi-head self-attention with an additive relative-position bias (restricted to kept tokens)."""

    def __init__(self, dim: int, num_heads: int, grid: int, qk_norm: bool = False):
        super().__init__(dim, num_heads, qkv_bias=True, qk_norm=bool(qk_norm))  # any qk_norm is LayerNorm here
        self.rel_pos_bias = RelativePositionBias(grid, num_heads)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None,
                semantic_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                semantic_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention of the kept tokens; with ``semantic_kv`` a joint attention whose semantic keys get
        no position bias (``layers.joint_keys``)."""
        B, N, D = x.shape
        q, k, v = self.qkv_heads(x)
        bias = self.rel_pos_bias().unsqueeze(0)  # (1, H, Nfull, Nfull)
        if ids_keep is not None:
            H, Nf = bias.shape[1], bias.shape[-1]
            rows = ids_keep[:, None, :, None].expand(B, H, N, Nf)
            bias = torch.gather(bias.expand(B, H, Nf, Nf), 2, rows)
            bias = torch.gather(bias, 3, ids_keep[:, None, None, :].expand(B, H, N, N))
        k, v, mask = joint_keys(k, v, semantic_kv, semantic_mask, bias.to(q.dtype))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class MDTBlock(nn.Module):
    """DiT adaLN-Zero block with relative-position self-attention, optional skip fusion, and the semantic tokens
    joining the self-attention's keys (semantic="attention") or in a cross-attention ("cross_attention")."""

    def __init__(
        self, hidden_size: int, num_heads: int, grid: int, mlp_ratio: float, qk_norm: bool, skip: bool, semantic: str
    ):
        super().__init__()
        self.skip_linear = nn.Linear(2 * hidden_size, hidden_size) if skip else None
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, grid, qk_norm)
        self.semantic_keys = (SemanticKeys(hidden_size, num_heads, qk_norm=bool(qk_norm)) if semantic == "attention"
                              else None)
        if semantic == "cross_attention":
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm)
        else:
            self.cross_attn = None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        skip: torch.Tensor | None = None,
        ids_keep: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        joint = None if self.semantic_keys is None else self.semantic_keys(context)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), ids_keep, joint,
                                                  context_mask)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class MDT(DiffusionModel):
    """MDTv2 on latents (B, C, H, W), class- or text-conditional; ``config`` rebuilds it."""

    arch = "mdt"
    name = "MDT"
    default_semantic = "adaln"
    text_needs_attention = False  # adaLN gets the masked mean of the projected caption
    has_pos_embed = True

    def __init__(
        self,
        *,
        latent_size: int = 32,
        in_channels: int = 4,
        num_classes: int = 1000,
        text_dim: int | None = None,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        patch_size: int = 2,
        decode_layers: int = 4,
        mlp_ratio: float = 4.0,
        mask_ratio: float = 0.3,
        mask_ratio_jitter: float = 0.2,
        learn_sigma: bool = True,
        qk_norm: bool = False,
        semantic: str | None = None,
        class_dropout_prob: float = 0.1,
        control_mode: str | None = None,
        control_exponents: dict[str, float] | None = None,
        control_offsets: dict[str, float] | None = None,
        control_dropout_prob: float = 0.1,
        pos_embed_base: float | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if latent_size % patch_size:
            raise ValueError(f"latent_size {latent_size} is not divisible by patch_size {patch_size}")
        self.setup(MDT, locals())
        if not 0 <= decode_layers <= depth or (depth - decode_layers) % 2:
            raise ValueError(f"depth - decode_layers must be even and >= 0, got {depth} - {decode_layers}")
        if mask_ratio < 0 or mask_ratio_jitter < 0 or mask_ratio + mask_ratio_jitter >= 1.0:
            raise ValueError(f"need 0 <= mask_ratio, jitter and mask_ratio + jitter < 1, got {mask_ratio}, {mask_ratio_jitter}")
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.grid_size = g = latent_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if text_dim is None:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        else:
            self.text_embedder = CaptionEmbedder(text_dim, hidden_size)  # PixArt's projection + learned null caption
        self.control_embedder = self.make_control_embedder(hidden_size)
        half = (depth - decode_layers) // 2

        def block(skip: bool) -> MDTBlock:
            return MDTBlock(hidden_size, num_heads, g, mlp_ratio, qk_norm, skip, self.semantic)

        self.en_inblocks = nn.ModuleList(block(False) for _ in range(half))
        self.en_outblocks = nn.ModuleList(block(True) for _ in range(half))
        self.de_blocks = nn.ModuleList(block(True) for _ in range(decode_layers))
        self.sideblocks = nn.ModuleList([block(False)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_delta = nn.Parameter(torch.zeros(1, g * g, hidden_size))
        self.decoder_pos_delta = nn.Parameter(torch.zeros(1, g * g, hidden_size))
        self.register_buffer("pos_sincos", self._sincos(), persistent=False)
        self.initialize_weights()

    # --- positional embedding -------------------------------------------------------------------------
    def _range(self) -> float:
        base = self.config["pos_embed_base"]
        return float(self.grid_size if base is None else base)

    def _sincos(self) -> torch.Tensor:
        base = self.config["pos_embed_base"]
        return sincos_2d(self.hidden_size, self.grid_size, None if base is None else float(base)).unsqueeze(0)

    def set_pos_embed_base(self, base: float | None) -> None:
        """Re-evaluate the sin-cos part of both positional embeddings over a new coordinate range."""
        self.config["pos_embed_base"] = base
        self.pos_sincos = self._sincos().to(self.pos_sincos.device)

    def adapt_low_res_state(self, state: dict[str, torch.Tensor], low_config: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Resample the grid-shaped learned tables of a low-res state onto this model's grid.

        Call after ``set_pos_embed_base``: new token j sits at old-grid index ``j * spacing_new / spacing_old``
        (spacing = range / grid), for absolute positions and for relative offsets alike.
        """
        g_low = low_config["latent_size"] // low_config["patch_size"]
        g = self.grid_size
        low_base = low_config.get("pos_embed_base")
        ratio = (self._range() / g) / (float(g_low if low_base is None else low_base) / g_low)
        if g_low == g and ratio == 1.0:
            return dict(state)
        out = dict(state)
        for name, tensor in state.items():
            if name.endswith("pos_delta"):
                idx = torch.arange(g, dtype=torch.float64) * ratio
                table = resample_grid_table(tensor[0].reshape(g_low, g_low, -1), idx, idx)
                out[name] = table.reshape(1, g * g, -1)
            elif name.endswith("rel_pos_bias.table"):
                idx = torch.arange(-(g - 1), g, dtype=torch.float64) * ratio + (g_low - 1)
                table = resample_grid_table(tensor.reshape(2 * g_low - 1, 2 * g_low - 1, -1), idx, idx)
                out[name] = table.reshape((2 * g - 1) ** 2, -1)
        return out

    # --- init -------------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """MDT/DiT init: xavier linears, zero adaLN regressors and output; N(0, .02) label table, timestep MLP,
        mask token and relative-position tables (trunc-normal in the reference); cross-attention output
        projections zero (PixArt) so every block starts as the identity."""
        xavier_linears(self)
        self.x_embedder.initialize()
        if self.text_dim is None:
            self.y_embedder.initialize()
        self.t_embedder.initialize()
        if self.control_embedder is not None:
            self.control_embedder.initialize()
        for block in self.all_blocks():
            zero_module(block.adaLN_modulation[-1])
            nn.init.trunc_normal_(block.attn.rel_pos_bias.table, std=0.02)
            if block.cross_attn is not None:
                zero_module(block.cross_attn.proj)
        self.final_layer.initialize()
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.zeros_(self.pos_delta)
        nn.init.zeros_(self.decoder_pos_delta)

    def all_blocks(self) -> list[MDTBlock]:
        return [*self.en_inblocks, *self.en_outblocks, *self.de_blocks, *self.sideblocks]

    # --- masking ----------------------------------------------------------------------------------------
    @property
    def masks_tokens(self) -> bool:
        """Training adds MDT's masked pass (``mask_ratio > 0``)."""
        return self.config["mask_ratio"] > 0

    def draw_mask(self, B: int, N: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids_keep (B, K), mask (B, N) with 1 = dropped) from ``generator`` only: one ratio per batch in
        [mask_ratio, mask_ratio + jitter], then per-sample random order (MDT's ``random_masking``)."""
        gdev = generator.device
        ratio = self.config["mask_ratio"] + self.config["mask_ratio_jitter"] * torch.rand(
            1, generator=generator, device=gdev
        ).item()
        keep = int(N * (1 - ratio))
        noise = torch.rand(B, N, generator=generator, device=gdev).to(device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        mask = torch.ones(B, N, device=device)
        mask.scatter_(1, ids_keep, 0.0)
        return ids_keep, mask

    # --- forward ----------------------------------------------------------------------------------------
    @property
    def semantic_embedder(self) -> nn.Module:
        return self.y_embedder if self.text_dim is None else self.text_embedder

    def denoise(self, x, t, c, context, context_mask, mask_generator: torch.Generator | None = None) -> torch.Tensor:
        """``mask_generator`` turns on MDT's masked pass (see the module docstring)."""
        B = x.shape[0]
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        if (gh, gw) != (self.grid_size, self.grid_size):
            raise ValueError(f"MDT built for a {self.grid_size}x{self.grid_size} token grid, got {gh}x{gw}")
        sincos = self.pos_sincos.to(device=x.device, dtype=x.dtype)
        h = self.x_embedder(x) + sincos + self.pos_delta
        input_skip = h
        ids_keep = mask = None
        if mask_generator is not None and self.masks_tokens:
            ids_keep, mask = self.draw_mask(B, h.shape[1], mask_generator, x.device)
            h = torch.gather(h, 1, ids_keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]))

        skips = []
        for block in self.en_inblocks:
            h = self.run_block(block, h, c, None, ids_keep, context, context_mask)
            skips.append(h)
        for block in self.en_outblocks:
            h = self.run_block(block, h, c, skips.pop(), ids_keep, context, context_mask)

        decoder_pos = sincos + self.decoder_pos_delta
        if ids_keep is not None:
            # side-interpolator: mask tokens in the dropped places, one block over the full grid, and its
            # output is used only where tokens were dropped
            full = self.mask_token.to(h.dtype).expand(B, input_skip.shape[1], -1).clone()
            full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]), h) + decoder_pos
            side = full
            for block in self.sideblocks:
                side = self.run_block(block, side, c, None, None, context, context_mask)
            m = mask.to(h.dtype).unsqueeze(-1)
            h = side * m + full * (1 - m)
        else:
            h = h + decoder_pos
        for block in self.de_blocks:
            h = self.run_block(block, h, c, input_skip, None, context, context_mask)
        h = self.final_layer(h, c)
        return unpatchify(h, (gh, gw), self.patch_size, self.out_channels)


ARCHITECTURE = ArchitectureInfo(
    name="mdt",
    cls=MDT,
    sizes=MDT_SIZES,
    published_size="XL/2",
    published_conditioning={"learn_sigma": True},  # ImageNet labels; MDT predicts the variance (as DiT)
    published_fid=1.58,
    published_fid_source="MDTv2-XL/2, Gao et al. 2023",
)
