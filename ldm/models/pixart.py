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

Class-conditional use (``text_dim`` None), our extension: semantic="attention" (default, PixArt's own way of
conditioning) feeds the class embedding as one cross-attention token; "adaln" adds it to c instead and the
blocks have no cross-attention. Control metadata (``conditioning.ControlEmbedder``) is added to c before
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
from torch.utils.checkpoint import checkpoint

from .conditioning import ControlEmbedder, resolve_semantic, semantic_condition
from .layers import (
    constructor_config,
    Attention,
    CaptionEmbedder,
    CrossAttention,
    GridPosEmbed,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    unpatchify,
)

__all__ = ["PixArt", "PIXART_SIZES"]

PIXART_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, depth=4, num_heads=4, patch_size=2),
    "small": dict(hidden_size=256, depth=6, num_heads=4, patch_size=2),
    "S/2": dict(hidden_size=384, depth=12, num_heads=6, patch_size=2),
    "B/2": dict(hidden_size=768, depth=12, num_heads=12, patch_size=2),
    "L/2": dict(hidden_size=1024, depth=24, num_heads=16, patch_size=2),
    "XL/2": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2),
}


def _t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Modulation with (B, 1, D) shift/scale, as they come out of the scale-shift table."""
    return x * (1 + scale) + shift


class PixArtBlock(nn.Module):
    """Self-attention, cross-attention (if the model has semantic tokens), MLP; adaLN-single modulation."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, cross: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm=qk_norm) if cross else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(
        self, x: torch.Tensor, t0: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        B = x.shape[0]
        mod = self.scale_shift_table[None] + t0.reshape(B, 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        x = x + gate_msa * self.attn(_t2i_modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, context, mask)
        x = x + gate_mlp * self.mlp(_t2i_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """PixArt's ``T2IFinalLayer``: norm, (shift, scale) = table + c, linear to p*p*C per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + c[:, None]).chunk(2, dim=1)
        return self.linear(_t2i_modulate(self.norm_final(x), shift, scale))


class PixArt(GridPosEmbed, nn.Module):
    """PixArt-α on latents (B, C, H, W): text-conditional (``text_dim``) or class-conditional."""

    arch = "pixart"

    def __init__(
        self,
        *,
        latent_size: int = 32,
        in_channels: int = 4,
        num_classes: int = 1000,
        text_dim: int | None = None,
        semantic: str | None = None,
        null_caption_tokens: int = 1,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        patch_size: int = 2,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = True,
        qk_norm: bool = False,
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
        semantic = resolve_semantic(semantic, "attention", text_dim, "PixArt")
        self.config = constructor_config(PixArt, locals())
        self.latent_size = latent_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.text_dim = text_dim
        self.semantic = semantic
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.gradient_checkpointing = gradient_checkpointing

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = (
            LabelEmbedder(num_classes, hidden_size)
            if text_dim is None
            else CaptionEmbedder(text_dim, hidden_size, null_caption_tokens)
        )
        self.control_embedder = (
            ControlEmbedder(hidden_size, control_mode, control_exponents, control_offsets) if control_mode else None
        )
        cross = semantic == "attention"
        self.blocks = nn.ModuleList(
            PixArtBlock(hidden_size, num_heads, mlp_ratio, qk_norm, cross) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.grid_size = latent_size // patch_size
        self.register_buffer("pos_embed", self._pos_embed_for(self.grid_size, self.grid_size), persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """PixArt's initialisation: xavier linears, N(0, .02) timestep MLP, t_block, caption MLP and label table,
        zero cross-attention output and final linear (a fresh model outputs 0 and ignores its condition)."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        if isinstance(self.y_embedder, LabelEmbedder):
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        else:
            nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
            nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        if self.control_embedder is not None:
            self.control_embedder.initialize()
        for block in self.blocks:
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        control: torch.Tensor | None = None,
        control_keep: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        text_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model contract's forward (see ``ldm.models``)."""
        B = x.shape[0]
        h, grid = self._embed_patches(x)
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t
        c = self.t_embedder(t)
        y, context, mask = semantic_condition(self.y_embedder, self.semantic, class_labels, text, text_mask, text_keep)
        if y is not None:
            c = c + y
        if control is not None:
            if self.control_embedder is None:
                raise ValueError("this PixArt was built without control conditioning (control_mode=None), got control")
            c = c + self.control_embedder(control, t, control_keep)
        t0 = self.t_block(c)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, t0, context, mask, use_reentrant=False)
            else:
                h = block(h, t0, context, mask)
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
