"""semantic="attention" is joint attention: the class token competes with the image keys in one softmax, so
what each image token takes from it depends on the token. semantic="cross_attention" with one class token is,
by contrast, a per-sample constant (softmax over a single key): both checked here, against a closed form."""
import math

import pytest
import torch

from ldm.models import build_model
from ldm.models.attention import Attention, SemanticKeys, joint_keys

ARCHS = ["dit", "improved", "mdt", "pixart"]
GEOMETRY = dict(latent_size=8, in_channels=4, num_classes=10)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded noise in every parameter: the zero initialisations would make every check below trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def reference_joint_attention(attn: Attention, keys: SemanticKeys, x, context, mask, bias=None):
    """softmax(q [k_img; k_sem]^T / sqrt(d) + bias) [v_img; v_sem], written out with matmuls (no SDPA)."""
    B, N, D = x.shape
    q, k, v = attn.qkv_heads(x)
    kc, vc = keys(context)
    logits = q @ torch.cat([k, kc], dim=2).transpose(-1, -2) / math.sqrt(attn.head_dim)
    if bias is not None:
        logits[..., :N] = logits[..., :N] + bias
    if mask is not None:
        logits[..., N:] = logits[..., N:].masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = logits.softmax(-1)
    out = probs @ torch.cat([v, vc], dim=2)
    return attn.proj(out.transpose(1, 2).reshape(B, N, D)), probs


@pytest.mark.parametrize("qk_norm", [False, True])
def test_joint_attention_is_one_softmax_over_image_and_semantic_keys(qk_norm):
    torch.manual_seed(0)
    attn, keys = Attention(32, 4, qk_norm=qk_norm), SemanticKeys(32, 4, qk_norm=qk_norm)
    x, context = torch.randn(2, 6, 32), torch.randn(2, 3, 32)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    with torch.no_grad():
        for m in (mask, None):
            want, probs = reference_joint_attention(attn, keys, x, context, m)
            assert (attn(x, keys(context), m) - want).abs().max() < 1e-5
        assert probs[0, :, :, 6 + 2].abs().max() > 0  # unmasked: the third token is attended to ...
        _, probs = reference_joint_attention(attn, keys, x, context, mask)
        assert torch.equal(probs[0, :, :, 6 + 2], torch.zeros_like(probs[0, :, :, 6 + 2]))  # ... masked: never
        # an additive image-image bias (mDT's relative positions) reaches the image keys only
        bias = torch.randn(1, 4, 6, 6)
        q, k, v = attn.qkv_heads(x)
        k2, v2, sdpa_mask = joint_keys(k, v, keys(context), mask, bias)
        got = torch.nn.functional.scaled_dot_product_attention(q, k2, v2, attn_mask=sdpa_mask)
        want, _ = reference_joint_attention(attn, keys, x, context, mask, bias)
        assert (attn.proj(got.transpose(1, 2).reshape(2, 6, 32)) - want).abs().max() < 1e-5
        assert joint_keys(k, v, keys(context), None, None)[2] is None  # nothing masked: the fused kernel


def first_block(model):
    return model.all_blocks()[0] if hasattr(model, "all_blocks") else model.blocks[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_the_class_token_is_attended_differently_by_each_image_token(arch):
    """The issue's test: the class key's attention weight varies across image tokens, and the attention output
    change caused by swapping the class varies across tokens (a bias would change every token alike)."""
    model = randomize(build_model(arch, "tiny", semantic="attention", **GEOMETRY))
    block = first_block(model)
    assert block.semantic_keys is not None and block.cross_attn is None
    _, context_a, _ = model.semantic_inputs(torch.tensor([1, 2]), None, None, None)
    _, context_b, _ = model.semantic_inputs(torch.tensor([7, 3]), None, None, None)
    h = torch.randn(2, 16, model.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, probs = reference_joint_attention(block.attn, block.semantic_keys, h, context_a, None)
        class_weight = probs[..., -1]  # (B, heads, N): the weight each image query puts on the class key
        assert class_weight.std(dim=-1).min() > 1e-3 * class_weight.mean()
        change = (block.attn(h, semantic_kv=block.semantic_keys(context_a))
                  - block.attn(h, semantic_kv=block.semantic_keys(context_b)))  # (B, N, D)
        spread = (change - change.mean(dim=1, keepdim=True)).abs().amax(dim=(1, 2))
        assert (spread > 0.05 * change.abs().amax(dim=(1, 2))).all()


@pytest.mark.parametrize("arch", ["dit", "mdt", "pixart"])
def test_single_token_cross_attention_is_a_per_sample_bias(arch):
    """The ablation, as named: with one class token the cross-attention output is the same for every image
    token (softmax over one key is 1), whatever the tokens are."""
    model = randomize(build_model(arch, "tiny", semantic="cross_attention", **GEOMETRY))
    block = first_block(model)
    assert block.semantic_keys is None and block.cross_attn is not None
    _, context, _ = model.semantic_inputs(torch.tensor([1, 2]), None, None, None)
    h = torch.randn(2, 16, model.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = block.cross_attn(h, context, None)
    assert (out - out[:, :1]).abs().max() < 1e-5 * out.abs().max()
