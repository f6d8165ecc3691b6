"""PixArt-α, MM-DiT and DiT's attention semantic mode: against diffusers' reference models (mapped weights)
and the conditioning invariants the paper's claims rest on."""
import pytest
import torch
from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel

from ldm.models import build_model, model_from_config
from ldm.models.dit import DiT
from ldm.models.layers import CaptionEmbedder, masked_mean, sincos_2d
from ldm.models.mmdit import MMDiT
from ldm.models.pixart import PixArt
from ldm.text import pad_tokens

BASE = dict(latent_size=8, in_channels=4, num_classes=10, hidden_size=64, depth=2, num_heads=4, patch_size=2)
ARCHS = {"dit": DiT, "pixart": PixArt, "mmdit": MMDiT}


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Seeded noise in every parameter: the zero init (adaLN-Zero, zero cross-attention output) proves nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def inputs(B: int = 3, L: int = 5, text_dim: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, 8, 8, generator=g), torch.tensor([0.0, 421.0, 999.0])[:B],
            torch.randn(B, L, text_dim, generator=g))


# --- equivalence with diffusers ----------------------------------------------------------------------------

def test_pixart_matches_diffusers():
    theirs = randomize(PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=3,
        cross_attention_dim=64, sample_size=8, caption_channels=32, norm_eps=1e-6))
    ours = PixArt(**{**BASE, "depth": 3}, text_dim=32, learn_sigma=True).eval()
    missing, unexpected = ours.load_state_dict(PixArt.from_diffusers_state_dict(theirs.state_dict()), strict=False)
    assert missing == ["y_embedder.y_embedding"] and unexpected == []  # diffusers has no learned null caption
    x, t, text = inputs()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        for m in (mask, None):
            a = ours(x, t, text=text, text_mask=m)
            b = theirs(x, encoder_hidden_states=text, timestep=t,
                       encoder_attention_mask=None if m is None else m.long()).sample
            assert a.shape == b.shape == (3, 8, 8, 8)
            assert a.abs().max() > 0.1
            assert (a - b).abs().max() <= 1e-5
        # the mask matters (otherwise the comparison above would not test it)
        assert (ours(x, t, text=text, text_mask=mask) - ours(x, t, text=text)).abs().max() > 1e-3


@pytest.mark.parametrize("qk_norm", [False, True])
def test_mmdit_matches_diffusers_sd3(qk_norm):
    theirs = randomize(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=3, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32,
        pos_embed_max_size=4, qk_norm="rms_norm" if qk_norm else None))
    with torch.no_grad():  # SD3 crops a fixed sin-cos table of another grid; give it ours (a buffer, not a weight)
        theirs.pos_embed.pos_embed.copy_(sincos_2d(64, 4)[None])
    ours = MMDiT(**{**BASE, "depth": 3}, text_dim=32, learn_sigma=True, qk_norm=qk_norm).eval()
    missing, unexpected = ours.load_state_dict(MMDiT.from_diffusers_state_dict(theirs.state_dict()), strict=False)
    assert missing == ["context_embedder.y_embedding"] and unexpected == []
    x, t, text = inputs()
    with torch.no_grad():
        a = ours(x, t, text=text)
        # our pooled vector is the (masked) mean of the caption states; hand SD3 the same vector
        b = theirs(x, encoder_hidden_states=text, pooled_projections=text.mean(1), timestep=t).sample
    assert a.shape == b.shape == (3, 8, 8, 8)
    assert a.abs().max() > 0.1
    assert (a - b).abs().max() <= 1e-5


# --- conditioning invariants -------------------------------------------------------------------------------

