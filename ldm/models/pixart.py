"""PixArt-α (Chen et al. 2023, arXiv 2310.00426), following PixArt-alpha ``diffusion/model/nets/PixArt.py``.

What makes it PixArt rather than DiT:
- adaLN-single: one global ``t_block`` (SiLU, Linear D -> 6D) maps the conditioning c to all six modulation
  vectors; each block only adds its own learned ``scale_shift_table`` (6, D). The final layer modulates with
  c itself plus its own table (2, D). This removes DiT's per-block adaLN regressors (~27% of DiT-XL's weights).
- self-attention, then cross-attention to the semantic tokens (no norm, no gate), then the MLP;
- captions go through ``y_embedder`` (an MLP from the text encoder's width to the hidden width) and dropped
  captions are replaced by a learned null caption in the text space (``layers.CaptionEmbedder``).

Parameter names follow the reference (``t_block.1``, ``blocks.i.scale_shift_table``, ``cross_attn.q_linear``,
``kv_linear``, ``y_embedder.y_proj.fc1``, ``final_layer.scale_shift_table``), so a PixArt-α checkpoint maps
by name (its ``pos_embed`` is not needed; its ``y_embedder.y_embedding`` of 120 tokens loads with
``null_caption_tokens=120``). ``from_diffusers_state_dict`` maps diffusers' ``PixArtTransformer2DModel``.

semantic="cross_attention" (default) is PixArt's own route; class-conditional use (``text_dim`` None) is our
extension, where it feeds the class embedding as one cross-attention token (a per-sample bias: softmax over
one key). "attention" instead joins the semantic tokens to the self-attention's keys (``layers.SemanticKeys``)
and has no cross-attention; "adaln" adds the class to c and the blocks have no semantic tokens. Control metadata (``conditioning.ControlEmbedder``) is added to c before
``t_block``, where PixArt-α's 1024-px model adds its size/aspect-ratio micro-conditions.

Sizes: XL/2 = 28 blocks, width 1152, 16 heads, patch 2 (reference code ``PixArt_XL_2`` in PixArt-alpha
``diffusion/model/nets/PixArt.py``; the PixArt-α paper gives 0.6B parameters). Our count with T5-XXL captions
(text_dim 4096), 4 latent channels, learn_sigma and the reference's 120 null-caption tokens is 611,347,616
parameters (= diffusers' ``PixArtTransformer2DModel`` of the same config, 610,856,096, plus the 120 x 4096
null caption; tests/test_models_attention.py pins both).
S/2, B/2, L/2 use DiT's width/depth/heads (the reference defines only XL/2).
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, CrossAttention, SemanticKeys
from .base import ArchitectureInfo, PatchTransformer
from .dit import DIT_SIZES
from .layers import Mlp, unpatchify, xavier_linears, zero_module

__all__ = ["PixArt", "PIXART_SIZES", "ARCHITECTURE"]

# the reference defines XL/2 only (DiT-XL/2's shape); the other sizes are DiT's too
PIXART_SIZES: dict[str, dict[str, int]] = {name: dict(preset) for name, preset in DIT_SIZES.items()}


def _t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Modulation with (B, 1, D) shift/scale, as they come out of the scale-shift table."""
    return x * (1 + scale) + shift


class PixArtBlock(nn.Module):
    """Self-attention (joint with the semantic tokens with semantic="attention"), cross-attention (with
    "cross_attention"), MLP; adaLN-single modulation."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, semantic: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.semantic_keys = SemanticKeys(hidden_size, num_heads, qk_norm=qk_norm) if semantic == "attention" else None
        self.cross_attn = (CrossAttention(hidden_size, num_heads, qk_norm=qk_norm) if semantic == "cross_attention"
                           else None)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(
        self, x: torch.Tensor, t0: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        B = x.shape[0]
        mod = self.scale_shift_table[None] + t0.reshape(B, 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        joint = None if self.semantic_keys is None else self.semantic_keys(context)
        x = x + gate_msa * self.attn(_t2i_modulate(self.norm1(x), shift_msa, scale_msa), joint, mask)
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, context, mask)
        x = x + gate_mlp * self.mlp(_t2i_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class T2IFinalLayer(nn.Module):
    """PixArt's final layer: norm, (shift, scale) = table + c, linear to p*p*C per token (no adaLN regressor)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + c[:, None]).chunk(2, dim=1)
        return self.linear(_t2i_modulate(self.norm_final(x), shift, scale))


