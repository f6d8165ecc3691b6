"""MM-DiT (Esser et al. 2024, "Scaling Rectified Flow Transformers", arXiv 2403.03206), SD3's backbone.

Follows Stability's reference ``mmdit.py`` (sd3-ref): two token streams, image (``x_block``) and context
(``context_block``), each with its own weights (norms, qkv, output projection, MLP, adaLN regressor), meeting in
one joint attention over the concatenated tokens. Both streams are modulated adaLN-Zero style from
c = t_emb + pooled-condition embedding (+ control here). The last block is ``pre_only`` on the context side: its
context tokens only supply keys/values, so that side has no output projection, no MLP and (shift, scale) only.
Optional QK-norm is RMSNorm with a learned scale (SD3/SD3.5's choice). Parameter names follow the reference
(``joint_blocks.i.x_block.attn.qkv``, ``adaLN_modulation.1``, ``y_embedder.mlp.0``, ``context_embedder``...);
``from_diffusers_state_dict`` maps diffusers' ``SD3Transformer2DModel`` (which swaps the final (shift, scale)).

Conditioning, ours where SD3 has none:
- text (``text_dim`` set): context tokens = caption states through a linear ``context_embedder`` (SD3), dropped
  captions -> learned null caption (``layers.CaptionEmbedder``). SD3's pooled vector is CLIP's pooled output;
  we have no second encoder, so the pooled vector is the masked mean of the caption states (our choice),
  mapped by ``y_embedder`` (Linear, SiLU, Linear as SD3's) and added to c when semantic="adaln" (SD3's own,
  the default). semantic="attention" drops it: the caption enters only through joint attention.
- class (``text_dim`` None): the class embedding is the single context token; with semantic="adaln" it is also
  added to c (SD3-like), with "attention" c = t_emb (+ control) only.
- control metadata (``conditioning.ControlEmbedder``) is added to c.

Sizes. SD3 ties width to depth d: hidden = 64 d, heads = d (SD3 paper, model-scaling experiments); "d18" is that
rule at d = 18 (1152 wide, diffusers' default config; 858M parameters with 4096-d captions), "d24" is
SD3-medium's 24 x 1536 (2.03B here, the SD3 paper's "2B"). The paper we reproduce names its
baseline "mmDiT-XL/2" without giving its shape in public text: we take DiT-XL/2's shape (28 blocks, 1152 wide,
16 heads, patch 2; assumed), which with 4 latent channels and learn_sigma, class-conditional on 1000 classes,
has 1,326,915,104 parameters (pinned in tests/test_models_attention.py): about twice DiT-XL/2 (675M), since
every block carries two streams.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .base import ArchitectureInfo, PatchTransformer
from .dit import DIT_SIZES
from .layers import (CaptionEmbedder, FinalLayer, LabelEmbedder, Mlp, masked_mean, modulate, unpatchify, xavier_linears,
                     zero_module)

__all__ = ["MMDiT", "MMDIT_SIZES", "ARCHITECTURE"]

# DiT's shapes (the paper's "mmDiT-XL/2" is DiT-XL/2's shape, see above) and the SD3 rule hidden = 64 d, heads = d
MMDIT_SIZES: dict[str, dict[str, int]] = {
    **{name: dict(preset) for name, preset in DIT_SIZES.items()},
    "small": dict(hidden_size=384, depth=6, num_heads=6, patch_size=2),  # SD3 rule at d = 6
    "d18": dict(hidden_size=1152, depth=18, num_heads=18, patch_size=2),
    "d24": dict(hidden_size=1536, depth=24, num_heads=24, patch_size=2),
}


class VectorEmbedder(nn.Module):
    """SD3's pooled-vector embedder: Linear, SiLU, Linear."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def initialize(self) -> None:
        """N(0, 0.02) weights, as DiT's timestep MLP."""
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.mlp(v)