def modulation_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose outputs are the adaLN modulation vectors."""
    if isinstance(model, PixArt):
        return [model.t_block]
    if isinstance(model, MMDiT):
        return [s.adaLN_modulation for b in model.joint_blocks for s in (b.context_block, b.x_block)]
    return [b.adaLN_modulation for b in model.blocks] + [model.final_layer.adaLN_modulation]


def modulations(model, x, t, labels, **kw) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
             for m in modulation_modules(model)]
    try:
        with torch.no_grad():
            out = model(x, t, labels, **kw)
    finally:
        for h in hooks:
            h.remove()
    return seen, out


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_semantic_keeps_class_out_of_adaln(arch):
    x, t, _ = inputs(B=2)
    ctrl = torch.tensor([[256.0, 256, 0, 0, 256, 256, 0], [512, 384, 10, 20, 300, 300, 1]])
    y1, y2 = torch.tensor([1, 2]), torch.tensor([7, 10])
    attn = randomize(ARCHS[arch](**BASE, semantic="attention", control_mode="disentangled"))
    mods1, out1 = modulations(attn, x, t, y1, control=ctrl)
    mods2, out2 = modulations(attn, x, t, y2, control=ctrl)
    assert len(mods1) == len(modulation_modules(attn)) > 0
    assert all(torch.equal(a, b) for a, b in zip(mods1, mods2))
    assert (out1 - out2).abs().max() > 1e-3  # the class still reaches the output, through attention
    adaln = randomize(ARCHS[arch](**BASE, semantic="adaln", control_mode="disentangled"))
    mods1, _ = modulations(adaln, x, t, y1, control=ctrl)
    mods2, _ = modulations(adaln, x, t, y2, control=ctrl)
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(mods1, mods2))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("text_dim", [None, 32])
def test_disentangled_control_only_where_weight_positive(arch, text_dim):
    m = randomize(ARCHS[arch](**BASE, text_dim=text_dim, semantic="attention", control_mode="disentangled"))
    x, _, text = inputs(B=2)
    cond = dict(text=text) if text_dim else dict(class_labels=torch.tensor([3, 4]))
    c1 = torch.tensor([[256.0, 256, 0, 0, 256, 256, 0], [512, 384, 10, 20, 300, 300, 1]])
    c2 = torch.tensor([[64.0, 900, 5, 7, 64, 64, 1], [100, 100, 0, 0, 100, 100, 0]])
    with torch.no_grad():
        t = torch.full((2,), 999.0)  # w(1) = 0 with the default exponents
        assert torch.equal(m(x, t, control=c1, **cond), m(x, t, control=c2, **cond))
        assert torch.equal(m(x, t, control=c1, **cond), m(x, t, **cond))
        t = torch.full((2,), 500.0)
        assert (m(x, t, control=c1, **cond) - m(x, t, control=c2, **cond)).abs().max() > 1e-3
        assert torch.equal(m(x, t, control=c1, control_keep=torch.zeros(2), **cond), m(x, t, **cond))


@pytest.mark.parametrize("arch", ARCHS)
def test_text_keep_zero_ignores_caption(arch):
    m = randomize(ARCHS[arch](**BASE, text_dim=32, semantic="attention"))
    x, t, text = inputs()
    other = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(9))
    mask_a = torch.tensor([[1, 1, 0, 0, 0]] * 3, dtype=torch.bool)
    keep = torch.tensor([0.0, 1.0, 0.0])
    with torch.no_grad():
        a = m(x, t, text=text, text_mask=mask_a, text_keep=keep)
        b = m(x, t, text=other, text_keep=keep)
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])  # dropped rows: null caption, whatever came in
        assert (a[1] - b[1]).abs().max() > 1e-3  # the kept row follows its caption
        dropped = m(x, t, text=text, text_keep=torch.zeros(3))
        assert torch.equal(dropped, m(x, t, text=other, text_keep=torch.zeros(3)))
        assert (dropped - m(x, t, text=text)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_mask_padding_ignores_padded_values(arch):
    m = randomize(ARCHS[arch](**BASE, text_dim=32, semantic="attention"))
    x, t, states = inputs(L=6)
    lengths = torch.tensor([2, 6, 4])
    padded, mask = pad_tokens(states, lengths, mode="zero_mask")
    junk = padded + (~mask)[..., None] * torch.randn(padded.shape, generator=torch.Generator().manual_seed(4)) * 5
    with torch.no_grad():
        a = m(x, t, text=padded, text_mask=mask)
        b = m(x, t, text=junk, text_mask=mask)
        assert (a - b).abs().max() <= 1e-5
        # without the mask the padded values do reach the output (so the check above tests the mask)
        assert (m(x, t, text=padded) - m(x, t, text=junk)).abs().max() > 1e-3


def test_semantic_options_and_text_requires_attention():
    with pytest.raises(ValueError, match="needs semantic='attention'"):
        DiT(**BASE, text_dim=32)
    with pytest.raises(ValueError, match="needs semantic='attention'"):
        PixArt(**BASE, text_dim=32, semantic="adaln")
    with pytest.raises(ValueError, match="unknown semantic"):
        MMDiT(**BASE, semantic="film")
    assert DiT(**BASE).semantic == "adaln" and PixArt(**BASE).semantic == "cross_attention"
    assert MMDiT(**BASE).semantic == "adaln"
    # PixArt with semantic="adaln" has no cross-attention at all; the class goes to c
    assert all(b.cross_attn is None for b in PixArt(**BASE, semantic="adaln").blocks)
    with pytest.raises(ValueError, match="needs text"):
        PixArt(**BASE, text_dim=32)(*inputs()[:2])
    with pytest.raises(ValueError, match="needs class_labels"):
        MMDiT(**BASE)(*inputs()[:2])


def test_caption_embedder_and_masked_mean():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(masked_mean(x, torch.tensor([[True, True, False]])), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(masked_mean(x, torch.zeros(1, 3, dtype=torch.bool)), torch.zeros(1, 2))
    emb = CaptionEmbedder(2, 4, null_tokens=3)
    text, mask = emb.with_null(x.expand(2, 3, 2), torch.tensor([[1, 0, 0], [1, 1, 0]]).bool(), torch.tensor([0, 1]))
    assert torch.equal(text[0], emb.y_embedding.detach()) and torch.equal(text[1], x[0])
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    with pytest.raises(ValueError, match="null caption has 3 tokens"):
        emb.with_null(torch.zeros(1, 5, 2), None, torch.zeros(1))


# --- zero init, registry, checkpointing --------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["pixart", "mmdit"])
@pytest.mark.parametrize("text_dim", [None, 32])
def test_fresh_model_outputs_zero_and_config_roundtrip(arch, text_dim):
    m = build_model(arch, "tiny", latent_size=8, in_channels=4, num_classes=10, text_dim=text_dim,
                    control_mode="additive", learn_sigma=False)
    x, t, text = inputs()
    cond = dict(text=text) if text_dim else dict(class_labels=torch.tensor([0, 5, 10]))
    ctrl = torch.rand(3, 7) * 300
    with torch.no_grad():
        out = m(x, t, control=ctrl, **cond)
    assert out.shape == (3, 4, 8, 8) and torch.equal(out, torch.zeros_like(out))
    randomize(m)
    m2 = model_from_config(m.config)
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(m(x, t, control=ctrl, **cond), m2.eval()(x, t, control=ctrl, **cond))


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_same_grads(arch):
    a = randomize(ARCHS[arch](**BASE, text_dim=32, semantic="attention")).train()
    b = model_from_config({**a.config, "gradient_checkpointing": True}).train()
    b.load_state_dict(a.state_dict())
    x, t, text = inputs()
    mask = torch.tensor([[1, 1, 0, 0, 0]] * 3, dtype=torch.bool)
    a(x, t, text=text, text_mask=mask).square().sum().backward()
    b(x, t, text=text, text_mask=mask).square().sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), n


def test_pos_embed_transfer_interface():
    for cls in (PixArt, MMDiT):
        m = cls(**{**BASE, "latent_size": 16}, pos_embed_base=4)
        assert torch.equal(m.pos_embed[0], sincos_2d(64, 8, 4))
        m.set_pos_embed_base(None)
        assert torch.equal(m.pos_embed[0], sincos_2d(64, 8)) and m.config["pos_embed_base"] is None
        assert m.config["patch_size"] == 2 and "pos_embed" not in m.state_dict()


# --- published sizes (meta device: no memory) --------------------------------------------------------------

def n_params(arch: str, size: str, **kw) -> int:
    with torch.device("meta"):
        m = build_model(arch, size, latent_size=32, in_channels=4, num_classes=1000, learn_sigma=True, **kw)
    return sum(p.numel() for p in m.parameters())


def test_pixart_xl2_param_count():
    """PixArt-α-XL/2 with T5-XXL captions (4096-d, 120 tokens): the paper's "0.6B"."""
    n = n_params("pixart", "XL/2", text_dim=4096, null_caption_tokens=120)
    assert n == 611_347_616
    assert abs(n - 0.6e9) / 0.6e9 < 0.02
    with torch.device("meta"):
        theirs = PixArtTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                          out_channels=8, num_layers=28, cross_attention_dim=1152,
                                          sample_size=32, caption_channels=4096)
    # diffusers' port of the same config lacks only the 120 x 4096 null caption
    assert n - sum(p.numel() for p in theirs.parameters()) == 120 * 4096


def test_mmdit_published_param_counts():
    # XL/2 (DiT-XL shape, assumed for the paper's "mmDiT-XL/2"), class-conditional ImageNet
    assert n_params("mmdit", "XL/2") == 1_326_915_104
    # SD3's own depth-18 rule (hidden 64 * 18): equals diffusers' SD3Transformer2DModel of that config + null caption
    n = n_params("mmdit", "d18", text_dim=4096)
    with torch.device("meta"):
        theirs = SD3Transformer2DModel(sample_size=32, in_channels=4, out_channels=8, num_layers=18,
                                       attention_head_dim=64, num_attention_heads=18, joint_attention_dim=4096,
                                       caption_projection_dim=1152, pooled_projection_dim=4096,
                                       pos_embed_max_size=16)
    assert n - sum(p.numel() for p in theirs.parameters()) == 4096
    # SD3 paper: depth 24 is its "2B" model
    assert abs(n_params("mmdit", "d24", text_dim=4096) - 2.0e9) / 2.0e9 < 0.05
