"""Attention layers of the transformer architectures: self-attention (optionally joined by a semantic stream:
joint attention), cross-attention, and the semantic stream's keys.

Names follow facebookresearch/DiT (``qkv``/``proj``) and PixArt (``q_linear``/``kv_linear``) so that published
state dicts map onto ours by name. Everything goes through ``F.scaled_dot_product_attention`` so that torch
picks the fused kernel (flash / memory-efficient on GPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "CrossAttention", "SemanticKeys", "joint_keys", "key_mask"]


def key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, L) bool key mask (True = attend) -> SDPA's boolean ``attn_mask`` (B, 1, 1, L).

    An all-True mask is dropped (None) so SDPA may take its fused unmasked kernel.
    """
    if mask is None or bool(mask.all()):
        return None
    return mask[:, None, None, :]


def _qk_norm(kind: bool | str, head_dim: int) -> nn.Module:
    """QK-norm over the head dimension: True/"layer" = LayerNorm (ViT-22B/DiT variants), "rms" = RMSNorm with
    a learned scale (SD3's choice), False = none."""
    if kind is False or kind is None:
        return nn.Identity()
    if kind is True or kind == "layer":
        return nn.LayerNorm(head_dim, eps=1e-6)
    if kind == "rms":
        return nn.RMSNorm(head_dim, eps=1e-6)
    raise ValueError(f"unknown qk_norm {kind!r}; valid: False, True/'layer', 'rms'")


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and optional QK-norm.

    QK-norm (a norm over the head dimension of q and k) bounds the attention logits; it is the usual
    fix for loss spikes in large DiT/mmDiT runs (FIELD-NOTES). Off by default to stay DiT-faithful.
    ``proj=False`` drops the output projection (SD3's ``pre_only`` context block in the last layer, whose
    attention output is never used). ``qkv_heads`` is exposed so mmDiT can run joint attention over two
    streams that each keep their own projections.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool | str = False,
                 proj: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = _qk_norm(qk_norm, self.head_dim)
        self.k_norm = _qk_norm(qk_norm, self.head_dim)
        self.proj = nn.Linear(dim, dim) if proj else None

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) -> q, k, v each (B, heads, N, head_dim), QK-norm applied."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: torch.Tensor, semantic_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                semantic_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention of x (B, N, D); with ``semantic_kv`` (``SemanticKeys`` of the semantic tokens, key
        mask ``semantic_mask`` (B, L)) a joint attention over [image; semantic] keys."""
        B, N, D = x.shape
        q, k, v = self.qkv_heads(x)
        k, v, mask = joint_keys(k, v, semantic_kv, semantic_mask, None)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    """Image tokens attend to condition tokens (PixArt's ``MultiHeadCrossAttention``: q_linear, kv_linear, proj).

    ``mask`` (B, L) bool marks the condition tokens to attend to (None = all); it goes to SDPA as a boolean
    ``attn_mask``, so masked keys get exactly zero weight (PixArt/diffusers add a -10000 bias instead, which is
    the same in fp32).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool | str = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.q_norm = _qk_norm(qk_norm, self.head_dim)
        self.k_norm = _qk_norm(qk_norm, self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        L = context.shape[1]
        q = self.q_linear(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv_linear(context).reshape(B, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=key_mask(mask))
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class SemanticKeys(nn.Module):
    """The semantic stream of a joint attention (semantic="attention"): class or caption tokens -> keys and
    values that join an image self-attention's own (``Attention.forward(x, semantic_kv=...)``), with their own
    norm and projection (MM-DiT's per-stream weights).

    Why not cross-attention: with one class token a cross-attention's softmax runs over a single key, its
    weight is 1 for every query, and the layer reduces to a per-sample constant added to every token (a bias).
    In a joint softmax the class competes with the image keys, so how much each token takes from it depends on
    the token. The semantic tokens are keys and values only (no queries, no update across blocks: every block
    sees the same tokens, as with cross-attention; MM-DiT, which also updates them, is its own architecture);
    the affine LayerNorm puts them on the scale of the normalised image tokens."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool | str = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.k_norm = _qk_norm(qk_norm, self.head_dim)

    def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) -> k, v each (B, heads, L, head_dim)."""
        B, L, _ = context.shape
        kv = self.kv(self.norm(context)).reshape(B, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        return self.k_norm(k), v


def joint_keys(k: torch.Tensor, v: torch.Tensor, semantic_kv: tuple[torch.Tensor, torch.Tensor] | None,
               semantic_mask: torch.Tensor | None, bias: torch.Tensor | None):
    """Keys and values of an image self-attention joined by a semantic stream's, and the SDPA mask over them:
    ``bias`` (an additive (B|1, heads, N, N) image-image bias, e.g. mDT's relative positions) on the image
    keys, -inf on masked semantic keys; None where nothing is masked or biased (fused kernel)."""
    if semantic_kv is None:
        return k, v, bias
    kc, vc = semantic_kv
    keys, values = torch.cat([k, kc], dim=2), torch.cat([v, vc], dim=2)
    masked = semantic_mask is not None and not bool(semantic_mask.all())
    if bias is None and not masked:
        return keys, values, None
    B, H, N, L = k.shape[0], k.shape[1], k.shape[2], kc.shape[2]
    image = (bias.to(k.dtype).expand(B, H, N, N) if bias is not None else k.new_zeros(B, H, N, N))
    semantic = k.new_zeros(B, 1, 1, L)
    if masked:
        semantic = semantic.masked_fill(~semantic_mask[:, None, None, :], float("-inf"))
    return keys, values, torch.cat([image, semantic.expand(B, H, N, L)], dim=-1)