class DismantledBlock(nn.Module):
    """One stream of a joint block: adaLN-Zero modulated pre-attention (qkv) and post-attention (proj, MLP)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm="rms" if qk_norm else False,
                              proj=not pre_only)
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (2 if pre_only else 6) * hidden_size))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """-> ((q, k, v), what post_attention needs or None for a pre_only block)."""
        if self.pre_only:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            return self.attn.qkv_heads(modulate(self.norm1(x), shift, scale)), None
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        qkv = self.attn.qkv_heads(modulate(self.norm1(x), shift_msa, scale_msa))
        return qkv, (x, gate_msa, shift_mlp, scale_mlp, gate_mlp)

    def post_attention(self, attn: torch.Tensor, x, gate_msa, shift_mlp, scale_mlp, gate_mlp) -> torch.Tensor:
        x = x + gate_msa.unsqueeze(1) * self.attn.proj(attn)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """Context and image streams, joint attention over [context; image] tokens (context keys maskable)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool):
        super().__init__()
        self.context_block = DismantledBlock(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=pre_only)
        self.x_block = DismantledBlock(hidden_size, num_heads, mlp_ratio, qk_norm)

    def forward(
        self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        (qc, kc, vc), ctx_state = self.context_block.pre_attention(context, c)
        (qx, kx, vx), x_state = self.x_block.pre_attention(x, c)
        q, k, v = torch.cat([qc, qx], dim=2), torch.cat([kc, kx], dim=2), torch.cat([vc, vx], dim=2)
        attn_mask = None
        if mask is not None and not bool(mask.all()):
            keys = torch.cat([mask, mask.new_ones(mask.shape[0], x.shape[1])], dim=1)
            attn_mask = keys[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        B, _, T, _ = out.shape
        out = out.transpose(1, 2).reshape(B, T, -1)
        L = context.shape[1]
        x = self.x_block.post_attention(out[:, L:], *x_state)
        context = None if ctx_state is None else self.context_block.post_attention(out[:, :L], *ctx_state)
        return context, x


class MMDiT(PatchTransformer):
    """MM-DiT on latents (B, C, H, W): text-conditional (``text_dim``) or class-conditional; constructor keywords
    are ``PatchTransformer``'s (captions may feed adaLN too: ``semantic="adaln"`` with ``text_dim`` is SD3's own)."""

    arch = "mmdit"
    name = "MMDiT"
    default_semantic = "adaln"
    semantic_modes = ("adaln", "attention")  # the context stream is its own joint attention
    text_needs_attention = False

    def build_layers(self, depth: int, num_heads: int, mlp_ratio: float, qk_norm: bool, null_caption_tokens: int):
        hidden_size, text_dim = self.hidden_size, self.text_dim
        if text_dim is None:
            self.context_embedder = None
            self.y_embedder = LabelEmbedder(self.num_classes, hidden_size)
        else:
            self.context_embedder = CaptionEmbedder(text_dim, hidden_size, null_caption_tokens, projection="linear")
            self.y_embedder = VectorEmbedder(text_dim, hidden_size) if self.semantic == "adaln" else None
        self.control_embedder = self.make_control_embedder(hidden_size)
        self.joint_blocks = nn.ModuleList(
            JointBlock(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=i == depth - 1) for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, self.patch_size, self.out_channels)

    def initialize_weights(self) -> None:
        """DiT-style adaLN-Zero init (the SD3 reference ships none): xavier linears, N(0, .02) embedders, zero
        adaLN regressors in both streams and a zero final layer, so a fresh model outputs 0."""
        xavier_linears(self)
        self.x_embedder.initialize()
        self.t_embedder.initialize()
        if self.y_embedder is not None:
            self.y_embedder.initialize()
        if self.control_embedder is not None:
            self.control_embedder.initialize()
        for block in self.joint_blocks:
            for stream in (block.context_block, block.x_block):
                zero_module(stream.adaLN_modulation[-1])
        self.final_layer.initialize()

    def semantic_inputs(self, class_labels, text, text_mask, text_keep):
        """-> (vector added to c or None, context tokens (B, L, D), context mask or None): a class is one context
        token (and, with adaln, also added to c); a caption's pooled vector is the masked mean of its states."""
        if self.context_embedder is None:
            if class_labels is None:
                raise ValueError("this model is class-conditional (text_dim=None) and needs class_labels")
            emb = self.y_embedder(class_labels)
            return (emb if self.semantic == "adaln" else None), emb.unsqueeze(1), None
        if text is None:
            raise ValueError("this model is text-conditional (text_dim set) and needs text=(B, L, text_dim)")
        states, mask = self.context_embedder.with_null(text, text_mask, text_keep)
        pooled = self.y_embedder(masked_mean(states, mask)) if self.y_embedder is not None else None
        return pooled, self.context_embedder.y_proj(states), mask

    def denoise(self, x, t, c, context, mask) -> torch.Tensor:
        h, grid = self.embed_patches(x)
        for block in self.joint_blocks:
            context, h = self.run_block(block, context, h, c, mask)
        h = self.final_layer(h, c)
        return unpatchify(h, grid, self.patch_size, self.out_channels)

    @staticmethod
    def from_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """diffusers ``SD3Transformer2DModel`` (SD3.0 layout: no dual-attention layers) weights -> ours.

        Text-conditional with semantic="adaln": ``time_text_embed.text_embedder`` becomes the pooled-vector MLP
        ``y_embedder.mlp`` (SD3 feeds it CLIP pooled features of width ``pooled_projection_dim``, so our
        masked-mean pooling needs ``pooled_projection_dim == joint_attention_dim`` to reuse it as is). diffusers'
        (scale, shift) order in ``norm_out`` and the last ``norm1_context`` is swapped back to the reference's
        (shift, scale). The null caption is absent (load with ``strict=False``) and ``pos_embed`` is recomputed.
        """

        def swap(w: torch.Tensor) -> torch.Tensor:
            scale, shift = w.chunk(2, dim=0)
            return torch.cat([shift, scale], dim=0)

        m: dict[str, torch.Tensor] = {}
        simple = {
            "pos_embed.proj": "x_embedder.proj",
            "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
            "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
            "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
            "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
            "context_embedder": "context_embedder.y_proj",
            "proj_out": "final_layer.linear",
        }
        for theirs, ours in simple.items():
            for suffix in ("weight", "bias"):
                m[f"{ours}.{suffix}"] = sd[f"{theirs}.{suffix}"]
        for suffix in ("weight", "bias"):
            m[f"final_layer.adaLN_modulation.1.{suffix}"] = swap(sd[f"norm_out.linear.{suffix}"])
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
        for i in range(depth):
            d, b = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
            last = i == depth - 1
            for suffix in ("weight", "bias"):
                m[b + f"x_block.adaLN_modulation.1.{suffix}"] = sd[d + f"norm1.linear.{suffix}"]
                w = sd[d + f"norm1_context.linear.{suffix}"]
                m[b + f"context_block.adaLN_modulation.1.{suffix}"] = swap(w) if last else w
                m[b + f"x_block.attn.qkv.{suffix}"] = torch.cat([sd[d + f"attn.to_{n}.{suffix}"] for n in "qkv"])
                m[b + f"context_block.attn.qkv.{suffix}"] = torch.cat(
                    [sd[d + f"attn.add_{n}_proj.{suffix}"] for n in "qkv"]
                )
                m[b + f"x_block.attn.proj.{suffix}"] = sd[d + f"attn.to_out.0.{suffix}"]
                m[b + f"x_block.mlp.fc1.{suffix}"] = sd[d + f"ff.net.0.proj.{suffix}"]
                m[b + f"x_block.mlp.fc2.{suffix}"] = sd[d + f"ff.net.2.{suffix}"]
                if not last:
                    m[b + f"context_block.attn.proj.{suffix}"] = sd[d + f"attn.to_add_out.{suffix}"]
                    m[b + f"context_block.mlp.fc1.{suffix}"] = sd[d + f"ff_context.net.0.proj.{suffix}"]
                    m[b + f"context_block.mlp.fc2.{suffix}"] = sd[d + f"ff_context.net.2.{suffix}"]
            for ours, theirs in (("q_norm", "norm_q"), ("k_norm", "norm_k")):
                if d + f"attn.{theirs}.weight" in sd:
                    m[b + f"x_block.attn.{ours}.weight"] = sd[d + f"attn.{theirs}.weight"]
                    added = theirs.replace("norm_", "norm_added_")
                    m[b + f"context_block.attn.{ours}.weight"] = sd[d + f"attn.{added}.weight"]
        return m


#: SD3's conditioning: CLIP-L/G and T5 states projected to 4096-d, 77 + 256 = 333 tokens (SD3 paper, sec. 5);
#: rectified flow, no variance head.
ARCHITECTURE = ArchitectureInfo(
    name="mmdit",
    cls=MMDiT,
    sizes=MMDIT_SIZES,
    published_size="XL/2",
    published_conditioning={"learn_sigma": False, "text_dim": 4096, "text_tokens": 333},
)
