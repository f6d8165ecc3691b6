"""DiT with adaLN-Zero (Peebles & Xie 2023), following facebookresearch/DiT ``models.py``.

Same semantics and initialisation as the reference: c = t_emb + class_emb (+ control_emb here), every block
regresses (shift, scale, gate) x 2 from c with a zero-initialised linear, the final layer is zero too, so a
fresh model outputs exactly 0. Parameter names match the reference, so a published DiT state dict loads
(its ``pos_embed`` entry is not needed: ours is a non-persistent buffer recomputed from the config).

Differences from the reference, on purpose:
- the label table always has the null row, and condition dropout is done by the caller
  (``conditioning.drop_conditions``) so forward is deterministic;
- optional control-metadata embedding (additive or time-scheduled), optional QK-norm;
- the positional embedding takes ``pos_embed_base`` (see ``layers.sincos_2d``) for resolution transfer;
- inputs whose latent size differs from the configured one get an embedding at the same coordinate
  spacing as the configured grid, instead of an error;
- ``semantic="attention"`` (the paper's disentangled semantic path): the class embedding (or the projected
  caption tokens when ``text_dim`` is set) joins the keys of every block's self-attention
  (``layers.SemanticKeys``: its own norm and projections), and c no longer depends on it.
  ``semantic="cross_attention"`` (ablation): a cross-attention layer to those tokens in every block, placed as
  in PixArt (after self-attention, no norm, no gate, zero-initialised output); with one class token it is a
  per-sample bias. ``semantic="adaln"`` (default) is the reference DiT and is unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, CrossAttention, SemanticKeys
from .base import ArchitectureInfo, PatchTransformer
from .layers import FinalLayer, Mlp, modulate, unpatchify, xavier_linears, zero_module

__all__ = ["DiT", "DIT_SIZES", "FinalLayer", "ARCHITECTURE"]

# name -> (hidden, depth, heads, patch); XL/2 at latent 32, 4 channels, 1000 classes, learn_sigma: 675M params
DIT_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, depth=4, num_heads=4, patch_size=2),
    "small": dict(hidden_size=256, depth=6, num_heads=4, patch_size=2),
    "S/2": dict(hidden_size=384, depth=12, num_heads=6, patch_size=2),
    "B/2": dict(hidden_size=768, depth=12, num_heads=12, patch_size=2),
    "L/2": dict(hidden_size=1024, depth=24, num_heads=16, patch_size=2),
    "XL/2": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2),
}


class DiTBlock(nn.Module):
    """Pre-norm transformer block; adaLN-Zero modulation of both branches from the conditioning c. The
    semantic tokens join the self-attention's keys (semantic="attention") or get a cross-attention between
    the branches (semantic="cross_attention"); with "adaln" there are none."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
        semantic: str = "adaln",
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.semantic_keys = SemanticKeys(hidden_size, num_heads, qk_norm=qk_norm) if semantic == "attention" else None
        self.cross_attn = (CrossAttention(hidden_size, num_heads, qk_norm=qk_norm) if semantic == "cross_attention"
                           else None)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        joint = None if self.semantic_keys is None else self.semantic_keys(context)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), joint, mask)
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, context, mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class DiT(PatchTransformer):
    """DiT on latents (B, C, H, W), class- or (a token semantic mode) text-conditional; constructor keywords are
    ``PatchTransformer``'s and ``config`` rebuilds it via ``model_from_config``."""

    arch = "dit"
    name = "DiT"
    default_semantic = "adaln"

    def build_layers(self, depth: int, num_heads: int, mlp_ratio: float, qk_norm: bool, null_caption_tokens: int):
        hidden_size = self.hidden_size
        self.y_embedder = self.make_label_or_caption_embedder(hidden_size, null_caption_tokens)
        self.control_embedder = self.make_control_embedder(hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, self.semantic)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, self.patch_size, self.out_channels)

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier-uniform linears with zero bias, patch conv as a linear, N(0, .02) label
        table and timestep MLP, zero adaLN regressors and final linear (adaLN-Zero: identity blocks, 0 output)."""
        xavier_linears(self)
        self.x_embedder.initialize()
        self.y_embedder.initialize()  # label table N(0, .02); a caption embedder gets PixArt's init
        self.t_embedder.initialize()
        if self.control_embedder is not None:
            self.control_embedder.initialize()
        for block in self.blocks:
            zero_module(block.adaLN_modulation[-1])
            if block.cross_attn is not None:  # PixArt: a fresh cross-attention adds nothing
                zero_module(block.cross_attn.proj)
        self.final_layer.initialize()

    def denoise(self, x, t, c, context, mask) -> torch.Tensor:
        h, grid = self.embed_patches(x)
        for block in self.blocks:
            h = self.run_block(block, h, c, context, mask)
        h = self.final_layer(h, c)
        return unpatchify(h, grid, self.patch_size, self.out_channels)


ARCHITECTURE = ArchitectureInfo(
    name="dit",
    cls=DiT,
    sizes=DIT_SIZES,
    published_size="XL/2",
    published_conditioning={"learn_sigma": True},  # ImageNet labels; DiT predicts the variance
    published_fid=2.27,
    published_fid_source="DiT-XL/2, Peebles & Xie 2023 (512 px: 3.04)",
)
