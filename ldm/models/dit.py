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
  caption tokens when ``text_dim`` is set) enters through a cross-attention layer in every block, placed as in
  PixArt (after self-attention, no norm, no gate, zero-initialised output), and c no longer depends on it.
  ``semantic="adaln"`` (default) is the reference DiT and is unchanged.
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
    modulate,
    unpatchify,
)

__all__ = ["DiT", "DIT_SIZES"]

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
    """Pre-norm transformer block; adaLN-Zero modulation of both branches from the conditioning c, and with
    ``cross=True`` a cross-attention to the semantic tokens between them (semantic="attention")."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False, cross: bool = False
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm=qk_norm) if cross else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, context, mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map of each token to its p*p*C output patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(GridPosEmbed, nn.Module):
    """DiT on latents (B, C, H, W), class- or (semantic="attention") text-conditional; ``config`` rebuilds it
    via ``model_from_config``."""

    arch = "dit"

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
        semantic = resolve_semantic(semantic, "adaln", text_dim, "DiT")
        # class_dropout_prob / control_dropout_prob are recipe values read by the training loop; kept in the
        # config so a checkpoint records how it was trained.
        self.config = constructor_config(DiT, locals())
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
            DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, cross) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.grid_size = latent_size // patch_size
        self.register_buffer("pos_embed", self._pos_embed_for(self.grid_size, self.grid_size), persistent=False)
        self.initialize_weights()

    # --- init -------------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier-uniform linears with zero bias, patch conv as a linear, N(0, .02) label
        table and timestep MLP, zero adaLN regressors and final linear (adaLN-Zero: identity blocks, 0 output)."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if isinstance(self.y_embedder, LabelEmbedder):
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        else:  # PixArt's caption projection init
            nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
            nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.control_embedder is not None:
            self.control_embedder.initialize()
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross_attn is not None:  # PixArt: a fresh cross-attention adds nothing
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # --- forward ----------------------------------------------------------------------------------------
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
        """The model contract's forward (``ldm.models``): x (B, C, H, W), t (B,) float 0..999, class_labels (B,)
        with num_classes = null, or text (B, L, text_dim) + text_mask/text_keep; control (B, 6) raw pixels or
        None (= dropped), control_keep (B,) 0/1. Returns (B, C or 2C, H, W)."""
        B = x.shape[0]
        h, grid = self._embed_patches(x)
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t
        c = self.t_embedder(t)
        y, context, mask = semantic_condition(self.y_embedder, self.semantic, class_labels, text, text_mask, text_keep)
        if y is not None:
            c = c + y
        if control is not None:
            if self.control_embedder is None:
                raise ValueError("this DiT was built without control conditioning (control_mode=None) but got control")
            c = c + self.control_embedder(control, t, control_keep)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, c, context, mask, use_reentrant=False)
            else:
                h = block(h, c, context, mask)
        h = self.final_layer(h, c)
        return unpatchify(h, grid, self.patch_size, self.out_channels)