class PixArt(PatchTransformer):
    """PixArt-α on latents (B, C, H, W): text-conditional (``text_dim``) or class-conditional; constructor
    keywords are ``PatchTransformer``'s."""

    arch = "pixart"
    name = "PixArt"
    default_semantic = "cross_attention"

    def build_layers(self, depth: int, num_heads: int, mlp_ratio: float, qk_norm: bool, null_caption_tokens: int):
        hidden_size = self.hidden_size
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = self.make_label_or_caption_embedder(hidden_size, null_caption_tokens)
        self.control_embedder = self.make_control_embedder(hidden_size)
        self.blocks = nn.ModuleList(PixArtBlock(hidden_size, num_heads, mlp_ratio, qk_norm, self.semantic)
                                    for _ in range(depth))
        self.final_layer = T2IFinalLayer(hidden_size, self.patch_size, self.out_channels)

    def initialize_weights(self) -> None:
        """PixArt's initialisation: xavier linears, N(0, .02) timestep MLP, t_block, caption MLP and label table,
        zero cross-attention output and final linear (a fresh model outputs 0 and ignores its condition)."""
        xavier_linears(self)
        self.x_embedder.initialize()
        self.t_embedder.initialize()
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        self.y_embedder.initialize()
        if self.control_embedder is not None:
            self.control_embedder.initialize()
        for block in self.blocks:
            if block.cross_attn is not None:
                zero_module(block.cross_attn.proj)
        zero_module(self.final_layer.linear)

    def denoise(self, x, t, c, context, mask) -> torch.Tensor:
        h, grid = self.embed_patches(x)
        t0 = self.t_block(c)
        for block in self.blocks:
            h = self.run_block(block, h, t0, context, mask)
        h = self.final_layer(h, c)
        return unpatchify(h, grid, self.patch_size, self.out_channels)

    @staticmethod
    def from_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """diffusers ``PixArtTransformer2DModel`` weights -> ours (text-conditional, no size micro-conditions).

        diffusers has no null caption (its pipelines encode "" instead), so ``y_embedder.y_embedding`` is absent
        from the result: load with ``strict=False`` and keep ours, or train it. Its ``pos_embed`` is recomputed.
        """
        m: dict[str, torch.Tensor] = {}
        simple = {
            "pos_embed.proj": "x_embedder.proj",
            "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
            "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
            "adaln_single.linear": "t_block.1",
            "caption_projection.linear_1": "y_embedder.y_proj.fc1",
            "caption_projection.linear_2": "y_embedder.y_proj.fc2",
            "proj_out": "final_layer.linear",
        }
        for theirs, ours in simple.items():
            for suffix in ("weight", "bias"):
                if f"{theirs}.{suffix}" in sd:
                    m[f"{ours}.{suffix}"] = sd[f"{theirs}.{suffix}"]
        m["final_layer.scale_shift_table"] = sd["scale_shift_table"]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
        for i in range(depth):
            d, b = f"transformer_blocks.{i}.", f"blocks.{i}."
            m[b + "scale_shift_table"] = sd[d + "scale_shift_table"]
            for suffix in ("weight", "bias"):
                m[b + f"attn.qkv.{suffix}"] = torch.cat([sd[d + f"attn1.to_{n}.{suffix}"] for n in "qkv"])
                m[b + f"attn.proj.{suffix}"] = sd[d + f"attn1.to_out.0.{suffix}"]
                m[b + f"cross_attn.q_linear.{suffix}"] = sd[d + f"attn2.to_q.{suffix}"]
                m[b + f"cross_attn.kv_linear.{suffix}"] = torch.cat([sd[d + f"attn2.to_{n}.{suffix}"] for n in "kv"])
                m[b + f"cross_attn.proj.{suffix}"] = sd[d + f"attn2.to_out.0.{suffix}"]
                m[b + f"mlp.fc1.{suffix}"] = sd[d + f"ff.net.0.proj.{suffix}"]
                m[b + f"mlp.fc2.{suffix}"] = sd[d + f"ff.net.2.{suffix}"]
        return m


#: PixArt-α as published: T5-XXL caption states, 4096-d, 120 tokens (PixArt-α paper, sec. 3); learned variance.
ARCHITECTURE = ArchitectureInfo(
    name="pixart",
    cls=PixArt,
    sizes=PIXART_SIZES,
    published_size="XL/2",
    published_conditioning={"learn_sigma": True, "text_dim": 4096, "text_tokens": 120},
)
